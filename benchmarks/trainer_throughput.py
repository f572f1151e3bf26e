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
  * `trainer`: `Trainer.train` end to end over `--epochs` whole epochs
    per round: its input pipeline, steps, console and log lines,
    checkpoints and the evaluation the config asks for at each epoch's end
    (validation for the study, test for the main job);
  * `fit`: plain Keras `model.fit` on numpy arrays of the same training
    images (normalised, not augmented), one epoch, same model and
    optimizer (CLARS with its estimator attached for ResNet-8; Keras SGD
    without the trainer's coupled L2 term for the MLP).

Targets (issue 26): `pipeline` >= 5x `model_step`, and `trainer` within
1.2x of the faster of `model_step` and `fit` (images/s ratio >= 1 / 1.2),
each checked on the median of the per-round ratios.

Untimed before the rounds: the data set's decoding, one pipeline batch, a
`model_step` call, one trainer epoch (tracing its loop and evaluation) and
two fit steps (tracing fit's step). Each round's trainer call is a run
resumed from the last round's checkpoint: it builds its input pipeline
(about 1 s), which a real run does once.

    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.trainer_throughput \
        --output=/tmp/trainer_throughput.json

Default: both models, 2 rounds of 1 epoch; `--models`, `--rounds` and
`--epochs` shorten or lengthen it.
"""

import os
import statistics
import tempfile

from absl import app
from absl import flags

from benchmarks import common
# Defines the trainer's flags, --data_dir among them, which this uses.
from clars_tf.trainers import train as train_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["sigmoid_mlp", "resnet8"],
                  "Which of sigmoid_mlp, resnet8 to measure.")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds.")
flags.DEFINE_integer("epochs", 1, "Trainer and fit epochs per round.")
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


def candidates(name, work_dir):
    """name -> (callable running one timed unit, images it trains or
    reads), each warmed up."""
    import keras
    import numpy as np
    import tensorflow as tf

    import clars_tf
    from clars_tf.trainers import builders
    from clars_tf.trainers import data

    # Enough epochs for the warm-up and every round: the schedule's length
    # does not change a step's cost.
    total_epochs = 1 + FLAGS.rounds * FLAGS.epochs
    config = _config(name, total_epochs)
    task, train = config["task"], config["train"]
    dataset_name, batch = task["dataset"], train["global_batch_size"]
    data.prepare(dataset_name, FLAGS.data_dir)
    end_to_end = _trainer(config, os.path.join(work_dir, name, "trainer"))
    steps_per_epoch = end_to_end.steps_per_epoch
    epoch_images = steps_per_epoch * batch

    pipeline = iter(data.build_dataset(
        dataset_name, end_to_end.info.train_split, data_dir=FLAGS.data_dir,
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

    def trainer_epochs():
        end_to_end.last_step += FLAGS.epochs * steps_per_epoch
        end_to_end.train()

    images, labels = data.decoded_split(dataset_name,
                                        end_to_end.info.train_split,
                                        FLAGS.data_dir)
    positions = (end_to_end.training_indices
                 if end_to_end.training_indices is not None
                 else np.arange(images.shape[0]))[:epoch_images]
    eval_pipeline = data.build_dataset(
        dataset_name, end_to_end.info.train_split, data_dir=FLAGS.data_dir,
        global_batch_size=1000, is_training=False,
        image_size=task["image_size"], seed=0, indices=positions)
    fit_images = np.concatenate([x.numpy() for x, _, _ in eval_pipeline])
    fit_images = fit_images[:epoch_images]
    fit_labels = tf.gather(labels, positions).numpy()
    keras.utils.set_random_seed(train["seed"])
    model = builders.model(config)
    optimizer = builders.optimizer(config, steps_per_epoch)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"])
    if end_to_end.estimator is not None:
        clars_tf.attach_gradient_norm_estimator(model, end_to_end.estimator)

    def fit_epochs():
        model.fit(fit_images, fit_labels, batch_size=batch,
                  epochs=FLAGS.epochs, shuffle=True, verbose=0)

    end_to_end.last_step = steps_per_epoch
    warm_up = {"pipeline": read_batches, "model_step": model_step,
               "trainer": end_to_end.train,
               # Traces fit's step: every batch of an epoch has its shape.
               "fit": lambda: model.fit(fit_images[:2 * batch],
                                        fit_labels[:2 * batch],
                                        batch_size=batch, epochs=1,
                                        verbose=0)}
    for candidate, call in warm_up.items():
        call()
        print(f"  {name}: {candidate} warmed up", flush=True)
    return {
        "pipeline": (read_batches, pipeline_batches * batch),
        "model_step": (model_step, model_steps * batch),
        "trainer": (trainer_epochs, FLAGS.epochs * epoch_images),
        "fit": (fit_epochs, FLAGS.epochs * epoch_images),
    }, dict(batch_size=batch, steps_per_epoch=steps_per_epoch,
            config=SETUPS[name][0])


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


def main(argv):
    del argv
    unknown = set(FLAGS.models) - set(SETUPS)
    if unknown:
        raise app.UsageError(f"--models: unknown {sorted(unknown)}; choose "
                             f"from {', '.join(SETUPS)}.")
    for flag in ("rounds", "epochs"):
        if FLAGS[flag].value < 1:
            raise app.UsageError(f"--{flag} must be >= 1.")
    results = {}
    with tempfile.TemporaryDirectory(prefix="trainer_throughput_") as work:
        for name in FLAGS.models:
            calls, setup = candidates(name, work)
            times, cpu_times, shares = common.interleave(
                {c: calls[c][0] for c in CANDIDATES}, FLAGS.rounds,
                dict.fromkeys(CANDIDATES, 1))
            rates = {c: [calls[c][1] / t for t in times[c]]
                     for c in CANDIDATES}
            results[name] = {
                **setup,
                "candidates": {c: {"images": calls[c][1],
                                   "seconds": times[c],
                                   "images_per_second": rates[c],
                                   "cpu_share": shares[c]}
                               for c in CANDIDATES},
                **summarise(rates),
            }
            print(f"\n{name}, B={setup['batch_size']}, {FLAGS.rounds} "
                  f"rounds; images/s median (min..max), cpu share")
            for c in CANDIDATES:
                print(f"  {c:<11} {statistics.median(rates[c]):>10,.0f} "
                      f"({min(rates[c]):,.0f}..{max(rates[c]):,.0f}) "
                      f"{statistics.median(shares[c]):5.2f}")
            summary = results[name]
            print(f"  pipeline / model_step: "
                  f"{statistics.median(summary['pipeline_over_model_step']):.2f}"
                  f" (target >= {PIPELINE_OVER_MODEL_TARGET:g}, met: "
                  f"{summary['pipeline_target_met']})")
            ratio = statistics.median(
                summary["trainer_over_faster_of_model_step_and_fit"])
            print(f"  trainer / faster of model_step and fit: {ratio:.2f} "
                  f"(target >= {1 / TRAINER_SLOWDOWN_TARGET:.2f}, met: "
                  f"{summary['trainer_target_met']})")
    if FLAGS.output:
        common.write_results(
            FLAGS.output, dict(rounds=FLAGS.rounds, epochs=FLAGS.epochs,
                               models=FLAGS.models,
                               overrides=FLAGS.overrides),
            results=results)


if __name__ == "__main__":
    app.run(main)
