r"""Is the trainer as fast as its model? Images/s of four ways to train.

For each model (the third study's `sigmoid_mlp` at B = 2048 from
`configs/gate_study/sgd.yaml`, the main job's ResNet-8 with CLARS at
B = 1024 from `configs/fashion_mnist_resnet8_clars.yaml`), on offline
Fashion-MNIST, side by side in one process, rounds interleaved:

  * `pipeline`: the trainer's input pipeline alone (`data.build_dataset`
    as the trainer builds it, augmentation included), batches pulled and
    dropped;
  * `model_step`: the trainer's compiled train loop alone, on one
    in-memory batch repeated (`--model_steps` steps per call);
  * `trainer`: `Trainer.train` over `--epochs` whole epochs per round: its
    input pipeline, steps, console and log lines, checkpoints and the
    evaluation the config asks for at each epoch's end (validation for the
    study, test for the main job);
  * `fit`: plain Keras `model.fit` on numpy arrays of the same training
    images (normalised, not augmented), `--epochs` epochs per round with
    `validation_data` holding the same evaluation examples as the
    trainer's, same model and optimizer (CLARS with its estimator attached
    for ResNet-8; Keras SGD without the trainer's coupled L2 term for the
    MLP).

`trainer` and `fit` are measured as a user sees a run: in steady state,
over whole epochs with their evaluation, from the epochs after each
round's first (the trainer's from the `seconds.total` of its epochs in
`results.json`, fit's between its `on_epoch_end` callbacks). What a round
costs beyond its steady epochs is reported apart: in the first round the
start-up a run pays once (tracing, the first pipeline and evaluation
data, the checkpoint directory), in later rounds the restart (the trainer
resumes from the last round's checkpoint and builds its pipeline; fit
makes its data adapters). So are the one-time costs before the first
round: importing TensorFlow, Keras and clars_tf (timed in a fresh
interpreter), decoding the splits, building the trainer and compiling
fit's model.

Targets (issue 26): `pipeline` >= 5x `model_step`, and `trainer` within
1.2x of the faster of `model_step` and `fit` (images/s ratio >= 1 / 1.2),
each checked on the median of the per-round ratios; checked again on
images per CPU second of this process (`on_cpu_time`), which other
processes on a shared machine move less than wall time over rounds of
minutes.

    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.trainer_throughput \
        --output=/tmp/trainer_throughput.json

Default: both models, 2 rounds of 3 epochs; `--models`, `--rounds` and
`--epochs` (at least 2) shorten or lengthen it.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import common
# Defines the trainer's flags, --data_dir among them, which this uses.
from clars_tf.trainers import train as train_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["sigmoid_mlp", "resnet8"],
                  "Which of sigmoid_mlp, resnet8 to measure.")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds.")
flags.DEFINE_integer("epochs", 3,
                     "Trainer and fit epochs per round; their images/s come "
                     "from the epochs after the first.")
flags.DEFINE_integer("pipeline_batches", 20,
                     "Batches the pipeline yields per round.")
flags.DEFINE_integer("model_steps", 10, "Model steps per round.")
flags.DEFINE_string("overrides", "",
                    "Extra config overrides for every model, e.g. "
                    "'task.validation_examples=59000' for a tiny run.")
flags.DEFINE_string("output", None, "Write the results as JSON to this path.")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (config, overrides): the study's config evaluates validation only,
# as its tuning runs do.
SETUPS = {
    "sigmoid_mlp": ("configs/gate_study/sgd.yaml", ""),
    "resnet8": ("configs/fashion_mnist_resnet8_clars.yaml", ""),
}

CANDIDATES = ("pipeline", "model_step", "trainer", "fit")
# Timed by their epochs in steady state, their rounds' rest reported apart.
BY_EPOCH = ("trainer", "fit")

PIPELINE_OVER_MODEL_TARGET = 5.0
TRAINER_SLOWDOWN_TARGET = 1.2


def _config(name, epochs):
    from clars_tf.trainers import config as config_lib

    path, overrides = SETUPS[name]
    overrides = ",".join(o for o in (
        overrides, f"train.epochs={epochs}", FLAGS.overrides) if o)
    return config_lib.build_config(os.path.join(_REPO, path), overrides)


def _trainer(config, model_dir):
    import tensorflow as tf

    from clars_tf.trainers import config as config_lib

    strategy = tf.distribute.get_strategy()
    estimator = config_lib.check_against_strategy(
        config, strategy.num_replicas_in_sync)
    return train_lib.Trainer(config, strategy, model_dir, FLAGS.data_dir,
                             estimator=estimator)


def _timed(call):
    """(what `call()` returns, its wall seconds)."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def _evaluation_arrays(data, name, trainer, positions_of_split):
    """The examples the trainer evaluates, preprocessed, as numpy arrays:
    (images, labels) of each split of train.eval_splits, concatenated."""
    import numpy as np

    images, labels = [], []
    for split, positions in positions_of_split:
        batches = data.build_dataset(
            name, split, data_dir=FLAGS.data_dir,
            global_batch_size=trainer.config["train"]["eval_batch_size"],
            is_training=False, image_size=trainer.config["task"]["image_size"],
            seed=0, indices=positions)
        for x, y, weights in batches:
            real = weights.numpy() > 0  # drops the last batch's padding
            images.append(x.numpy()[real])
            labels.append(y.numpy()[real])
    return np.concatenate(images), np.concatenate(labels)


def candidates(name, work_dir, epoch_seconds, epoch_cpu_seconds):
    """name -> (callable running one timed unit, images it trains or reads
    per round), and the set-up's record.

    `pipeline` and `model_step` are warmed up; `trainer` and `fit` are not
    (their first round's first epoch holds their start-up), and append each
    round's per-epoch wall seconds to `epoch_seconds[candidate]` and its
    per-epoch process CPU seconds to `epoch_cpu_seconds[candidate]`.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    import clars_tf
    from clars_tf.trainers import builders
    from clars_tf.trainers import data

    epochs = FLAGS.epochs
    config = _config(name, FLAGS.rounds * epochs)
    task, train = config["task"], config["train"]
    dataset_name, batch = task["dataset"], train["global_batch_size"]
    data.prepare(dataset_name, FLAGS.data_dir)
    one_time = {}
    info = data.DATASETS[dataset_name]
    splits = [info.train_split] + (
        [info.eval_split] if "test" in train["eval_splits"] else [])
    _, one_time["decode"] = _timed(lambda: [
        data.decoded_split(dataset_name, split, FLAGS.data_dir)
        for split in splits])
    end_to_end, one_time["trainer_build"] = _timed(
        lambda: _trainer(config, os.path.join(work_dir, name, "trainer")))
    steps_per_epoch = end_to_end.steps_per_epoch
    epoch_images = steps_per_epoch * batch

    pipeline = iter(data.build_dataset(
        dataset_name, info.train_split, data_dir=FLAGS.data_dir,
        global_batch_size=batch, is_training=True,
        image_size=task["image_size"], seed=train["seed"],
        indices=end_to_end.training_indices, epochs=10**6))
    pipeline_batches = FLAGS.pipeline_batches
    in_memory_batch = next(pipeline)

    def read_batches():
        for _ in range(pipeline_batches):
            next(pipeline)

    alone = _trainer(config, os.path.join(work_dir, name, "model_step"))
    loop = alone._make_train_loop()
    repeated = iter(alone.strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(in_memory_batch).repeat()))
    model_steps = FLAGS.model_steps

    def model_step():
        loss_sum = loop(repeated, tf.constant(model_steps))[0]
        return float(loss_sum)  # waits for the steps

    end_to_end.last_step = 0

    def trainer_epochs():
        done = end_to_end.last_step // steps_per_epoch
        end_to_end.last_step += epochs * steps_per_epoch
        history = end_to_end.train()
        ran = [entry["seconds"] for entry in history
               if entry["epoch"] > done]
        epoch_seconds["trainer"].append([e["total"] for e in ran])
        epoch_cpu_seconds["trainer"].append([e["total_cpu"] for e in ran])

    def build_fit_model():
        _, labels = data.decoded_split(dataset_name, info.train_split,
                                       FLAGS.data_dir)
        positions = (end_to_end.training_indices
                     if end_to_end.training_indices is not None
                     else np.arange(labels.shape[0]))[:epoch_images]
        images, _ = _evaluation_arrays(
            data, dataset_name, end_to_end,
            [(info.train_split, positions)])
        held_out = []
        for split in train["eval_splits"].split("+"):
            held_out.append(
                (info.train_split, end_to_end.validation_indices)
                if split == "validation" else (info.eval_split, None))
        validation = _evaluation_arrays(data, dataset_name, end_to_end,
                                        held_out)
        keras.utils.set_random_seed(train["seed"])
        model = builders.model(config)
        model.compile(optimizer=builders.optimizer(config, steps_per_epoch),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True),
                      metrics=["accuracy"])
        if end_to_end.estimator is not None:
            clars_tf.attach_gradient_norm_estimator(model,
                                                    end_to_end.estimator)
        return model, (images, tf.gather(labels, positions).numpy()), (
            validation)

    (model, (fit_images, fit_labels), validation), one_time["fit_build"] = (
        _timed(build_fit_model))

    class EpochEnds(keras.callbacks.Callback):
        """Per-epoch wall seconds, the validation pass included (Keras
        calls `on_epoch_end` after it)."""

        def on_train_begin(self, logs=None):
            self.ends = [(time.perf_counter(), time.process_time())]

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append((time.perf_counter(), time.process_time()))

    def fit_epochs():
        ends = EpochEnds()
        model.fit(fit_images, fit_labels, batch_size=batch, epochs=epochs,
                  shuffle=True, validation_data=validation,
                  validation_batch_size=train["eval_batch_size"],
                  callbacks=[ends], verbose=0)
        wall, cpu = np.diff(ends.ends, axis=0).T.tolist()
        epoch_seconds["fit"].append(wall)
        epoch_cpu_seconds["fit"].append(cpu)

    for candidate, call in (("pipeline", read_batches),
                            ("model_step", model_step)):
        call()
        print(f"  {name}: {candidate} warmed up", flush=True)
    return {
        "pipeline": (read_batches, pipeline_batches * batch),
        "model_step": (model_step, model_steps * batch),
        "trainer": (trainer_epochs, epoch_images),
        "fit": (fit_epochs, epoch_images),
    }, dict(batch_size=batch, steps_per_epoch=steps_per_epoch,
            config=SETUPS[name][0],
            one_time_seconds={k: round(v, 3) for k, v in one_time.items()})


def steady_state(round_seconds, round_epoch_seconds, epoch_images):
    """Images/s of a round's epochs after its first, and what the round
    cost beyond them: its wall seconds less as many steady epochs as it
    ran (each round's first epoch holds its start-up or restart)."""
    steady = statistics.fmean(round_epoch_seconds[1:])
    return (epoch_images / steady,
            round_seconds - len(round_epoch_seconds) * steady)


def summarise(images_per_second):
    """Per-round ratios and the targets, from candidate -> [images/s]."""
    rounds = range(len(images_per_second["pipeline"]))
    pipeline_ratios = [images_per_second["pipeline"][r]
                       / images_per_second["model_step"][r] for r in rounds]
    trainer_ratios = [
        images_per_second["trainer"][r]
        / max(images_per_second["model_step"][r], images_per_second["fit"][r])
        for r in rounds]
    return {
        "pipeline_over_model_step": pipeline_ratios,
        "trainer_over_faster_of_model_step_and_fit": trainer_ratios,
        "pipeline_target_met": (statistics.median(pipeline_ratios)
                                >= PIPELINE_OVER_MODEL_TARGET),
        "trainer_target_met": (statistics.median(trainer_ratios)
                               >= 1 / TRAINER_SLOWDOWN_TARGET),
    }


def _rates(calls, seconds, epoch_seconds):
    """candidate -> [images/s] from per-round seconds (wall or CPU), and
    for the by-epoch candidates what each round cost beyond its steady
    epochs."""
    rates = {c: [calls[c][1] / t for t in seconds[c]]
             for c in CANDIDATES if c not in BY_EPOCH}
    beyond = {}
    for c in BY_EPOCH:
        rates[c], beyond[c] = [], []
        for total, per_epoch in zip(seconds[c], epoch_seconds[c]):
            rate, rest = steady_state(total, per_epoch, calls[c][1])
            rates[c].append(rate)
            beyond[c].append(rest)
    return rates, beyond


def _measure(name, work):
    epoch_seconds = {c: [] for c in BY_EPOCH}
    epoch_cpu_seconds = {c: [] for c in BY_EPOCH}
    calls, setup = candidates(name, work, epoch_seconds, epoch_cpu_seconds)
    times, cpu_times, shares = common.interleave(
        {c: calls[c][0] for c in CANDIDATES}, FLAGS.rounds,
        dict.fromkeys(CANDIDATES, 1))
    rates, beyond = _rates(calls, times, epoch_seconds)
    cpu_rates, cpu_beyond = _rates(calls, cpu_times, epoch_cpu_seconds)
    rows = {c: {"epoch_seconds": epoch_seconds[c],
                "epoch_cpu_seconds": epoch_cpu_seconds[c],
                "start_up_seconds": beyond[c][0],
                "restart_seconds": beyond[c][1:],
                "start_up_cpu_seconds": cpu_beyond[c][0],
                "restart_cpu_seconds": cpu_beyond[c][1:]}
            for c in BY_EPOCH}
    return {
        **setup,
        "candidates": {c: {"images": calls[c][1] * (
                               FLAGS.epochs if c in BY_EPOCH else 1),
                           "seconds": times[c],
                           "images_per_second": rates[c],
                           "cpu_seconds": cpu_times[c],
                           "images_per_cpu_second": cpu_rates[c],
                           "cpu_share": shares[c],
                           **rows.get(c, {})}
                       for c in CANDIDATES},
        **summarise(rates),
        # The same checks on this process's CPU seconds, which other
        # processes on a shared machine move less than wall seconds.
        "on_cpu_time": summarise(cpu_rates),
    }


def _print(name, summary, import_seconds):
    print(f"\n{name}, B={summary['batch_size']}, {FLAGS.rounds} rounds "
          f"(trainer and fit: {FLAGS.epochs} epochs each, the first left "
          "out); median (min..max) of images per wall second, per CPU "
          "second of this process; cpu share")
    for c, row in summary["candidates"].items():
        columns = []
        for rates in (row["images_per_second"], row["images_per_cpu_second"]):
            columns.append(f"{statistics.median(rates):>10,.0f} "
                           f"({min(rates):,.0f}..{max(rates):,.0f})")
        print(f"  {c:<11} {'  '.join(columns)} "
              f"{statistics.median(row['cpu_share']):5.2f}")
    for c in BY_EPOCH:
        row = summary["candidates"][c]
        restarts = ", ".join(
            f"{wall:.1f} ({cpu:.1f})" for wall, cpu in zip(
                row["restart_seconds"], row["restart_cpu_seconds"]))
        print(f"  {c}: start-up {row['start_up_seconds']:.1f} s "
              f"({row['start_up_cpu_seconds']:.1f} CPU s) in round 1"
              f"{f', restart {restarts} s in later rounds' if restarts else ''}")
    print("  before the rounds: " + ", ".join(
        f"{part.replace('_', ' ')} {seconds:.1f} s" for part, seconds in {
            "import": import_seconds, **summary["one_time_seconds"]}.items()))
    for label, checks in (("wall", summary),
                          ("CPU", summary["on_cpu_time"])):
        print(f"  {label}: pipeline / model_step "
              f"{statistics.median(checks['pipeline_over_model_step']):.2f}"
              f" (target >= {PIPELINE_OVER_MODEL_TARGET:g}, met: "
              f"{checks['pipeline_target_met']}); trainer / faster of "
              "model_step and fit "
              f"{statistics.median(checks['trainer_over_faster_of_model_step_and_fit']):.2f}"
              f" (target >= {1 / TRAINER_SLOWDOWN_TARGET:.2f}, met: "
              f"{checks['trainer_target_met']})")


def main(argv):
    del argv
    unknown = set(FLAGS.models) - set(SETUPS)
    if unknown:
        raise app.UsageError(f"--models: unknown {sorted(unknown)}; choose "
                             f"from {', '.join(SETUPS)}.")
    if FLAGS.rounds < 1:
        raise app.UsageError("--rounds must be >= 1.")
    if FLAGS.epochs < 2:
        raise app.UsageError(
            "--epochs must be >= 2: each round's first epoch holds its "
            "start-up or restart, and the rate comes from the others.")
    # A run's first cost, which this process paid before `main`: a fresh
    # interpreter importing TensorFlow, Keras, tensorflow-datasets and
    # clars_tf as the trainer does.
    _, import_seconds = _timed(lambda: subprocess.run(
        [sys.executable, "-c", "import clars_tf.trainers.builders"],
        check=True))
    results = {}
    with tempfile.TemporaryDirectory(prefix="trainer_throughput_") as work:
        for name in FLAGS.models:
            results[name] = _measure(name, work)
            _print(name, results[name], import_seconds)
    if FLAGS.output:
        common.write_results(
            FLAGS.output, dict(rounds=FLAGS.rounds, epochs=FLAGS.epochs,
                               models=FLAGS.models,
                               overrides=FLAGS.overrides,
                               import_seconds=round(import_seconds, 3)),
            results=results)


if __name__ == "__main__":
    app.run(main)
