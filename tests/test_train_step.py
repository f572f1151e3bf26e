"""The trainer's step in-process: loss scaling, SGD decay, replicas' state.

Each test builds `trainers.train.Trainer` on the synthetic data set and runs
its train loop for a few steps on fixed batches, against an independent run
(float32, or one device over the same global batch).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_trainer import CONFIG, SMALL
from clars_tf.trainers import builders
from clars_tf.trainers import config as config_lib
from clars_tf.trainers import train

GLOBAL_BATCH = 64


@pytest.fixture(autouse=True)
def float32_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _batches(steps, seed=0, nan_last=False, batch=GLOBAL_BATCH):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.7, 1.7, size=(steps * batch, 32, 32, 3))
    if nan_last:
        images[-batch:] = np.nan
    labels = rng.integers(0, 10, size=steps * batch)
    return tf.data.Dataset.from_tensor_slices(
        (images.astype("float32"), labels.astype("int32"))).batch(batch)


def _train(model_dir, strategy, override, steps, nan_last=False):
    """A Trainer after `steps` steps, and how many of them were skipped."""
    config = config_lib.build_config(
        CONFIG, f"{SMALL},task.dataset=synthetic,{override}")
    estimator = config_lib.check_against_strategy(
        config, strategy.num_replicas_in_sync)
    trainer = train.Trainer(config, strategy, str(model_dir), None,
                            estimator=estimator)
    iterator = iter(strategy.experimental_distribute_dataset(
        _batches(steps, nan_last=nan_last,
                 batch=config["train"]["global_batch_size"])))
    outputs = trainer._make_train_loop()(iterator, tf.constant(steps))
    return trainer, int(outputs[4])


def _trainable(trainer):
    return [v.numpy() for v in trainer.model.trainable_variables]


def _initial(override):
    config = config_lib.build_config(
        CONFIG, f"{SMALL},task.dataset=synthetic,{override}")
    keras.utils.set_random_seed(config["train"]["seed"])
    return [v.numpy() for v in builders.model(config).trainable_variables]


@pytest.mark.parametrize("optimizer, two_replicas_for_float16", [
    ("optimizer.name=clars", True),
    ("optimizer.name=clars,estimator.method=one_pass", False),
    # A large coupled decay, so that losing it would show.
    ("optimizer.name=sgd,optimizer.weight_decay_rate=0.5", False),
])
def test_mixed_float16_steps_follow_the_float32_steps(
        tmp_path, optimizer, two_replicas_for_float16, request):
    # Two steps, then one on NaN images: float32 stops there, float16
    # skips it and halves the loss scale only. Half the other tests' batch
    # (still J * s), as float16 convolutions are slow on a CPU, and twice
    # their base rate, for the same learning rate.
    optimizer += (",train.global_batch_size=32,"
                  "optimizer.base_learning_rate=0.2")
    steps = 3
    default = tf.distribute.get_strategy()
    want, skipped = _train(tmp_path / "float32", default, optimizer, steps,
                           nan_last=True)
    assert skipped == 1 and int(want.optimizer.iterations.numpy()) == steps
    strategy = (request.getfixturevalue("two_replicas")
                if two_replicas_for_float16 else default)
    got, skipped = _train(tmp_path / "float16", strategy,
                          f"{optimizer},train.precision=mixed_float16",
                          steps, nan_last=True)
    assert skipped == 1 and int(got.optimizer.iterations.numpy()) == steps
    assert got.loss_scaled and got.model.layers[1].compute_dtype == "float16"
    assert float(got.optimizer.dynamic_scale.numpy()) == (
        got.optimizer.initial_scale / 2)
    start = _initial(optimizer)
    moved = max(np.max(np.abs(w - s)) for w, s in zip(_trainable(want),
                                                      start))
    apart = max(np.max(np.abs(w - g)) for w, g in zip(_trainable(want),
                                                      _trainable(got)))
    assert moved > 1e-2
    # float16 activations: the two runs agree to a few percent of a step.
    assert apart < 0.05 * moved, (apart, moved)


def test_replicas_keep_one_set_of_moving_statistics(tmp_path, two_replicas):
    # Batch norm not synchronized (every shipped config): each replica
    # normalizes by its own half of the batch and updates the moving
    # statistics from it; the trainer keeps their mean on every replica.
    override = "optimizer.name=clars,model.use_sync_bn=false"
    two, _ = _train(tmp_path / "two", two_replicas, override, steps=1)
    # Expected: one forward pass per half on a single device from the same
    # initial weights, the two updated statistics averaged.
    config = config_lib.build_config(
        CONFIG, f"{SMALL},task.dataset=synthetic,{override}")
    images, _ = next(iter(_batches(1)))
    halves = []
    for half in range(2):
        keras.utils.set_random_seed(config["train"]["seed"])
        model = builders.model(config)
        model(images[half * 32:(half + 1) * 32], training=True)
        halves.append({v.path: v.numpy()
                       for v in model.non_trainable_variables})
    statistics = [v for v in two.model.non_trainable_variables
                  if "moving_" in v.path]
    assert statistics
    for variable in statistics:
        copies = two_replicas.experimental_local_results(variable.value)
        np.testing.assert_array_equal(copies[0], copies[1])
        want = (halves[0][variable.path] + halves[1][variable.path]) / 2
        np.testing.assert_allclose(copies[0], want, rtol=1e-5, atol=1e-7)
    # The first layer's inputs do not depend on the split: there the mean
    # is the one a single device computes from the global batch.
    keras.utils.set_random_seed(config["train"]["seed"])
    model = builders.model(config)
    model(images, training=True)
    first = statistics[0]
    assert "moving_mean" in first.path
    single = {v.path: v.numpy() for v in model.non_trainable_variables}
    assert np.max(np.abs(single[first.path])) > 1e-3
    np.testing.assert_allclose(first.numpy(), single[first.path], rtol=1e-5,
                               atol=1e-8)


def test_float64_replicas_agree_with_one_device_beyond_float32_rounding(
        tmp_path, two_replicas):
    # train.precision=float64 tells rounding from a bug: in float32 one and
    # two replicas differ by ~1e-7 after a step, in float64 by ~1e-14, plus
    # ~1e-7 of a step where the float32 estimates set the trust ratio.
    override = "optimizer.name=clars,model.use_sync_bn=true,"
    override += "train.precision=float64"
    one, _ = _train(tmp_path / "one", tf.distribute.get_strategy(), override,
                    steps=1)
    two, _ = _train(tmp_path / "two", two_replicas, override, steps=1)
    assert all(v.dtype == "float64" for v in one.model.trainable_variables)
    start = _initial(override)
    assert max(np.max(np.abs(v.numpy() - s)) for v, s in zip(
        one.model.trainable_variables, start)) > 1e-3
    pairs = list(zip(one.model.variables + one.optimizer.variables,
                     two.model.variables + two.optimizer.variables))
    for a, b in pairs:
        # The estimates stay float32 (norms are taken in float32).
        atol = 1e-10 if a.dtype == "float64" else 0.0
        rtol = 0.0 if a.dtype == "float64" else 1e-6
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=rtol,
                                   atol=atol, err_msg=a.path)
