"""Bad input, faults and numerics: clear errors, nothing lost."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from test_trainer import CONFIG, REPO, SMALL, checkpoint_values, run_trainer, \
    trainer_command

SYNTHETIC = "task.dataset=synthetic,train.max_steps=4,train.checkpoint_every_steps=4"


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, fashion_mnist_dir):
    """A short CLARS run on synthetic data, with a checkpoint at step 4."""
    model_dir = str(tmp_path_factory.mktemp("trained") / "run")
    result = run_trainer(model_dir, fashion_mnist_dir, "--mode=train",
                         override=SYNTHETIC)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_OVERRIDES = [
    ("train.epochz=3", "Did you mean 'epochs'"),
    ("traing.epochs=3", "Unknown config key 'traing'"),
    ("train.epochs=three", "'train.epochs' must be a int"),
    ("model.use_sync_bn=5", "'model.use_sync_bn' must be a bool"),
    ("train.epochs=3,oops", "'oops' is not key=value"),
    ("train.epochs={a: [}", "cannot parse the value of 'train.epochs'"),
    ("model.name=resnet21", "Did you mean 'resnet20'"),
    ("optimizer.name=adamw", "Choose one of clars, lars, sgd, lamb"),
    ("task.dataset=fashion_mnst", "Did you mean 'fashion_mnist'"),
    ("model.options={alpha: 0.5}", "'model.options.alpha': not an option"),
    ("estimator.num_micro_batches=16", "Lower `num_micro_batches`"),
    ("optimizer.warmup_epochs=1000.0", "must be shorter than train.epochs"),
    ("optimizer.base_learning_rate=-1", "'optimizer.base_learning_rate'"),
    ("optimizer.momentum=1.5", "'optimizer.momentum': must be in [0, 1)"),
    ("task.image_size=16", "'task.image_size': must be >= 32"),
    ("train.global_batch_size=100000", "larger than the 60000 training"),
    ("train.on_nonfinite=ignore", "'train.on_nonfinite'"),
    ("estimator.micro_batch_size=1", "'estimator.micro_batch_size': must be "
                                     ">= 2 for resnet8: it uses batch"),
    ("estimator.method=ghost", "'estimator.method': unknown method"),
]


def _main_error(*flags):
    """Runs the trainer's main in this process; returns its exit message.

    Config errors are raised before TensorFlow does any work, so running
    them in-process keeps these tests fast; `test_config_error_from_the_
    command_line` checks one of them as a real process.
    """
    from clars_tf.trainers import train

    train.FLAGS.unparse_flags()
    train.FLAGS(["train", *flags])
    with pytest.raises(SystemExit) as exit_info:
        train.main([])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ")
    return message


@pytest.mark.parametrize("override, message", BAD_OVERRIDES)
def test_bad_config_values(tmp_path, override, message):
    error = _main_error(f"--config_file={CONFIG}",
                        f"--model_dir={tmp_path / 'run'}",
                        f"--params_override={SMALL},{override}")
    assert message in error
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_config_error_from_the_command_line(tmp_path, fashion_mnist_dir):
    _assert_clear_failure(run_trainer(
        str(tmp_path / "run"), fashion_mnist_dir, override="train.epochz=3",
        timeout=300), "Did you mean 'epochs'")


def _assert_clear_failure(result, message):
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content, message", [
    ("train:\n  epochs: [1,\n", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping of sections"),
    (None, "does not exist"),
])
def test_bad_config_files(tmp_path, content, message):
    path = (_write(tmp_path, "bad.yaml", content) if content is not None
            else str(tmp_path / "missing.yaml"))
    assert message in _main_error(f"--config_file={path}",
                                  f"--model_dir={tmp_path / 'run'}")


def test_export_directory_that_is_a_file(tmp_path, fashion_mnist_dir):
    target = _write(tmp_path, "export", "not a directory")
    result = run_trainer(str(tmp_path / "run"), fashion_mnist_dir,
                         f"--export_dir={target}", override=SYNTHETIC)
    _assert_clear_failure(result, "exists and is a file")
    assert open(target).read() == "not a directory"
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_model_dir_that_is_a_file(tmp_path, fashion_mnist_dir):
    target = _write(tmp_path, "run", "x")
    result = run_trainer(target, fashion_mnist_dir, override=SYNTHETIC)
    _assert_clear_failure(result, "model_dir")


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet20", "does not match this config's model"),
    ("optimizer.name=lars", "does not match this config's model"),
])
def test_checkpoint_of_another_model_or_optimizer(tmp_path, trained_dir,
                                                  fashion_mnist_dir, override,
                                                  message):
    model_dir = str(tmp_path / "copy")
    shutil.copytree(trained_dir, model_dir)
    before = checkpoint_values(model_dir)
    result = run_trainer(model_dir, fashion_mnist_dir, "--mode=eval",
                         override=f"{SYNTHETIC},{override}")
    _assert_clear_failure(result, message)
    after = checkpoint_values(model_dir)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_eval_without_checkpoint(tmp_path, fashion_mnist_dir):
    _assert_clear_failure(run_trainer(
        str(tmp_path / "run"), fashion_mnist_dir, "--mode=eval",
        override=SYNTHETIC), "No checkpoint")


def test_unreachable_tpu_fails_fast(tmp_path, fashion_mnist_dir):
    start = time.time()
    _assert_clear_failure(run_trainer(
        str(tmp_path / "run"), fashion_mnist_dir, "--strategy=tpu",
        override=SYNTHETIC), "no TPU is reachable")
    assert time.time() - start < 60


def test_corrupt_tfrecord(tmp_path, fashion_mnist_dir):
    data_dir = str(tmp_path / "data")
    shutil.copytree(fashion_mnist_dir, data_dir)
    for root, _, files in os.walk(data_dir):
        for name in files:
            if "train.tfrecord" in name:
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
    result = run_trainer(str(tmp_path / "run"), data_dir, override=(
        "train.max_steps=4,train.global_batch_size=2048,"
        "estimator.num_micro_batches=4"))
    _assert_clear_failure(result, "corrupt")


def test_second_trainer_on_the_same_model_dir_is_refused(tmp_path,
                                                         fashion_mnist_dir):
    model_dir = str(tmp_path / "run")
    first = subprocess.Popen(
        trainer_command(model_dir, fashion_mnist_dir, "--mode=train",
                        override="task.dataset=synthetic,train.max_steps=200"),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(model_dir, ".lock-chief")):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        second = run_trainer(model_dir, fashion_mnist_dir, "--mode=train",
                             override=SYNTHETIC, timeout=300)
        _assert_clear_failure(second, "Another trainer is already using")
    finally:
        first.kill()
        first.wait()


def test_nonfinite_gradients_stop_with_the_step_and_variable(
        tmp_path, fashion_mnist_dir):
    model_dir = str(tmp_path / "run")
    result = run_trainer(model_dir, fashion_mnist_dir, "--mode=train",
                         override=("task.dataset=synthetic,optimizer.name=sgd,"
                                   "optimizer.base_learning_rate=1e30,"
                                   "train.max_steps=8,"
                                   "train.checkpoint_every_steps=4"))
    _assert_clear_failure(result, "Non-finite gradient or gradient-norm "
                                  "estimate at step")
    assert "first in variable 'conv1_conv/kernel'" in result.stderr
    assert not os.path.exists(os.path.join(model_dir, "checkpoints",
                                           "ckpt-8.index"))


def test_nonfinite_steps_are_skipped_when_asked(tmp_path, fashion_mnist_dir):
    model_dir = str(tmp_path / "run")
    result = run_trainer(model_dir, fashion_mnist_dir, "--mode=train",
                         override=("task.dataset=synthetic,optimizer.name=sgd,"
                                   "optimizer.base_learning_rate=1e30,"
                                   "train.max_steps=8,train.on_nonfinite=skip,"
                                   "train.checkpoint_every_steps=8"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipped" in result.stderr
    values = checkpoint_values(model_dir)
    assert all(np.all(np.isfinite(v)) for v in values.values()
               if v.dtype.kind == "f")
    assert int(values["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"]) == 8


def test_same_seed_gives_bit_identical_weights(tmp_path, fashion_mnist_dir):
    runs = []
    for name in ("a", "b"):
        model_dir = str(tmp_path / name)
        result = run_trainer(model_dir, fashion_mnist_dir, "--mode=train",
                             override=SYNTHETIC)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(checkpoint_values(model_dir))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_labels_outside_the_classes_stop_the_step(tmp_path):
    import clars_tf
    from clars_tf.trainers import config as config_lib
    from clars_tf.trainers import train

    config = config_lib.build_config(CONFIG, f"{SMALL},task.dataset=synthetic")
    strategy = tf.distribute.get_strategy()
    trainer = train.Trainer(config, strategy, str(tmp_path), None,
                            estimator=clars_tf.GradientNormEstimator(8, 4))
    batch = (tf.zeros([64, 32, 32, 3]), tf.fill([64], 12))
    iterator = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(batch).repeat()))
    before = [v.numpy() for v in trainer.model.variables]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="A label is >= 10, the number of classes"):
        trainer._make_train_loop()(iterator, tf.constant(1))
    after = [v.numpy() for v in trainer.model.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def _tiny_export(tmp_path, monkeypatch=None, fail=False):
    import keras

    from clars_tf.trainers import export

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10)])
    if fail:
        real_save = tf.saved_model.save

        def save_then_die(obj, path, **kwargs):
            real_save(obj, path, **kwargs)
            os.remove(os.path.join(path, "saved_model.pb"))
            raise KeyboardInterrupt("killed half-way")

        monkeypatch.setattr(tf.saved_model, "save", save_then_die)
    return export.export(model, "synthetic", 32, str(tmp_path / "export"))


def test_interrupted_export_keeps_the_previous_one(tmp_path, monkeypatch):
    path = _tiny_export(tmp_path)
    images = tf.zeros([2, 32, 32, 3], tf.uint8)
    want = tf.saved_model.load(path).signatures["serving_default"](
        images=images)["probabilities"].numpy()
    with pytest.raises(KeyboardInterrupt):
        _tiny_export(tmp_path, monkeypatch, fail=True)
    got = tf.saved_model.load(path).signatures["serving_default"](
        images=images)["probabilities"].numpy()
    np.testing.assert_array_equal(want, got)
    assert os.listdir(tmp_path) == ["export"]


def test_export_moved_aside_by_a_crash_is_put_back(tmp_path):
    from clars_tf.trainers import export

    path = _tiny_export(tmp_path)
    images = tf.zeros([2, 32, 32, 3], tf.uint8)
    want = tf.saved_model.load(path).signatures["serving_default"](
        images=images)["probabilities"].numpy()
    os.rename(path, f"{path}.previous-12345")  # crash between the renames
    export.check_destination(path)
    got = tf.saved_model.load(path).signatures["serving_default"](
        images=images)["probabilities"].numpy()
    np.testing.assert_array_equal(want, got)
    assert sorted(os.listdir(tmp_path)) == ["export"]
