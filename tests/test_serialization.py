"""Optimizer state survives `.keras` files and `tf.train.Checkpoint`."""

import os

import keras
import numpy as np
import tensorflow as tf

import clars_tf


def _trained_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(8), keras.layers.ReLU(),
        keras.layers.Dense(2)])
    schedule = clars_tf.schedules.build_schedule(0.5, 100)
    model.compile(optimizer=clars_tf.CLARS(schedule, weight_decay_rate=1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(4, 4))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.integers(0, 2, 64)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    return model


def _state(optimizer):
    """Optimizer variables by position (names carry the model's name)."""
    return [v.numpy() for v in optimizer.variables]


def test_keras_file_restores_optimizer_slots(tmp_path):
    model = _trained_model()
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, clars_tf.CLARS)
    want, got = _state(model.optimizer), _state(restored.optimizer)
    # iterations, 4 momentums, the estimates and the step they were set for
    assert len(want) == len(got) == 7
    assert int(got[0]) == 4
    assert np.any(got[-2] > 0)
    assert int(got[-1]) == 3
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_restores_optimizer_slots(tmp_path):
    model = _trained_model()
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    keras.utils.set_random_seed(1)
    fresh = keras.models.clone_model(model)
    optimizer = clars_tf.CLARS.from_config(model.optimizer.get_config())
    optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=optimizer).restore(prefix)
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    want, got = _state(model.optimizer), _state(optimizer)
    assert int(got[0]) == 4 and np.any(got[-2] > 0) and int(got[-1]) == 3
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_keras_file_from_version_0_1_0_restores_its_momentum():
    # Written by clars-tf 0.1.0 (commit 63067e2^, before gradient_norms_step):
    # Dense(3) on 4 inputs, CLARS(0.1), one apply with all-ones gradients
    # and estimates, so each momentum is 0.9 * 0 + 1 = 1 everywhere.
    restored = keras.models.load_model(
        os.path.join(os.path.dirname(__file__), "data",
                     "clars_0.1.0_dense.keras"))
    optimizer = restored.optimizer
    assert int(optimizer.iterations.numpy()) == 1
    momentums = [v.numpy() for v in optimizer.variables
                 if v.path.endswith("_momentum")]
    assert [m.shape for m in momentums] == [(4, 3), (3,)]
    for momentum in momentums:
        np.testing.assert_array_equal(momentum, 1.0)
    np.testing.assert_array_equal(
        optimizer.gradient_norm_estimates.numpy(), [1.0, 1.0])
    assert int(optimizer.gradient_norms_step.numpy()) == -1
