import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import clars_tf


def _loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)


def _learnable_data(n=256, seed=0):
    """Labels are a fixed linear function of the inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(10, 3)), axis=1).astype("int32")
    return x, y


def _model(batch_norm=None, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((10,)), keras.layers.Dense(16, name="hidden")]
    if batch_norm == "sync":
        layers.append(keras.layers.BatchNormalization(synchronized=True))
    elif batch_norm == "plain":
        layers.append(keras.layers.BatchNormalization())
    layers += [keras.layers.ReLU(), keras.layers.Dense(3, name="logits")]
    return keras.Sequential(layers)


def test_fit_trains_with_the_extra_line():
    x, y = _learnable_data()
    model = _model("plain")
    model.compile(optimizer=clars_tf.CLARS(2.0, trust_clip=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), metrics=["accuracy"])
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(4, 8))
    before = model.evaluate(x, y, verbose=0)[0]
    history = model.fit(x, y, batch_size=64, epochs=8, verbose=0)
    after = model.evaluate(x, y, verbose=0)[0]
    assert after < 0.7 * before
    assert history.history["accuracy"][-1] > 0.7
    norms = model.optimizer.gradient_norm_estimates.numpy()
    assert np.all(norms[[0, 2, 4, 5]] > 0)  # bias before BN has ~0 gradient


def test_fit_without_the_extra_line_says_what_to_add():
    x, y = _learnable_data(64)
    model = _model()
    model.compile(optimizer=clars_tf.CLARS(0.1),
                  loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError,
                       match=r"clars_tf\.attach_gradient_norm_estimator"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)


def test_fit_with_a_string_loss_uses_it_for_the_estimate():
    x, y = _learnable_data(64)
    model = _model()
    model.compile(optimizer=clars_tf.CLARS(0.5), loss=_loss)
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(8, 4))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert np.all(model.optimizer.gradient_norm_estimates.numpy() > 0)


def test_refresh_every_reuses_the_stored_estimate():
    x, y = _learnable_data(32 * 4)
    model = _model()
    optimizer = clars_tf.CLARS(0.5)
    model.compile(optimizer=optimizer, loss=_loss)
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(8, 4, refresh_every=2))
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(optimizer.gradient_norm_estimates.numpy().copy())

    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False,
              callbacks=[Record()])
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(seen[2], seen[3])
    assert not np.array_equal(seen[1], seen[2])


def _train(strategy, make_optimizer, estimator, batch_norm, steps=5,
           global_batch=32):
    x, y = _learnable_data(global_batch * steps)
    with strategy.scope():
        model = _model(batch_norm)
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        def replica_step(x, y):
            out = clars_tf.compute_loss_gradients_and_norms(
                model, _loss, x, y, global_batch_size=global_batch,
                optimizer=optimizer, estimator=estimator)
            if estimator is None:
                optimizer.apply(out.gradients, model.trainable_variables)
            else:
                optimizer.apply(out.gradients, model.trainable_variables,
                                gradient_norms=out.gradient_norms)
            return out.loss

        return strategy.reduce("SUM", strategy.run(replica_step, (x, y)),
                               axis=None)

    replicas = strategy.num_replicas_in_sync
    local = global_batch // replicas
    losses = []
    for t in range(steps):
        xs, ys = x[t * global_batch:][:global_batch], y[
            t * global_batch:][:global_batch]
        batch = strategy.experimental_distribute_values_from_function(
            lambda ctx: (xs[ctx.replica_id_in_sync_group * local:][:local],
                         ys[ctx.replica_id_in_sync_group * local:][:local]))
        losses.append(float(step(*batch)))
    return [v.numpy() for v in model.variables], losses


@pytest.mark.parametrize("batch_norm", [None, "sync"])
@pytest.mark.parametrize("name", ["clars", "lars"])
def test_two_replicas_match_one_device(name, batch_norm, two_replicas):
    if name == "clars":
        estimator = clars_tf.GradientNormEstimator(4, 4)

        def make_optimizer():
            return clars_tf.CLARS(1.0, weight_decay_rate=1e-3,
                                  trust_clip=1.0)
    else:
        estimator = None

        def make_optimizer():
            return clars_tf.LARS(1.0, weight_decay_rate=1e-3,
                                 trust_coefficient=0.01)
    one, one_losses = _train(tf.distribute.OneDeviceStrategy("CPU:0"),
                             make_optimizer, estimator, batch_norm)
    two, two_losses = _train(two_replicas, make_optimizer, estimator,
                             batch_norm)
    assert one_losses[-1] < one_losses[0]
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    for a, b in zip(one, two):
        assert np.max(np.abs(a - b)) <= 1e-5
    # The weights did move: the comparison is not between initial values.
    fresh = _model(batch_norm).get_weights()
    assert max(np.max(np.abs(a - f)) for a, f in zip(one, fresh)) > 1e-2


def test_fit_under_mirrored_strategy_with_the_extra_line(two_replicas):
    x, y = _learnable_data(128)
    strategy = two_replicas
    with strategy.scope():
        model = _model()
        model.compile(optimizer=clars_tf.CLARS(1.0), loss=_loss)
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(4, 4))
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.all(model.optimizer.gradient_norm_estimates.numpy() > 0)


def test_per_example_loss_of_keras_identifiers():
    y_true = np.array([0, 1])
    y_pred = np.array([[0.9, 0.1], [0.2, 0.8]], dtype="float32")
    expected = [-np.log(0.9), -np.log(0.8)]
    for identifier in ("sparse_categorical_crossentropy",
                       keras.losses.SparseCategoricalCrossentropy(),
                       keras.losses.sparse_categorical_crossentropy):
        losses = clars_tf.per_example_loss_of(identifier)(y_true, y_pred)
        np.testing.assert_allclose(losses, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="per_example_loss"):
        clars_tf.per_example_loss_of({"a": "mse"})


@pytest.fixture
def float32_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _fit_weights(strategy, precision, estimator, steps=3, batch=32):
    keras.mixed_precision.set_global_policy(precision)
    x, y = _learnable_data(batch * steps)
    with strategy.scope():
        model = _model("plain")
        optimizer = clars_tf.CLARS(1.0, trust_clip=1.0)
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss=_loss)
    clars_tf.attach_gradient_norm_estimator(model, estimator)
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("estimator", [
    clars_tf.GradientNormEstimator(4, 4),
    clars_tf.OnePassGradientNormEstimator(4, 4)], ids=["loop", "one_pass"])
@pytest.mark.parametrize("replicas", [1, 2])
def test_fit_with_loss_scaling_follows_float32(replicas, estimator,
                                               two_replicas,
                                               float32_afterwards):
    strategy = two_replicas if replicas == 2 else tf.distribute.get_strategy()
    want = _fit_weights(strategy, "float32", estimator)
    got = _fit_weights(strategy, "mixed_float16", estimator)
    assert got.layers[0].compute_dtype == "float16"
    assert int(got.optimizer.iterations.numpy()) == 3  # no step skipped
    start = _model("plain").get_weights()
    moved = max(np.max(np.abs(w - s))
                for w, s in zip(want.get_weights(), start))
    apart = max(np.max(np.abs(w - g))
                for w, g in zip(want.get_weights(), got.get_weights()))
    assert moved > 1e-2
    assert apart < 0.02 * moved, (apart, moved)


def test_a_nonfinite_estimate_stops_fit_through_terminate_on_nan():
    x, y = _learnable_data(128)
    model = _model()
    model.compile(optimizer=clars_tf.CLARS(0.5), loss=_loss)

    def broken_loss(y_true, y_pred):  # finite main loss, NaN estimates
        return _loss(y_true, y_pred) * float("nan")

    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(4, 4), broken_loss)
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0,
                        callbacks=[keras.callbacks.TerminateOnNaN()])
    assert model.stop_training
    assert len(history.history["loss"]) == 1
    assert np.isnan(model.layers[0].kernel.numpy()).all()


def test_the_loss_is_scaled_for_a_loss_scale_optimizer():
    x, y = _learnable_data(32)
    model = _model()
    plain = clars_tf.compute_loss_gradients_and_norms(
        model, _loss, x, y, global_batch_size=32)
    optimizer = keras.optimizers.LossScaleOptimizer(clars_tf.CLARS(0.1),
                                                    initial_scale=1024.0)
    optimizer.build(model.trainable_variables)
    scaled = clars_tf.compute_loss_gradients_and_norms(
        model, _loss, x, y, global_batch_size=32, optimizer=optimizer)
    assert float(scaled.loss) == pytest.approx(float(plain.loss))
    for g, s in zip(plain.gradients, scaled.gradients):
        np.testing.assert_allclose(s.numpy(), 1024.0 * g.numpy(), rtol=1e-5,
                                   atol=1e-6)


class _CountCalls(keras.layers.Layer):
    """The identity; counts the times its call runs (in Python, at run
    time, whatever scope or loop it runs in)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.runs = 0

    def _count(self):
        self.runs += 1
        return np.int32(0)

    def call(self, inputs):
        tick = tf.py_function(self._count, [], tf.int32)
        with tf.control_dependencies([tick]):
            return tf.identity(inputs)


def _regularized_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(16, name="hidden",
                           kernel_regularizer=keras.regularizers.L2(0.05)),
        _CountCalls(name="count"),
        keras.layers.ReLU(),
        keras.layers.Dense(3, name="logits")])


class _LossWithLogitPenalty(keras.Sequential):
    """Overrides `compute_loss`: Keras's loss plus a penalty on the logits."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + 0.01 * tf.reduce_mean(tf.square(y_pred))


def _clars_step_by_hand(weights, gradients, norms, learning_rate, eta,
                        clip, decay, epsilon=1e-6):
    """The spec's first CLARS step (zero momentum buffer) in NumPy."""
    stepped = []
    for w, g, a in zip(weights, gradients, norms):
        d = g + decay * w
        norm = np.linalg.norm(w)
        if w.ndim <= 1:
            trust = 1.0
        elif norm > 0 and a > 0:
            trust = min(clip, eta * norm / (a + epsilon))
        else:
            trust = min(clip, 1.0)
        stepped.append(w - learning_rate * trust * d)
    return stepped


@pytest.mark.parametrize("keras_loss", ["compiled", "overridden"])
def test_one_pass_fit_step_is_the_spec_step(keras_loss, caplog):
    """Weights after one fit step: gradients of Keras's loss (regularizer
    and sample weights included) by the tape, norms by the loop estimator,
    the update by hand."""
    x, y = _learnable_data(32)
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    model = _regularized_model()
    if keras_loss == "overridden":
        model = _LossWithLogitPenalty(model.layers, name="penalized")
    start = [v.numpy() for v in model.trainable_variables]
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = (tf.reduce_sum(_loss(y, logits) * weights) / len(x)
                + tf.add_n(model.losses))
        if keras_loss == "overridden":
            loss += 0.01 * tf.reduce_mean(tf.square(logits))
    gradients = [g.numpy() for g in tape.gradient(
        loss, model.trainable_variables)]
    norms = [float(a) for a in clars_tf.GradientNormEstimator(4, 4)(
        model, _loss, x, y, weights)]
    expected = _clars_step_by_hand(start, gradients, norms, 0.5, 0.01, 1.0,
                                   1e-3)

    model.compile(optimizer=clars_tf.CLARS(0.5, weight_decay_rate=1e-3,
                                           trust_clip=1.0),
                  loss=loss_object)
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.OnePassGradientNormEstimator(4, 4))
    with caplog.at_level(logging.WARNING):
        history = model.fit(x, y, sample_weight=weights, batch_size=32,
                            epochs=1, shuffle=False, verbose=0)
    warned = "second backward pass" in caplog.text
    assert warned == (keras_loss == "overridden")
    assert history.history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(
        model.optimizer.gradient_norm_estimates.numpy(), norms, rtol=1e-5)
    for got, want, before in zip(model.trainable_variables, expected, start):
        assert np.max(np.abs(want - before)) > 1e-3  # the step moved it
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def _fit_history(estimator, optimizer=None, steps_per_execution=1,
                 strategy=None, epochs=2):
    x, y = _learnable_data(128)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = _regularized_model()
        model.compile(
            optimizer=optimizer or clars_tf.CLARS(1.0, trust_clip=1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True),
            metrics=["accuracy"], steps_per_execution=steps_per_execution)
    if estimator is not None:
        clars_tf.attach_gradient_norm_estimator(model, estimator)
    history = model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False,
                        verbose=0)
    return model, history.history


def test_one_pass_fit_runs_the_forward_pass_once():
    steps = 4  # 128 examples, batches of 32
    sgd, _ = _fit_history(None, keras.optimizers.SGD(0.1), epochs=1)
    one_pass, _ = _fit_history(clars_tf.OnePassGradientNormEstimator(4, 4),
                               epochs=1)
    loop, _ = _fit_history(clars_tf.GradientNormEstimator(4, 4), epochs=1)
    runs = {name: model.get_layer("count").runs
            for name, model in (("sgd", sgd), ("one_pass", one_pass),
                                ("loop", loop))}
    assert runs == {"sgd": steps, "one_pass": steps,
                    "loop": steps * (1 + 4)}, runs  # J = 4 extra passes


def test_one_pass_fit_metrics_are_keras_own():
    """Same norms (no batch norm) as the loop, whose fit runs Keras's own
    train step: the same weights and the same logged loss and accuracy."""
    loop, loop_logs = _fit_history(clars_tf.GradientNormEstimator(4, 4))
    one_pass, logs = _fit_history(clars_tf.OnePassGradientNormEstimator(4, 4))
    assert set(logs) == set(loop_logs) == {"loss", "accuracy"}
    for name in logs:
        np.testing.assert_allclose(logs[name], loop_logs[name], rtol=1e-5)
    for a, b in zip(one_pass.get_weights(), loop.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_pass_fit_without_keras_internals_takes_two_passes(
        monkeypatch, caplog):
    """A Keras without an attribute the one-pass step reads: one warning
    naming it, then the norms' own pass before Keras's step, which trains
    as the loop's fit does (no batch norm: the same norms)."""
    monkeypatch.setattr(
        clars_tf.training, "KERAS_TRAIN_STEP_INTERNALS",
        (*clars_tf.training.KERAS_TRAIN_STEP_INTERNALS, "_not_in_keras"))
    with caplog.at_level(logging.WARNING):
        model, logs = _fit_history(
            clars_tf.OnePassGradientNormEstimator(4, 4), epochs=1)
    assert caplog.text.count("has no _not_in_keras") == 1
    assert model.get_layer("count").runs == 2 * 4  # 4 steps, two passes
    loop, loop_logs = _fit_history(clars_tf.GradientNormEstimator(4, 4),
                                   epochs=1)
    np.testing.assert_allclose(logs["loss"], loop_logs["loss"], rtol=1e-5)
    for a, b in zip(model.get_weights(), loop.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", [
    "loss_scale_factor", "steps_per_execution", "two_replicas"])
def test_one_pass_fit_is_unchanged_by(setting, two_replicas):
    plain, plain_logs = _fit_history(
        clars_tf.OnePassGradientNormEstimator(4, 4))
    kwargs = {
        "loss_scale_factor": {"optimizer": clars_tf.CLARS(
            1.0, trust_clip=1.0, loss_scale_factor=128.0)},
        "steps_per_execution": {"steps_per_execution": 2},
        "two_replicas": {"strategy": two_replicas},
    }[setting]
    model, logs = _fit_history(clars_tf.OnePassGradientNormEstimator(4, 4),
                               **kwargs)
    np.testing.assert_allclose(logs["loss"], plain_logs["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        model.optimizer.gradient_norm_estimates.numpy(),
        plain.optimizer.gradient_norm_estimates.numpy(), rtol=1e-5)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _conv_fit(jit_compile):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=64).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.DepthwiseConv2D(3, strides=2), keras.layers.Flatten(),
        keras.layers.Dense(3)])
    model.compile(optimizer=clars_tf.CLARS(1.0, trust_clip=1.0), loss=_loss,
                  jit_compile=jit_compile)
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.OnePassGradientNormEstimator(4, 4))
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return model


def test_one_pass_fit_under_xla_matches_the_uncompiled_fit():
    """fit compiles with XLA: the estimator reads `model.jit_compile` and
    forms the convolutions' norms from image patches; same values."""
    compiled, plain = _conv_fit(True), _conv_fit(False)
    np.testing.assert_allclose(
        compiled.optimizer.gradient_norm_estimates.numpy(),
        plain.optimizer.gradient_norm_estimates.numpy(), rtol=1e-4)
    for a, b in zip(compiled.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
