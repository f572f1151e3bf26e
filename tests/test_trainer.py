"""End-to-end trainer runs, each in its own process as users run it."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist_resnet8_clars.yaml")
# Small and quick: 64 examples per step, 4 micro-batches of 8.
SMALL = ("train.global_batch_size=64,estimator.num_micro_batches=4,"
         "optimizer.base_learning_rate=0.1,"
         "train.steps_per_loop=4,train.deterministic=true,"
         "train.eval_batch_size=2000")


def trainer_command(model_dir, data_dir, *flags, override=""):
    overrides = ",".join(o for o in (SMALL, override) if o)
    return [sys.executable, "-m", "trainers.train", f"--config_file={CONFIG}",
            f"--model_dir={model_dir}", f"--data_dir={data_dir}",
            f"--params_override={overrides}", *flags]


def run_trainer(model_dir, data_dir, *flags, override="", timeout=600,
                env=None):
    result = subprocess.run(
        trainer_command(model_dir, data_dir, *flags, override=override),
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    return result


def step_records(model_dir):
    with open(os.path.join(model_dir, "steps.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_values(model_dir):
    """Every saved variable of the latest checkpoint, by checkpoint key."""
    latest = tf.train.latest_checkpoint(os.path.join(model_dir,
                                                     "checkpoints"))
    reader = tf.train.load_checkpoint(latest)
    return {name: reader.get_tensor(name)
            for name, _ in tf.train.list_variables(latest)
            if name.endswith("VARIABLE_VALUE")}


def max_difference(a, b):
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) -
                                   b[k].astype(np.float64)))) for k in a)


def test_train_eval_export_writes_everything(tmp_path, fashion_mnist_dir):
    model_dir = str(tmp_path / "run")
    result = run_trainer(model_dir, fashion_mnist_dir, override=(
        "train.max_steps=8,train.checkpoint_every_steps=4,"
        "train.diagnostics_every_steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    # The console: one line per loop of 4 steps, the eval line, the summary;
    # no TensorFlow, absl or tfds INFO lines.
    lines = result.stdout.splitlines()
    assert [line.split(" epoch")[0] for line in lines
            if line.startswith("step ")] == ["step 4/8", "step 8/8"]
    assert re.search(r"^step 8/8 epoch 0\.01 loss \d\.\d{4} accuracy "
                     r"\d\.\d{4} lr [\d.e-]+ \d+ images/s ETA 0s$",
                     result.stdout, re.M)
    assert re.search(r"^epoch 1 eval loss \d\.\d{4} accuracy \d\.\d{4} "
                     r"\(training \d+\.\ds, evaluation \d+\.\ds; "
                     r"epoch \d+\.\ds\)$",
                     result.stdout, re.M)
    # steps.jsonl: the console's step lines, unrounded.
    records = step_records(model_dir)
    assert [r["step"] for r in records] == [4, 8]
    for record, line in zip(records, [line for line in lines
                                      if line.startswith("step ")]):
        assert set(record) == {"step", "epoch", "loss", "accuracy",
                               "learning_rate", "skipped_steps",
                               "images_per_second"}
        assert line.startswith(
            f"step {record['step']}/8 epoch {record['epoch']:.2f} loss "
            f"{record['loss']:.4f} accuracy {record['accuracy']:.4f} lr "
            f"{record['learning_rate']:.4g} ")
        # 64 examples a step, 4 steps a line: accuracy in 1/256 steps.
        assert (256 * record["accuracy"]) == pytest.approx(
            round(256 * record["accuracy"]), abs=1e-6)
        assert record["skipped_steps"] == 0
    assert json.loads(result.stdout[result.stdout.index("{"):])["final"]
    assert not re.search(r"^(I\d{4} |INFO)", result.stderr, re.M), (
        result.stderr[:3000])
    assert "fashion_mnist" not in result.stderr
    assert os.path.exists(os.path.join(model_dir, "checkpoints",
                                       "ckpt-8.index"))
    for sub in ("train", "eval"):
        assert any(f.startswith("events.out.tfevents")
                   for f in os.listdir(os.path.join(model_dir, sub)))
    with open(os.path.join(model_dir, "results.json")) as f:
        results = json.load(f)
    assert results["config"]["optimizer"]["name"] == "clars"
    assert results["epochs"][-1]["step"] == 8
    assert 0.0 <= results["final"]["eval_accuracy"] <= 1.0
    diagnostics = [json.loads(line) for line in open(
        os.path.join(model_dir, "diagnostics.jsonl"))]
    assert [d["step"] for d in diagnostics] == [4, 8]
    ratios = [v["trust_ratio"] for v in diagnostics[0]["layers"].values()]
    assert max(ratios) <= 1.0 and min(ratios) > 0
    assert all(v["noise_ratio"] >= 1.0 - 1e-3  # a_l >= ||g_l|| (triangle)
               for v in diagnostics[0]["layers"].values()
               if v["noise_ratio"] > 0)
    for v in diagnostics[0]["layers"].values():
        assert v["weight_norm"] >= 0 and v["gradient_norm"] > 0
        np.testing.assert_allclose(v["noise_ratio"],
                                   v["estimate"] / v["gradient_norm"],
                                   rtol=1e-4)

    # The SavedModel, loaded with TensorFlow alone, predicts what the
    # checkpointed model predicts on raw test images.
    import tensorflow_datasets as tfds

    from clars_tf.trainers import builders, config as config_lib, data
    images, _ = next(iter(tfds.load(
        "fashion_mnist", split="test[:64]", data_dir=fashion_mnist_dir,
        as_supervised=True, batch_size=64, download=False)))
    served = tf.saved_model.load(os.path.join(model_dir, "export"))
    probabilities = served.signatures["serving_default"](
        images=images)["probabilities"].numpy()
    config = config_lib.build_config(CONFIG, SMALL)
    model = builders.model(config)
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(
        os.path.join(model_dir, "checkpoints"))).expect_partial()
    eval_batch = next(iter(data.build_dataset(
        "fashion_mnist", "test[:64]", data_dir=fashion_mnist_dir,
        global_batch_size=64, is_training=False, image_size=32, seed=0)))
    expected = tf.nn.softmax(model(eval_batch[0], training=False)).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert probabilities.shape == (64, 10)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"images must be uint8 \[N, 28, 28, 1\]"):
        served.signatures["serving_default"](
            images=tf.zeros([1, 32, 32, 3], tf.uint8))
    one = served.signatures["serving_default"](images=images[:1])
    np.testing.assert_allclose(one["probabilities"][0], expected[0],
                               atol=1e-5)


# Generated data without augmentation has no exact ties (Fashion-MNIST's
# constant background and the pad-crop borders make ReLU masks flip on
# rounding-level differences), so one and two replicas agree to float32
# rounding for the first steps. Training then amplifies those rounding
# differences (measured: 7e-7 after 2 steps, 3e-6 after 5, ~1e-3 after 10),
# so the comparison stops at 5 steps.
DISTRIBUTED = ("task.dataset=synthetic,train.max_steps=5,"
               "train.checkpoint_every_steps=5,model.use_sync_bn=true,"
               "train.epochs=1")


def test_mirrored_matches_one_device(tmp_path, fashion_mnist_dir):
    runs = {}
    for name, flags in (("one", ["--strategy=one_device"]),
                        ("two", ["--strategy=mirrored", "--cpu_devices=2"])):
        model_dir = str(tmp_path / name)
        result = run_trainer(model_dir, fashion_mnist_dir, "--mode=train",
                             *flags, override=DISTRIBUTED)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = checkpoint_values(model_dir)
    with open(os.path.join(tmp_path / "two", "results.json")) as f:
        assert json.load(f)["num_replicas"] == 2
    assert max_difference(runs["one"], runs["two"]) <= 1e-4
    step = runs["one"]["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"]
    assert int(step) == 5


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_match_a_single_process(tmp_path, fashion_mnist_dir):
    model_dir = str(tmp_path / "workers")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = [
        subprocess.Popen(
            trainer_command(model_dir, fashion_mnist_dir, "--mode=train",
                            "--strategy=multi_worker_mirrored",
                            override=DISTRIBUTED),
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                 "TF_CONFIG": json.dumps({"cluster": cluster, "task": {
                     "type": "worker", "index": index}})})
        for index in range(2)]
    try:
        errors = [worker.communicate(timeout=600)[1] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, error in zip(workers, errors):
        assert worker.returncode == 0, error[-3000:]
    single_dir = str(tmp_path / "single")
    result = run_trainer(single_dir, fashion_mnist_dir, "--mode=train",
                         "--strategy=one_device", override=DISTRIBUTED)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(model_dir, "results.json")) as f:
        results = json.load(f)
    assert results["strategy"] == "multi_worker_mirrored"
    assert results["num_replicas"] == 2
    assert max_difference(checkpoint_values(model_dir),
                          checkpoint_values(single_dir)) <= 1e-4


def test_sigkill_then_rerun_resumes_to_the_same_weights(tmp_path,
                                                        fashion_mnist_dir):
    override = "train.max_steps=16,train.checkpoint_every_steps=4"
    reference_dir = str(tmp_path / "uninterrupted")
    # --verbosity brings the INFO lines back (here tfds's).
    result = run_trainer(reference_dir, fashion_mnist_dir, "--mode=train",
                         "--verbosity=0", override=override)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^I\d{4} .*fashion_mnist", result.stderr, re.M)

    model_dir = str(tmp_path / "killed")
    process = subprocess.Popen(
        trainer_command(model_dir, fashion_mnist_dir, "--mode=train",
                        override=override),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(model_dir, "checkpoints", "ckpt-4.index")
    deadline = time.time() + 300
    while not os.path.exists(first) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(
        os.path.join(model_dir, "checkpoints", "ckpt-16.index"))

    result = run_trainer(model_dir, fashion_mnist_dir, "--mode=train",
                         override=override)
    assert result.returncode == 0, result.stderr[-3000:]
    # It resumed, not restarted.
    assert re.search(r"steps (4|8|12)\.\.16\.", result.stdout), result.stdout
    assert max_difference(checkpoint_values(reference_dir),
                          checkpoint_values(model_dir)) == 0.0
    with open(os.path.join(reference_dir, "results.json")) as f:
        want = json.load(f)["epochs"]
    with open(os.path.join(model_dir, "results.json")) as f:
        got = json.load(f)["epochs"]
    assert [e["train_loss"] for e in got] == pytest.approx(
        [e["train_loss"] for e in want], rel=1e-6)
    # One line per logged step, none repeated by the resumed run.
    want, got = step_records(reference_dir), step_records(model_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [
        4, 8, 12, 16]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


@pytest.mark.parametrize("flags, override, message", [
    (["--strategy=tpu"], "", "no TPU is reachable"),
    ([], "train.epochz=3", "Did you mean 'epochs'"),
    ([], "model.name=resnet21", "Did you mean 'resnet20'"),
    ([], "optimizer.name=adamw", "Choose one of clars, lars, sgd, lamb"),
    (["--strategy=mirrored", "--cpu_devices=2"],
     "train.global_batch_size=63", "not divisible by the 2 replicas"),
    ([], "estimator.num_micro_batches=16", "Lower `num_micro_batches`"),
    ([], "task.dataset=fashion_mnst", "Did you mean 'fashion_mnist'"),
    (["--mode=eval"], "", "No checkpoint"),
    (["--strategy=mirrored", "--cpu_devices=2"], "train.jit_compile=true",
     "train.jit_compile=true cannot run --strategy=mirrored over 2 CPU"),
])
def test_bad_setups_fail_fast_with_a_clear_message(tmp_path,
                                                   fashion_mnist_dir, flags,
                                                   override, message):
    start = time.time()
    result = run_trainer(str(tmp_path / "run"), fashion_mnist_dir, *flags,
                         override=override, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert time.time() - start < 60
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("tpu", [
    "no-such-tpu",  # a TPU name: looked up through the metadata server
    "grpc://127.0.0.1:{port}",  # nothing listens there
    "grpc://no-such-tpu.invalid:8470",  # never resolves (RFC 2606)
])
def test_unreachable_tpu_is_one_error_line_within_seconds(tmp_path, tpu):
    port = _free_ports(1)[0]
    tpu = tpu.format(port=port)
    start = time.time()
    # The Cloud TPU client asks the GCE metadata server for the project:
    # point it at the closed loopback port, never at a real address.
    result = run_trainer(str(tmp_path / "run"), str(tmp_path), "--strategy=tpu",
                         f"--tpu={tpu}", timeout=300,
                         env={"GCE_METADATA_HOST": f"127.0.0.1:{port}"})
    assert time.time() - start < 60
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(
        f"error: --strategy=tpu could not reach or initialise TPU '{tpu}' (")
    assert "Check that the TPU exists and is READY" in errors[0]


def test_params_override_as_a_yaml_mapping():
    from clars_tf.trainers import config as config_lib

    config = config_lib.build_config(
        CONFIG, "{train: {epochs: 2}, optimizer: {name: lars}}")
    assert config["train"]["epochs"] == 2
    assert config["optimizer"]["name"] == "lars"
    for text, message in (("{train: [}", "neither key=value pairs nor"),
                          ("[1, 2]", "must be a YAML mapping")):
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.build_config(CONFIG, text)


def _in_process_trainer(tmp_path, data_dir, override, strategy=None):
    """A Trainer in this process (no op determinism: it is process-wide)."""
    from clars_tf.trainers import config as config_lib
    from clars_tf.trainers import train

    config = config_lib.build_config(CONFIG, ",".join(
        o for o in (SMALL, "train.deterministic=false", override) if o))
    strategy = strategy or tf.distribute.get_strategy()
    estimator = config_lib.check_against_strategy(
        config, strategy.num_replicas_in_sync)
    return train.Trainer(config, strategy, str(tmp_path), data_dir,
                         estimator=estimator)


def test_a_split_is_decoded_once_and_a_resumed_run_starts_at_its_step(
        tmp_path, fashion_mnist_dir, monkeypatch):
    from clars_tf.trainers import data

    decoded = []
    decode_image = data._decode_image

    def counted_decode(encoded, spec):
        def count(x):
            decoded.append(1)
            return x
        counted = tf.py_function(count, [encoded], encoded.dtype)
        counted.set_shape(encoded.shape)
        return decode_image(counted, spec)

    monkeypatch.setattr(data, "_decode_image", counted_decode)
    # Empty caches, so this process decodes the split here.
    monkeypatch.setattr(data, "_DECODED_SPLITS", {})
    monkeypatch.setattr(data, "_PADDED_COLUMNS", {})
    trainer = _in_process_trainer(tmp_path, fashion_mnist_dir, "")
    steps_per_epoch = trainer.steps_per_epoch  # 937 batches of 64
    resume_step = 2 * steps_per_epoch - 7  # late in the second epoch
    images, labels = next(trainer._train_iterator(resume_step))
    assert len(decoded) == 60_000
    # The resumed run gets the batch an uninterrupted one gets at that step;
    # a second pipeline decodes nothing more.
    uninterrupted = trainer._train_iterator(steps_per_epoch)
    for _ in range(resume_step - steps_per_epoch):
        next(uninterrupted)
    expected_images, expected_labels = next(uninterrupted)
    np.testing.assert_array_equal(images.numpy(), expected_images.numpy())
    np.testing.assert_array_equal(labels.numpy(), expected_labels.numpy())
    assert len(decoded) == 60_000


@pytest.mark.parametrize("replicas", [1, 2])
def test_eval_counts_every_example_once_at_a_batch_that_does_not_divide(
        tmp_path, fashion_mnist_dir, two_replicas, replicas):
    import tensorflow_datasets as tfds

    from clars_tf.trainers import data

    # 10,000 test examples in batches of 3,000: 1,000 in the last one.
    trainer = _in_process_trainer(
        tmp_path, fashion_mnist_dir, "train.eval_batch_size=3000",
        two_replicas if replicas == 2 else None)
    assert trainer.replicas == replicas
    result = trainer.evaluate()
    images, labels = tfds.as_numpy(tfds.load(
        "fashion_mnist", split="test", data_dir=fashion_mnist_dir,
        as_supervised=True, batch_size=-1, download=False))
    logits = trainer.model.predict(
        data.preprocess_for_serving(images, "fashion_mnist", 32),
        batch_size=500, verbose=0)
    correct = np.sum(np.argmax(logits, -1) == labels)
    losses = tf.keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True).numpy()
    # Batch shapes change the float32 rounding of the logits, which may flip
    # an argmax tie: allow one example.
    assert abs(result["eval_accuracy"] * 10_000 - correct) <= 1
    assert result["eval_loss"] == pytest.approx(losses.mean(), rel=1e-4)


def test_jit_compile_matches_the_uncompiled_run(tmp_path, fashion_mnist_dir):
    override = ("task.dataset=synthetic,train.max_steps=3,"
                "train.steps_per_loop=3,train.eval_batch_size=300")
    results, weights = {}, {}
    initial = None
    for jit in (False, True):
        trainer = _in_process_trainer(
            tmp_path / f"jit{jit}", None,
            f"{override},train.jit_compile={str(jit).lower()}")
        if initial is None:
            initial = trainer.model.get_weights()
        trainer.model.set_weights(initial)
        results[jit] = trainer.train()[-1]
        weights[jit] = trainer.model.get_weights()
    # XLA fuses and reorders float32 arithmetic: rounding-level differences,
    # and some there must be, or the steps were not compiled.
    for plain, compiled in zip(weights[False], weights[True]):
        np.testing.assert_allclose(compiled, plain, rtol=1e-3, atol=1e-4)
    assert not all(np.array_equal(plain, compiled)
                   for plain, compiled in zip(weights[False], weights[True]))
    assert results[True]["step"] == 3
    for key in ("train_loss", "eval_loss", "eval_accuracy"):
        assert results[True][key] == pytest.approx(results[False][key],
                                                   rel=1e-3, abs=1e-3)


def _synthetic_sgd_trainer(tmp_path, override, strategy=None):
    """A one-epoch SGD Trainer on synthetic data, in this process."""
    from clars_tf.trainers import config as config_lib
    from clars_tf.trainers import train as train_lib

    config = config_lib.build_config(CONFIG, (
        "task.dataset=synthetic,train.global_batch_size=64,"
        "optimizer.name=sgd,train.epochs=1," + override))
    return train_lib.Trainer(config, strategy or tf.distribute.get_strategy(),
                             str(tmp_path / "run"), None, "default")


def test_recomputed_batch_norm_statistics_are_exact_averages(tmp_path):
    """Moving statistics = numpy averages of each batch's input moments."""
    import keras

    from clars_tf.trainers import data

    trainer = _synthetic_sgd_trainer(
        tmp_path, "task.validation_examples=192,train.recompute_bn_examples=128")
    layers = trainer._batch_norm_statistics()
    before = [(m.numpy().copy(), v.numpy().copy()) for _, m, v in layers]
    saved = trainer.recompute_batch_norm_statistics(128)
    for (old_mean, old_variance), (mean, variance) in zip(before, saved):
        np.testing.assert_array_equal(old_mean, mean)
        np.testing.assert_array_equal(old_variance, variance)
    recomputed = [(m.numpy().copy(), v.numpy().copy()) for _, m, v in layers]
    # The same two batches of 64, read independently of the trainer.
    dataset = data.build_dataset(
        "synthetic", "train", data_dir=None, global_batch_size=64,
        is_training=True, image_size=32, seed=2,
        indices=data.training_indices("synthetic", 192))
    batches = [images for images, _ in dataset.take(2)]
    model = trainer.model
    for index in (0, len(layers) - 1):
        layer = layers[index][0]
        inputs_of = keras.Model(model.inputs, layer.input)
        # Training mode: earlier batch norms normalise with batch moments,
        # as in the recomputation (weights are not changed by this call).
        moments = [inputs_of(b, training=True).numpy().astype(np.float64)
                   for b in batches]
        mean = np.mean([x.mean(axis=(0, 1, 2)) for x in moments], axis=0)
        variance = np.mean([x.var(axis=(0, 1, 2)) for x in moments], axis=0)
        np.testing.assert_allclose(recomputed[index][0], mean, rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(recomputed[index][1], variance, rtol=1e-4,
                                   atol=1e-5)
    # Not an exponential average: one batch alone gives other statistics.
    trainer.restore_batch_norm_statistics(saved)
    trainer.recompute_batch_norm_statistics(64)
    assert not np.allclose(layers[0][1].numpy(), recomputed[0][0])


def test_evaluation_leaves_training_state_and_counts_splits(tmp_path):
    trainer = _synthetic_sgd_trainer(tmp_path, (
        "task.validation_examples=192,train.recompute_bn_examples=128,"
        "train.eval_splits=validation+test,train.eval_batch_size=100"))
    assert trainer.steps_per_epoch == (8192 - 192) // 64
    state = [v.numpy().copy() for v in trainer.model.weights]
    results = trainer.evaluate_splits()
    assert set(results) == {"validation_loss", "validation_accuracy",
                            "eval_loss", "eval_accuracy"}
    for before, variable in zip(state, trainer.model.weights):
        np.testing.assert_array_equal(before, variable.numpy())
    # The counts are checked inside evaluate: 192 held out, 1024 test.
    assert 0.0 <= results["validation_accuracy"] <= 1.0


def test_evaluation_reads_its_data_and_traces_its_steps_once(
        tmp_path, monkeypatch):
    """Two epochs: one training pipeline, one trace of each compiled step,
    the same evaluation both times it runs on the same weights, and
    training, evaluation and batch-norm seconds reported apart."""
    from clars_tf.trainers import data

    trainer = _synthetic_sgd_trainer(tmp_path, (
        "task.validation_examples=7000,train.recompute_bn_examples=128,"
        "train.eval_splits=validation+test,train.eval_batch_size=1000,"
        "train.epochs=2,train.steps_per_loop=6"))
    assert trainer.steps_per_epoch == (8192 - 7000) // 64
    built = []
    build_dataset = data.build_dataset

    def counted_build(name, split, **kwargs):
        built.append((split, kwargs["is_training"], kwargs["seed"]))
        return build_dataset(name, split, **kwargs)

    monkeypatch.setattr(data, "build_dataset", counted_build)
    history = trainer.train()
    assert [entry["epoch"] for entry in history] == [1, 2]
    # Training, batch-norm recomputation, validation, test: once each.
    assert sorted(built) == sorted([("train", True, 0), ("train", True, 2),
                                    ("train", False, 0), ("test", False, 0)])
    assert trainer._train_loop.experimental_get_tracing_count() == 1
    assert trainer._eval_step.experimental_get_tracing_count() == 1
    (_, batch_moments), = trainer._batch_norm_passes.values()
    assert batch_moments.experimental_get_tracing_count() == 1
    again = trainer.evaluate_splits()
    assert again == {key: history[-1][key] for key in again}
    assert trainer._eval_step.experimental_get_tracing_count() == 1
    for entry in history:
        seconds = entry["seconds"]
        assert set(seconds) == {"training", "evaluation", "batch_norm",
                                "total", "total_cpu"}
        assert all(value > 0 for value in seconds.values())
        # The parts lie within the whole epoch (3 ms of rounding apart).
        assert seconds["total"] >= (seconds["training"] + seconds["evaluation"]
                                    + seconds["batch_norm"] - 0.003)


@pytest.mark.parametrize("override, message", [
    ("task.validation_examples=60000", r"task.validation_examples.*\[0, 60000\)"),
    ("task.validation_examples=-5", r"task.validation_examples"),
    ("train.eval_splits=validation", r"needs held-out examples"),
    ("train.eval_splits=val", r"'test', 'validation' or 'validation\+test'"),
    ("train.recompute_bn_examples=100", r"not a whole number of training"),
    ("task.validation_examples=59990", r"larger than the 10 examples left"),
    ("lars.trust_clip=0", r"lars.trust_clip.*must be > 0 \(.inf for no clip"),
])
def test_validation_and_recompute_options_reject_bad_values(override,
                                                            message):
    from clars_tf.trainers import config as config_lib

    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.build_config(CONFIG, SMALL + "," + override)


def test_recompute_and_validation_end_to_end_leave_checkpoints_alone(
        tmp_path):
    """Same checkpoint with and without recomputation; both splits scored."""
    common = ("task.dataset=synthetic,train.max_steps=2,train.epochs=1,"
              "train.checkpoint_every_steps=2,task.validation_examples=192,"
              "train.eval_splits=validation+test,train.eval_batch_size=64")
    runs = {}
    for name, extra in (("plain", ""),
                        ("recomputed", ",train.recompute_bn_examples=128")):
        model_dir = str(tmp_path / name)
        result = run_trainer(model_dir, None, "--mode=train_and_eval",
                             override=common + extra)
        assert result.returncode == 0, result.stderr[-3000:]
        batch_norm = ", batch norm \\d+\\.\\ds" if extra else ""
        assert re.search(r"^epoch 1 validation loss \d\.\d{4} accuracy "
                         r"\d\.\d{4}; eval loss \d\.\d{4} accuracy "
                         r"\d\.\d{4} \(training \d+\.\ds, evaluation "
                         rf"\d+\.\ds{batch_norm}; epoch \d+\.\ds\)$",
                         result.stdout,
                         re.M), result.stdout
        with open(os.path.join(model_dir, "results.json")) as f:
            runs[name] = (json.load(f), checkpoint_values(model_dir))
    assert max_difference(runs["plain"][1], runs["recomputed"][1]) == 0.0
    for results, _ in runs.values():
        assert set(results["final"]) == {
            "validation_loss", "validation_accuracy", "eval_loss",
            "eval_accuracy", "step"}
        assert results["steps_per_epoch"] == (8192 - 192) // 64
    # Two steps leave the moving statistics far from the weights' own:
    # recomputing them changes what evaluation measures.
    assert runs["plain"][0]["final"]["eval_loss"] != runs["recomputed"][0][
        "final"]["eval_loss"]


def test_recomputed_means_do_not_depend_on_replicas(tmp_path, two_replicas):
    """Each replica's batch moments, averaged: the global batch mean."""
    override = "task.validation_examples=192,model.use_sync_bn=true"
    means = []
    for name, strategy in (("one", None), ("two", two_replicas)):
        trainer = _synthetic_sgd_trainer(tmp_path / name, override, strategy)
        trainer.recompute_batch_norm_statistics(128)
        # The first batch norm sees the same initial weights in both (same
        # seed), so its input, and the mean of it, are the same.
        means.append(trainer._batch_norm_statistics()[0][1].numpy())
    np.testing.assert_allclose(means[0], means[1], rtol=1e-4, atol=1e-5)


def test_a_resumed_run_drops_the_log_lines_past_its_checkpoint(tmp_path):
    """Lines logged after the checkpoint a run resumes from are redone."""
    trainer = _synthetic_sgd_trainer(tmp_path, "train.steps_per_loop=2")
    os.makedirs(trainer.model_dir, exist_ok=True)
    for name in ("steps.jsonl", "diagnostics.jsonl"):
        with open(os.path.join(trainer.model_dir, name), "w") as f:
            f.writelines(json.dumps({"step": step, "loss": 1.0}) + "\n"
                         for step in (2, 4, 6))
    trainer._keep_logs_up_to(4)
    assert [r["step"] for r in step_records(trainer.model_dir)] == [2, 4]
    with open(os.path.join(trainer.model_dir, "diagnostics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]


def test_results_are_strict_json(tmp_path):
    """inf and NaN (lars.trust_clip's .inf, a NaN loss) are written as null:
    Python's Infinity and NaN are refused by other JSON readers."""
    from clars_tf.trainers import train as train_lib

    path = str(tmp_path / "results.json")
    train_lib._write_json_atomically(path, {
        "lars": {"trust_clip": float("inf")},
        "epochs": [{"train_loss": float("nan"), "accuracy": 0.5}]})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    with open(path) as f:
        content = json.load(f, parse_constant=refuse)
    assert content == {"lars": {"trust_clip": None},
                       "epochs": [{"train_loss": None, "accuracy": 0.5}]}
