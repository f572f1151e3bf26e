import keras
import numpy as np
import pytest
import tensorflow as tf

import clars_tf
import random_models
from clars_tf import gradient_norms


def _model(dropout=0.1, seed=0, batch_norm=True):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization() if batch_norm else
        keras.layers.Identity(),
        keras.layers.ReLU(),
        keras.layers.Dropout(dropout),
        keras.layers.Dense(3),
    ])


def _loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6)).astype("float32"),
            rng.integers(0, 3, size=n).astype("int32"))


def _direct_norms(model, x, y, starts, size, weights=None):
    """Micro-batch by micro-batch on a clone, in a plain Python loop."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    totals = np.zeros(len(clone.trainable_variables))
    for start in starts:
        xs, ys = x[start:start + size], y[start:start + size]
        with tf.GradientTape() as tape:
            losses = _loss(ys, clone(xs, training=True))
            if weights is not None:
                losses = losses * weights[start:start + size]
            loss = tf.reduce_mean(losses)
        grads = tape.gradient(loss, clone.trainable_variables)
        totals += [np.linalg.norm(g.numpy().astype(np.float64))
                   for g in grads]
    return totals / len(starts)


def _model_without_dropout():
    return _model(dropout=0.0)


@pytest.mark.parametrize("size, count", [(4, 4), (1, 8), (8, 1)])
def test_matches_direct_computation_and_leaves_state_untouched(size, count):
    # Batch norm needs two examples or more (see the test below).
    model = _model(dropout=0.0, batch_norm=size > 1)
    x, y = _data()
    state = [v.numpy().copy() for v in model.non_trainable_variables]
    estimator = clars_tf.GradientNormEstimator(size, count)
    norms = tf.function(lambda x, y: estimator(model, _loss, x, y))(x, y)
    stride = 32 // count
    want = _direct_norms(model, x, y, range(0, 32, stride)[:count], size)
    np.testing.assert_allclose([float(n) for n in norms], want, rtol=1e-5,
                               atol=1e-6)
    for before, variable in zip(state, model.non_trainable_variables):
        np.testing.assert_array_equal(before, variable.numpy())


def test_sample_weights_weight_the_micro_batch_losses():
    model = _model_without_dropout()
    x, y = _data()
    weights = np.linspace(0.0, 2.0, 32).astype("float32")
    estimator = clars_tf.GradientNormEstimator(4, 2)
    norms = estimator(model, _loss, x, y, weights)
    want = _direct_norms(model, x, y, [0, 16], 4, weights)
    np.testing.assert_allclose([float(n) for n in norms], want, rtol=1e-5)


def test_dropout_and_seed_state_untouched():
    model = _model()
    x, y = _data()
    state = [v.numpy().copy() for v in model.non_trainable_variables]
    clars_tf.GradientNormEstimator(4, 4)(model, _loss, x, y)
    for before, variable in zip(state, model.non_trainable_variables):
        np.testing.assert_array_equal(before, variable.numpy())


def test_loop_is_a_graph_loop_not_unrolled():
    model = _model_without_dropout()
    x, y = _data(64)

    def op_count(count):
        estimator = clars_tf.GradientNormEstimator(2, count)
        graph = tf.function(
            lambda x, y: estimator(model, _loss, x, y)
        ).get_concrete_function(x, y).graph
        return len(graph.get_operations()), {
            op.type for op in graph.get_operations()}

    few, types = op_count(2)
    many, _ = op_count(16)
    assert types & {"While", "StatelessWhile"}
    assert few == many


def test_micro_batches_must_fit_the_batch():
    model = _model_without_dropout()
    x, y = _data(16)
    estimator = clars_tf.GradientNormEstimator(8, 4)
    with pytest.raises(ValueError, match="num_micro_batches"):
        estimator(model, _loss, x, y)


def test_share_per_replica():
    estimator = clars_tf.GradientNormEstimator(8, 64)
    assert estimator.micro_batches_per_replica(1) == 64
    assert estimator.micro_batches_per_replica(8) == 8
    assert estimator.micro_batches_per_replica(128) == 1
    with pytest.raises(ValueError, match="multiple of the number of replicas"):
        estimator.micro_batches_per_replica(3)


@pytest.mark.parametrize("name", ["micro_batch_size", "num_micro_batches",
                                  "refresh_every"])
@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_bad_arguments_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        clars_tf.GradientNormEstimator(**{name: value})


def test_synchronized_batch_norm_uses_micro_batch_statistics(two_replicas):
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(4),
        keras.layers.BatchNormalization(synchronized=True),
        keras.layers.Dense(3)])
    x, y = _data(16)
    strategy = two_replicas
    estimator = clars_tf.GradientNormEstimator(4, 2)

    @tf.function
    def run(x, y):
        return strategy.run(lambda a, b: tf.stack(estimator(model, _loss, a,
                                                            b)),
                            args=(x, y))

    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: (x[ctx.replica_id_in_sync_group * 8:][:8],
                     y[ctx.replica_id_in_sync_group * 8:][:8]))
    values = strategy.experimental_local_results(run(*per_replica))
    plain = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(4),
        keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    plain.set_weights(model.get_weights())
    for replica, value in enumerate(values):
        # Replica r's single micro-batch is examples 8r .. 8r + 3.
        want = _direct_norms(plain, x, y, [8 * replica], 4)
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-6)
    assert model.layers[1].synchronized


def test_micro_batches_start_at_the_same_examples_for_any_replica_count(
        two_replicas):
    # J = 4 does not divide B = 66: micro-batch j starts at floor(j * 66 / 4)
    # = 0, 16, 33, 49 on one device, and on two replicas of 33 examples.
    model = _model_without_dropout()
    x, y = _data(66)
    estimator = clars_tf.GradientNormEstimator(4, 4)
    want = _direct_norms(model, x, y, [0, 16, 33, 49], 4)
    one = tf.function(lambda x, y: estimator(model, _loss, x, y))(x, y)
    np.testing.assert_allclose([float(n) for n in one], want, rtol=1e-5,
                               atol=1e-6)
    per_replica = two_replicas.experimental_distribute_values_from_function(
        lambda ctx: (x[ctx.replica_id_in_sync_group * 33:][:33],
                     y[ctx.replica_id_in_sync_group * 33:][:33]))
    two = two_replicas.run(
        tf.function(lambda a, b: tf.stack(estimator(model, _loss, a, b))),
        args=per_replica)
    mean = np.mean([v.numpy() for v in
                    two_replicas.experimental_local_results(two)], axis=0)
    np.testing.assert_allclose(mean, want, rtol=1e-5, atol=1e-6)


def test_single_examples_with_batch_norm_are_rejected():
    x, y = _data()
    estimator = clars_tf.GradientNormEstimator(1, 8)
    with pytest.raises(ValueError, match="micro_batch_size=1.*batch "
                                         "normalization.*>= 2"):
        estimator(_model_without_dropout(), _loss, x, y)


def test_loss_scale_keeps_float16_micro_batch_gradients_from_underflowing():
    def tiny_loss(y_true, y_pred):
        # Gradients of about 1e-8 per logit: below float16's smallest
        # subnormal (6e-8) unless the loss is scaled.
        return 1e-7 * _loss(y_true, tf.cast(y_pred, "float32"))

    x, y = _data(32)
    exact = _model(dropout=0.0, batch_norm=False)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = _model(dropout=0.0, batch_norm=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    half.set_weights(exact.get_weights())
    estimator = clars_tf.GradientNormEstimator(4, 4)
    want = np.array([float(n) for n in estimator(exact, tiny_loss, x, y)])
    unscaled = np.array([float(n) for n in estimator(half, tiny_loss, x, y)])
    scaled = np.array([float(n) for n in estimator(
        half, tiny_loss, x, y, loss_scale=tf.constant(2.0 ** 15))])
    assert np.all(want > 0)
    assert np.max(np.abs(unscaled / want - 1)) > 0.5  # the underflow
    np.testing.assert_allclose(scaled, want, rtol=2e-2)


@pytest.mark.parametrize("loop", ["scan", "rnn_cell"])
def test_one_example_at_a_time_through_a_models_while_loop(loop):
    """s = 1 on a model running a while loop: pfor vectorized `scan` when
    tracing and failed when it ran (its tensor lists), so such a model
    takes one example at a time."""
    keras.utils.set_random_seed(0)
    layer = (random_models.MapDense(4, "scan") if loop == "scan" else
             keras.layers.RNN(random_models.DenseCell(4),
                              return_sequences=True))
    model = keras.Sequential([keras.Input((5, 3)), layer,
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 5, 3)).astype("float32")
    y = rng.integers(0, 3, size=10).astype("int32")
    estimator = clars_tf.GradientNormEstimator(1, 2)
    np.testing.assert_allclose(
        tf.function(lambda x, y: estimator(model, _loss, x, y))(x, y),
        random_models.loop_estimate(model, x, y, 1, 2, _loss), rtol=1e-5)
