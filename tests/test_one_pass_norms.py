import logging
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import clars_tf
import random_models
from clars_tf import group_norms
from clars_tf import one_pass_norms


def _loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)


def _images(n=32, size=9, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, size, size, 3)).astype("float32"),
            rng.integers(0, 3, size=n).astype("int32"))


def _model(kind, seed=0):
    keras.utils.set_random_seed(seed)
    layers = {
        "conv": [keras.layers.Conv2D(4, 3, strides=2, padding="same"),
                 keras.layers.ReLU(),
                 keras.layers.Conv2D(5, 1, use_bias=False)],
        "conv_valid_dilated": [
            keras.layers.Conv2D(4, 3, padding="valid", dilation_rate=2),
            keras.layers.Conv2D(3, (2, 3), strides=(1, 2), padding="same")],
        "depthwise": [
            keras.layers.DepthwiseConv2D(3, strides=2, padding="valid",
                                         depth_multiplier=2),
            keras.layers.ReLU(),
            keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)],
        # Dense on [batch, positions, features]: the kernel sees 9*9 rows
        # per example (the per-group product is formed), the logits layer
        # one (its norm comes from the Gram matrices).
        "dense": [keras.layers.Reshape((81, 3)), keras.layers.Dense(6),
                  keras.layers.ReLU(), keras.layers.Flatten(),
                  keras.layers.Dense(40), keras.layers.ReLU()],
        # Conv1D over the 9 * 9 positions: causal (left padding), strided,
        # dilated (einsums over patches) and valid.
        "conv1d": [keras.layers.Reshape((81, 3)),
                   keras.layers.Conv1D(4, 3, padding="causal",
                                       activation="relu"),
                   keras.layers.Conv1D(5, 2, strides=3, padding="same"),
                   keras.layers.Conv1D(3, 3, dilation_rate=2,
                                       padding="causal", use_bias=False),
                   keras.layers.Conv1D(2, 4, padding="valid")],
        "all": [keras.layers.Conv2D(4, 3, padding="same"),
                keras.layers.ReLU(),
                keras.layers.DepthwiseConv2D(3, strides=2, use_bias=True),
                keras.layers.Conv2D(8, 1),
                keras.layers.ReLU(),
                keras.layers.Flatten(),
                keras.layers.Dense(40)],
    }[kind]
    return keras.Sequential([keras.Input((9, 9, 3)), *layers,
                             keras.layers.Flatten(), keras.layers.Dense(3)])


def _one_pass(model, x, y, estimator, global_batch_size=None, **kwargs):
    out = clars_tf.compute_loss_gradients_and_norms(
        model, _loss, x, y, global_batch_size=global_batch_size or len(x),
        estimator=estimator, **kwargs)
    return out, np.array(out.gradient_norms)


@pytest.mark.parametrize(
    "kind", ["conv", "conv_valid_dilated", "depthwise", "dense", "conv1d",
             "all"])
def test_equals_the_loop_estimator_without_batch_norm(kind):
    model = _model(kind)
    x, y = _images()
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    expected = np.array(clars_tf.GradientNormEstimator(4, 4)(
        model, _loss, x, y, weights))
    out, norms = _one_pass(model, x, y,
                           clars_tf.OnePassGradientNormEstimator(4, 4),
                           sample_weight=weights)
    assert np.all(expected > 0)
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    # The main step's gradients are the ones of the plain step.
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(_loss(y, model(x, training=True)) * weights)
    for a, b in zip(out.gradients, tape.gradient(
            loss, model.trainable_variables)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The hooks are gone once the step is traced.
    assert not any("call" in vars(layer) for layer in model.layers)


def _plain_gradients(model, x, y, weights, scale=1.0):
    """The tape's gradients of the weighted mean loss, times `scale`."""
    with tf.GradientTape() as tape:
        losses = tf.cast(_loss(y, model(x, training=True)), "float32")
        loss = tf.reduce_sum(losses * weights) / len(x) * scale
    return tape.gradient(loss, model.trainable_variables)


def _assert_gradients_close(actual, expected, mixed):
    # float16 pieces are rounded before they are summed in float32.
    rtol = 1e-2 if mixed else 1e-5
    for a, b in zip(actual, expected):
        assert a.dtype == b.dtype == tf.float32
        np.testing.assert_allclose(a, b, rtol=rtol,
                                   atol=rtol * np.max(np.abs(b)))


@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "mixed"])
@pytest.mark.parametrize("kind", ["all", "conv_valid_dilated", "depthwise",
                                  "conv1d"])
@pytest.mark.parametrize("groups", [(4, 8), (3, 5)],
                         ids=["every_example", "uneven_gaps"])
def test_step_gradients_are_the_tapes(groups, kind, mixed):
    """The one-pass step's gradients are the plain step's.

    Conv (strided, dilated, valid), depthwise, dense and bias variables,
    with sample weights and float16 loss scaling; J*s = B (the groups are
    the micro-batches) and J*s < B with gaps of 3 and 4 examples.
    """
    x, y = _images()
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model(kind)
        scale = 2.0 ** 10 if mixed else 1.0
        optimizer = None
        if mixed:
            optimizer = keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(), initial_scale=scale)
            optimizer.build(model.trainable_variables)
        estimator = clars_tf.OnePassGradientNormEstimator(*groups)
        step = tf.function(
            lambda: clars_tf.compute_loss_gradients_and_norms(
                model, _loss, x, y, weights, global_batch_size=len(x),
                optimizer=optimizer, estimator=estimator))
        out = step()
        expected = _plain_gradients(model, x, y, weights, scale)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert len(out.gradients) == len(model.trainable_variables)
    _assert_gradients_close(out.gradients, expected, mixed)


@pytest.mark.parametrize("groups", [(4, 8), (3, 5)],
                         ids=["every_example", "uneven_gaps"])
def test_step_gradients_are_the_tapes_with_unknown_batch_size(groups):
    """The micro-batches and the rest cut from a batch of unknown size."""
    x, y = _images()
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    model = _model("all")
    estimator = clars_tf.OnePassGradientNormEstimator(*groups)
    step = tf.function(
        lambda x, y, w: clars_tf.compute_loss_gradients_and_norms(
            model, _loss, x, y, w, global_batch_size=len(x),
            estimator=estimator),
        input_signature=[tf.TensorSpec([None, 9, 9, 3]),
                         tf.TensorSpec([None], tf.int32),
                         tf.TensorSpec([None])])
    out = step(x, y, weights)
    _assert_gradients_close(out.gradients,
                            _plain_gradients(model, x, y, weights), False)
    np.testing.assert_allclose(
        out.gradient_norms,
        clars_tf.GradientNormEstimator(*groups)(model, _loss, x, y, weights),
        rtol=1e-5)


@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "mixed"])
@pytest.mark.parametrize("groups", [(4, 8), (4, 4)],
                         ids=["every_example", "half_the_examples"])
def test_two_replicas_gradients_sum_to_the_one_device_gradients(
        two_replicas, groups, mixed):
    x, y = _images()
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with two_replicas.scope():
            model = _model("all")
        expected = _plain_gradients(model, x, y, weights)
        estimator = clars_tf.OnePassGradientNormEstimator(*groups)

        def replica_step(x, y, weights):
            return clars_tf.compute_loss_gradients_and_norms(
                model, _loss, x, y, weights, global_batch_size=len(x) * 2,
                estimator=estimator).gradients

        half = len(x) // 2
        batch = two_replicas.experimental_distribute_values_from_function(
            lambda ctx: tuple(t[ctx.replica_id_in_sync_group * half:][:half]
                              for t in (x, y, weights)))
        gradients = tf.function(lambda b: [
            two_replicas.reduce("SUM", g, axis=None)
            for g in two_replicas.run(replica_step, b)])(batch)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    _assert_gradients_close(gradients, expected, mixed)


@pytest.mark.parametrize("rows", [1, 50])
def test_gram_and_product_norms_match_numpy(rows):
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(3, rows, 20)).astype("float32")
    gradients = rng.normal(size=(3, rows, 30)).astype("float32")
    expected = [np.sum((a.astype(np.float64).T @ b) ** 2)
                for a, b in zip(inputs, gradients)]
    np.testing.assert_allclose(
        group_norms._squared_norms_of_products(
            tf.constant(inputs), tf.constant(gradients)), expected,
        rtol=1e-5)


def test_gram_norms_of_cancelling_groups_are_the_formed_gradients():
    """Two rows whose products nearly cancel: the Gram matrices' sum is a
    difference of large terms, off by up to its rounding (below zero in
    about 40% of the trials). Such groups' norms come from the formed
    gradients instead, the sums the loop estimator itself forms."""
    rng = np.random.default_rng(3)
    trials, p, k = 200, 40, 40  # 2 * (p + k) < p * k: the Gram branch
    x1 = rng.normal(size=(trials, 1, p))
    dz1 = rng.normal(size=(trials, 1, k))
    inputs = np.concatenate(
        [x1, x1 * (1 + 1e-6 * rng.normal(size=x1.shape))], 1)
    gradients = np.concatenate([dz1, -dz1], 1)
    inputs32, gradients32 = (tf.constant(a, "float32")
                             for a in (inputs, gradients))
    ghost = tf.reduce_sum(
        tf.einsum("gnp,gmp->gnm", inputs32, inputs32)
        * tf.einsum("gnk,gmk->gnm", gradients32, gradients32), axis=[1, 2])
    assert np.sum(ghost.numpy() < 0) > 20  # the case is a real one
    squares = group_norms._squared_norms_of_products(inputs32,
                                                     gradients32).numpy()
    formed = tf.reduce_sum(tf.square(tf.einsum(
        "gnp,gnk->gpk", inputs32, gradients32)), axis=[1, 2]).numpy()
    np.testing.assert_allclose(squares, formed, rtol=1e-6)


def test_gram_norms_without_cancellation_stay_the_gram_ones():
    rng = np.random.default_rng(4)
    inputs = tf.constant(rng.normal(size=(3, 2, 40)), "float32")
    gradients = tf.constant(rng.normal(size=(3, 2, 40)), "float32")
    ghost = tf.reduce_sum(
        tf.einsum("gnp,gmp->gnm", inputs, inputs)
        * tf.einsum("gnk,gmk->gnm", gradients, gradients), axis=[1, 2])
    np.testing.assert_array_equal(
        group_norms._squared_norms_of_products(inputs, gradients), ghost)


def test_standalone_call_equals_the_loop_estimator():
    model = _model("all")
    x, y = _images()
    np.testing.assert_allclose(
        clars_tf.OnePassGradientNormEstimator(4, 8)(model, _loss, x, y),
        clars_tf.GradientNormEstimator(4, 8)(model, _loss, x, y), rtol=1e-5)


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("kind", ["all", "conv_valid_dilated", "depthwise",
                                  "conv1d"])
def test_under_xla(kind, jit_compile):
    """Under XLA either way of forming the kernels' norms gives the loop's.

    `jit_compile=True` takes einsums over image patches, False one
    filter-gradient op per group.
    """
    model = _model(kind)
    x, y = _images()
    estimator = clars_tf.OnePassGradientNormEstimator(
        4, 4, jit_compile=jit_compile)
    step = tf.function(lambda x, y: clars_tf.compute_loss_gradients_and_norms(
        model, _loss, x, y, global_batch_size=len(x),
        estimator=estimator).gradient_norms, jit_compile=True)
    np.testing.assert_allclose(
        step(x, y), clars_tf.GradientNormEstimator(4, 4)(model, _loss, x, y),
        rtol=1e-5)


def test_two_replicas_average_into_the_one_device_estimate(two_replicas):
    """Per-replica groups, averaged by CLARS's mean-aggregated variable."""
    x, y = _images()
    expected = clars_tf.GradientNormEstimator(4, 4)(_model("all"), _loss, x,
                                                    y)
    with two_replicas.scope():
        model = _model("all")
        optimizer = clars_tf.CLARS(0.0)
        optimizer.build(model.trainable_variables)
    estimator = clars_tf.OnePassGradientNormEstimator(4, 4)

    def replica_step(x, y):
        out = clars_tf.compute_loss_gradients_and_norms(
            model, _loss, x, y, global_batch_size=len(x) * 2,
            optimizer=optimizer, estimator=estimator)
        optimizer.apply(out.gradients, model.trainable_variables,
                        gradient_norms=out.gradient_norms)

    half = len(x) // 2
    batch = two_replicas.experimental_distribute_values_from_function(
        lambda ctx: (x[ctx.replica_id_in_sync_group * half:][:half],
                     y[ctx.replica_id_in_sync_group * half:][:half]))
    tf.function(lambda b: two_replicas.run(replica_step, b))(batch)
    np.testing.assert_allclose(optimizer.gradient_norm_estimates.numpy(),
                               expected, rtol=1e-5)


def test_unreadable_layers_fall_back_to_the_loop_said_once(caplog):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((9, 9, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="relu_conv")(inputs)
    h = keras.layers.LayerNormalization(name="layer_norm")(h)
    h = keras.layers.Flatten()(h)
    shared = keras.layers.Dense(8, name="shared")
    h = shared(shared(keras.layers.Dense(8, name="readable")(h)))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    x, y = _images()
    estimator = clars_tf.OnePassGradientNormEstimator(4, 4)
    with caplog.at_level(logging.WARNING, logger=one_pass_norms.__name__):
        _, norms = _one_pass(model, x, y, estimator)
        _one_pass(model, x, y, estimator)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    for name in ("layer_norm", "shared"):
        assert name in warnings[0]
    assert "called 2 times" in warnings[0]
    # An activation inside the layer: the norms are read before it.
    for name in ("readable", "relu_conv"):
        assert name not in warnings[0]
    np.testing.assert_allclose(
        norms, clars_tf.GradientNormEstimator(4, 4)(model, _loss, x, y),
        rtol=1e-5)


def _batch_norm_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((9, 9, 3)), keras.layers.Conv2D(4, 3, use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(3)])


def test_batch_norm_sends_every_variable_to_the_loop(caplog):
    """Batch statistics make each example's pass depend on the others: the
    conv before the batch norm, the batch norm and the layer after it all
    take the loop's estimate, said once with the op and the reason."""
    model = _batch_norm_model()
    x, y = _images(n=16)
    warning = _right_or_loud(model, x, y, caplog)
    assert "5 variable(s)" in warning
    assert "combines the examples of the batch" in warning


@pytest.mark.parametrize("defer_state_updates", [False, True])
def test_batch_norm_moving_statistics_are_updated(defer_state_updates):
    """The recorded pass writes the moving statistics Keras's own training
    call writes (they were once lost inside the recording's scope)."""
    x, y = _images(n=16)
    reference = _batch_norm_model()
    reference(x, training=True)
    model = _batch_norm_model()
    out, _ = _one_pass(model, x, y, clars_tf.OnePassGradientNormEstimator(4, 4),
                       defer_state_updates=defer_state_updates)
    if defer_state_updates:
        clars_tf.apply_state_updates(out.state_updates)
    want, got = reference.layers[1], model.layers[1]
    assert np.abs(want.moving_mean.numpy()).max() > 1e-4  # it moved
    np.testing.assert_allclose(got.moving_mean.numpy(),
                               want.moving_mean.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.moving_variance.numpy(),
                               want.moving_variance.numpy(), rtol=1e-5)


def test_float16_loss_scaling_is_undone():
    x, y = _images()
    expected = clars_tf.GradientNormEstimator(4, 4)(_model("all"), _loss, x,
                                                    y)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model("all")
        optimizer = keras.optimizers.LossScaleOptimizer(
            clars_tf.CLARS(0.1), initial_scale=2.0 ** 12)
        optimizer.build(model.trainable_variables)
        out, norms = _one_pass(model, x, y,
                               clars_tf.OnePassGradientNormEstimator(4, 4),
                               optimizer=optimizer)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.gradients[0].dtype == tf.float32
    # float16 activations: agreement to float16 rounding, not 1e-5.
    np.testing.assert_allclose(norms, expected, rtol=1e-2)


def test_trainer_runs_one_pass_on_two_replicas(tmp_path, fashion_mnist_dir):
    """estimator.method=one_pass end to end: mirrored, synchronized BN."""
    import json

    from test_trainer import run_trainer

    model_dir = tmp_path / "run"
    result = run_trainer(
        str(model_dir), fashion_mnist_dir, "--mode=train",
        "--strategy=mirrored", "--cpu_devices=2",
        override="task.dataset=synthetic,train.max_steps=4,train.epochs=1,"
                 "train.checkpoint_every_steps=4,model.use_sync_bn=true,"
                 "estimator.method=one_pass")
    assert result.returncode == 0, result.stderr[-3000:]
    # Batch norm: every variable from the loop, said once.
    assert result.stderr.count("take their estimate from the loop") == 1
    with open(model_dir / "results.json") as f:
        results = json.load(f)
    assert results["num_replicas"] == 2
    assert results["config"]["estimator"]["method"] == "one_pass"
    assert np.isfinite(results["epochs"][-1]["train_loss"])


# Right or loud on the models users write: the five cases of issue 17. The
# references are independent of the one-pass code: the tape's gradient of
# the whole loss (regularization losses included, times the optimizer's loss
# scale) and the loop estimator, each micro-batch its own forward pass.

def _right_or_loud(model, x, y, caplog, optimizer=None, groups=(4, 4),
                   input_signature=None):
    """One compiled step; returns the warning (or None) after checking.

    Every gradient equals the tape's, every estimate the loop's.
    """
    estimator = clars_tf.OnePassGradientNormEstimator(*groups)
    step = tf.function(
        lambda x, y: clars_tf.compute_loss_gradients_and_norms(
            model, _loss, x, y, global_batch_size=len(x),
            optimizer=optimizer, estimator=estimator),
        input_signature=input_signature)
    with caplog.at_level(logging.WARNING, logger=one_pass_norms.__name__):
        out = step(x, y)
    scale = 1.0 if optimizer is None else float(optimizer.scale_loss(1.0))
    with tf.GradientTape() as tape:
        predictions = model(x, training=True)
        loss = tf.reduce_mean(_loss(y, predictions))
        if model.losses:
            loss += tf.add_n(model.losses)
        loss *= scale
    expected = tape.gradient(loss, model.trainable_variables)
    for variable, a, b in zip(model.trainable_variables, out.gradients,
                              expected):
        np.testing.assert_allclose(a, b, rtol=1e-5,
                                   atol=1e-6 * np.max(np.abs(b)),
                                   err_msg=variable.path)
    np.testing.assert_allclose(
        out.gradient_norms,
        clars_tf.GradientNormEstimator(*groups)(model, _loss, x, y),
        rtol=1e-5)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == one_pass_norms.__name__]
    assert len(warnings) <= 1
    return warnings[0] if warnings else None


def _conv_model(layer, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((9, 9, 3)), layer,
                             keras.layers.ReLU(), keras.layers.Flatten(),
                             keras.layers.Dense(3, name="logits")])


def test_kernel_regularizer_enters_the_gradient_not_the_estimate(caplog):
    model = _conv_model(keras.layers.Conv2D(
        4, 3, name="conv", kernel_regularizer=keras.regularizers.L2(0.5)))
    x, y = _images()
    assert _right_or_loud(model, x, y, caplog) is None


def test_activity_regularizer_enters_the_gradient_not_the_estimate(caplog):
    model = _conv_model(keras.layers.Conv2D(
        4, 3, name="conv", activity_regularizer=keras.regularizers.L2(0.1)))
    x, y = _images()
    assert _right_or_loud(model, x, y, caplog) is None


class _RawTiedConv(random_models.TiedConv):
    """Convolves with another Conv2D's kernel read past Keras (the raw
    `tf.Variable`), which the probe cannot see."""

    def call(self, inputs):
        return keras.ops.conv(inputs, self.source.kernel._value,
                              padding="same")


def _tied_model(tied_conv=random_models.TiedConv):
    """A conv whose kernel a second layer convolves with again."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((9, 9, 3))
    conv = keras.layers.Conv2D(3, 3, padding="same", name="conv")
    h = keras.layers.ReLU()(conv(inputs))
    h = tied_conv(conv, name="tied")(h)
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(h))
    return keras.Model(inputs, outputs)


def test_a_kernel_read_outside_its_call_falls_back_before_any_step(caplog):
    warning = _right_or_loud(_tied_model(), *_images(), caplog)
    assert ("conv/kernel of layer 'conv' (Conv2D): its kernel is also read "
            "outside its call (by `") in warning
    assert re.search(r"by `[^`]*/tied[^`]*/convolution`", warning)
    assert "conv/bias of layer 'conv'" in warning
    assert "logits" not in warning


def test_two_layers_holding_one_kernel_fall_back_before_any_step(caplog):
    """Each layer's kernel is read in the other's call, so the probe sends
    both to the loop; no variable is read off the pass by two layers."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    first = keras.layers.Dense(6, name="first")
    second = keras.layers.Dense(6, name="second")
    h = second(keras.layers.ReLU()(first(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))
    second._tracker.unlock()
    second._kernel = first._kernel  # needs Keras's private unlock
    second._tracker.lock()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32).astype("int32")
    estimator = clars_tf.OnePassGradientNormEstimator(4, 4)
    with caplog.at_level(logging.WARNING, logger=one_pass_norms.__name__):
        out = tf.function(
            lambda x, y: clars_tf.compute_loss_gradients_and_norms(
                model, _loss, x, y, global_batch_size=32,
                estimator=estimator))(x, y)
    np.testing.assert_allclose(
        out.gradient_norms,
        clars_tf.GradientNormEstimator(4, 4)(model, _loss, x, y), rtol=1e-5)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == one_pass_norms.__name__]
    assert len(warnings) == 1
    for layer in ("first", "second"):
        assert (f"{layer}/bias of layer '{layer}' (Dense): its kernel is also "
                "read outside its call") in warnings[0]
    assert "logits" not in warnings[0]


class _TiedConvBehindCondition(random_models.TiedConv):
    """Convolves with another Conv2D's kernel when a non-trainable flag is
    set (it is: the tie is used, but only the step could tell)."""

    def build(self, input_shape):
        self.flag = self.add_weight(shape=(), initializer="ones",
                                    trainable=False, name="flag")

    def call(self, inputs):
        return keras.ops.cond(self.flag > 0,
                              lambda: super(type(self), self).call(inputs),
                              lambda: inputs)


def test_a_kernel_read_behind_a_condition_falls_back_before_any_step(caplog):
    warning = _right_or_loud(_tied_model(_TiedConvBehindCondition),
                             *_images(), caplog)
    assert ("conv/kernel of layer 'conv' (Conv2D): its kernel is also read "
            "outside its call") in warning


def test_a_kernel_read_past_keras_is_caught_by_the_check(caplog):
    warning = _right_or_loud(_tied_model(_RawTiedConv), *_images(), caplog)
    # Seen only when the step runs: its check fails for conv's kernel.
    assert ("the gradients of layer(s) conv (conv/kernel, conv/bias) are "
            "not the sums") in warning


def test_a_failed_check_keeps_the_read_variables_on_the_loop(caplog):
    """Caught on the first step, on the loop on the unchecked steps after.
    """
    model = _tied_model(_RawTiedConv)
    estimator = clars_tf.OnePassGradientNormEstimator(4, 4)
    step = tf.function(lambda x, y: clars_tf.compute_loss_gradients_and_norms(
        model, _loss, x, y, global_batch_size=len(x), estimator=estimator))
    with caplog.at_level(logging.WARNING, logger=one_pass_norms.__name__):
        for seed in range(3):
            x, y = _images(seed=seed)
            np.testing.assert_allclose(
                step(x, y).gradient_norms,
                clars_tf.GradientNormEstimator(4, 4)(model, _loss, x, y),
                rtol=1e-5)
    assert int(estimator._check_state(model).estimates.numpy()) == 3
    warnings = [r.getMessage() for r in caplog.records
                if r.name == one_pass_norms.__name__]
    assert len(warnings) == 1 and "conv (conv/kernel" in warnings[0]


def test_steps_between_checks_do_not_compute_them(monkeypatch):
    calls, decomposes = [], group_norms.decomposes

    def counted(*arguments):
        calls.append(arguments[1].name)
        return decomposes(*arguments)

    monkeypatch.setattr(one_pass_norms.group_norms, "decomposes", counted)
    model = _model("conv")
    estimator = clars_tf.OnePassGradientNormEstimator(4, 4, check_every=2)
    x, y = _images()
    for _ in range(3):  # Eager: only the branch taken runs.
        _one_pass(model, x, y, estimator)
    # Three read layers (two convolutions and the logits), on steps 1 and 3.
    assert len(calls) == 2 * 3


@pytest.mark.parametrize("check_every", [0, -1, 2.0, True, "10"])
def test_check_every_must_be_a_positive_integer_or_none(check_every):
    with pytest.raises(ValueError, match="`check_every` must be an integer"):
        clars_tf.OnePassGradientNormEstimator(4, 4, check_every=check_every)


def _per_time_step_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((9, 9, 3)), keras.layers.Reshape((81, 3)),
        random_models.PerRowDense(5, name="per_time_step"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="logits")])


def test_rows_that_are_not_the_examples_fall_back(caplog):
    x, y = _images()
    warning = _right_or_loud(_per_time_step_model(), x, y, caplog)
    assert "layer 'per_time_step_rows' (Dense)" in warning
    assert "leading axis has 2592 rows where the batch has 32" in warning
    assert "logits" not in warning


def _step_of_unknown_batch_size(model, estimator, global_batch_size):
    """The one-pass norms, traced with an unknown batch size."""
    return tf.function(
        lambda x, y: clars_tf.compute_loss_gradients_and_norms(
            model, _loss, x, y, global_batch_size=global_batch_size,
            estimator=estimator).gradient_norms,
        input_signature=[tf.TensorSpec([None, 9, 9, 3]),
                         tf.TensorSpec([None], tf.int32)])


def test_rows_that_are_not_the_examples_with_unknown_batch_size_fail():
    x, y = _images()
    step = _step_of_unknown_batch_size(
        _per_time_step_model(), clars_tf.OnePassGradientNormEstimator(4, 4),
        32)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="layer `per_time_step_rows` is applied"):
        step(x, y)


@pytest.mark.parametrize("optimizer", [
    lambda: clars_tf.CLARS(0.1, loss_scale_factor=128.0),
    lambda: keras.optimizers.LossScaleOptimizer(clars_tf.CLARS(0.1),
                                                initial_scale=64.0),
], ids=["loss_scale_factor", "loss_scale_optimizer"])
def test_the_optimizers_loss_scaling_is_undone(optimizer, caplog):
    model = _model("all")
    optimizer = optimizer()
    optimizer.build(model.trainable_variables)
    x, y = _images()
    assert _right_or_loud(model, x, y, caplog, optimizer=optimizer) is None


def test_a_run_time_batch_too_small_for_the_micro_batches_says_so():
    """Unknown batch size at tracing: the check runs with the step, before
    any gather (on a GPU an out-of-range gather reads zeros)."""
    step = _step_of_unknown_batch_size(
        _model("all"), clars_tf.OnePassGradientNormEstimator(4, 8), 16)
    x, y = _images(n=16)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"needs 8 micro-batches of 4 examples per "
                             r"replica \(32\), more than the batch on this "
                             r"replica: lower `num_micro_batches`"):
        step(x, y)


@pytest.mark.parametrize("block", ["rnn_cell", "map_dense", "scan_dense",
                                   "time_major_dense", "batch_norm"])
def test_issue_25_families_hand_their_variables_to_the_loop(block):
    """Families the property run may not reach early: each compiled step's
    gradients are the tape's and every estimate the loop's, with a warning
    (right or loud); time-major has T == B, the case a row count misses."""
    spec = {"rank": 3, "input_shape": [6, 2], "style": "functional",
            "blocks": [{"block": "dense", "units": 3, "bias": True,
                        "activation": "relu", "kernel_regularizer": None,
                        "bias_regularizer": None,
                        "activity_regularizer": None}, {"block": block}],
            "batch": 6, "micro_batch_size": 2, "num_micro_batches": 3,
            "loss_scale": None, "loss": "crossentropy", "via": "step",
            "eager": False, "seed": 7}
    outcome, details = random_models.check(spec)
    assert outcome == "loud", details
