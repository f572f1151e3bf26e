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


def _fit_weights(strategy, precision, steps=3, batch=32):
    keras.mixed_precision.set_global_policy(precision)
    x, y = _learnable_data(batch * steps)
    with strategy.scope():
        model = _model("plain")
        optimizer = clars_tf.CLARS(1.0, trust_clip=1.0)
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss=_loss)
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(4, 4))
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("replicas", [1, 2])
def test_fit_with_loss_scaling_follows_float32(replicas, two_replicas,
                                               float32_afterwards):
    strategy = two_replicas if replicas == 2 else tf.distribute.get_strategy()
    want = _fit_weights(strategy, "float32")
    got = _fit_weights(strategy, "mixed_float16")
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
