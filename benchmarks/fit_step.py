"""Cost of one `model.fit` step with CLARS, against fit with SGD.

One `model.fit` step of ResNet-20 (32x32x3 inputs, 10 classes) at batch B
on fixed synthetic data, compiled with a sparse cross-entropy loss and an
accuracy metric, for each candidate (timed side by side in one process):

  * `sgd`: `keras.optimizers.SGD(momentum=0.9)`: Keras's own train step,
    the baseline;
  * `clars_s8_j64`: CLARS through `clars_tf.attach_gradient_norm_estimator`
    with the loop estimator (s=8, J=64): the J micro-batch passes, then
    Keras's own step;
  * `one_pass_s8_j64`, `one_pass_s8_j128`: CLARS with the one-pass
    estimator at the reference J and with every example in a micro-batch
    (J * s = B): gradients and norms from the step's one forward and
    backward pass.

Each candidate has its own model (the same initial weights) compiled with
its optimizer, and runs one `model.fit` step over a dataset repeating the
one batch: fit builds and traces its train function. A timed call then
runs `--steps` calls of `model.train_function(iterator)`, what fit runs
for each step (with `verbose=0` and no callbacks, the rest of fit's loop
is Python bookkeeping whose cost does not depend on the optimizer; a
whole `fit` call per step would add the data iterator's set-up). The
ratio column is the median of the per-round ratios (candidate / SGD) with
min..max, next to `benchmarks.train_step`'s bounds for the same estimator
(`1 + 1.1 * J * s / B` for the loop, `1 + 0.3 * J * s / B` for one pass);
`cpu-t x` is the ratio of the process's CPU time per step, which other
processes on the machine disturb less than wall time.

Default (B=1024, 2 warm-up calls, 5 rounds x 2 steps): 9 min 50 s on a
2-core CPU of which other jobs left this one about one core (CPU share
0.50).
Run from the repository root:

    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.fit_step \\
        --output=/tmp/fit_step.json
"""

import statistics

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 1024, "Batch size B.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds (each times every "
                     "candidate).")
flags.DEFINE_integer("steps", 2, "fit steps per timed call.")
flags.DEFINE_integer("warmup", 2, "Untimed calls per candidate after the "
                     "tracing fit step.")
flags.DEFINE_integer("micro_batch_size", 8, "s of every estimator.")
flags.DEFINE_integer("num_micro_batches", 64, "J of the loop estimator and "
                     "of the first one-pass candidate (the second has "
                     "J * s = B).")
flags.DEFINE_string("model", "resnet20", "Model name for models.build_model.")
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("num_classes", 10, "Number of classes.")
flags.DEFINE_float("learning_rate", 0.01, "Learning rate of every optimizer.")
flags.DEFINE_float("weight_decay_rate", 5e-4, "Coupled L2 decay of CLARS; "
                   "SGD has none.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data and the model.")
flags.DEFINE_string("output", None, "Write the results as JSON to this path.")


def candidate_specs():
    """name -> (estimator kind or None, J)."""
    s, j = FLAGS.micro_batch_size, FLAGS.num_micro_batches
    specs = {"sgd": (None, None), f"clars_s{s}_j{j}": ("loop", j)}
    for one_pass_j in sorted({j, FLAGS.batch_size // s}):
        specs[f"one_pass_s{s}_j{one_pass_j}"] = ("one_pass", one_pass_j)
    return specs


def target_bound(kind, j):
    """`common.estimator_bound` of a CLARS candidate, else None."""
    if kind is None:
        return None
    return common.estimator_bound(kind, FLAGS.micro_batch_size, j,
                                  FLAGS.batch_size)


def fit_call(kind, j, data):
    """A no-argument callable running `--steps` fit steps of a fresh model."""
    import keras

    import clars_tf
    from clars_tf import models

    keras.utils.set_random_seed(FLAGS.seed)
    model = models.build_model(
        FLAGS.model, (FLAGS.image_size, FLAGS.image_size, 3),
        FLAGS.num_classes)
    if kind is None:
        optimizer = keras.optimizers.SGD(FLAGS.learning_rate, momentum=0.9)
    else:
        optimizer = clars_tf.CLARS(FLAGS.learning_rate, momentum=0.9,
                                   weight_decay_rate=FLAGS.weight_decay_rate)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"])
    if kind is not None:
        clars_tf.attach_gradient_norm_estimator(
            model, clars_tf.estimator_from_config({
                "method": kind, "micro_batch_size": FLAGS.micro_batch_size,
                "num_micro_batches": j}))

    # The first fit builds the train function (compiled metrics, optimizer
    # variables) and traces it; fit then calls it once a step, as below.
    model.fit(data, epochs=1, steps_per_epoch=1, shuffle=False, verbose=0)
    iterator = iter(model.distribute_strategy.experimental_distribute_dataset(
        data))

    def run():
        for _ in range(FLAGS.steps):
            logs = model.train_function(iterator)
        return float(logs["loss"])

    return run


def main(argv):
    del argv
    import tensorflow as tf

    x, y = common.synthetic_batch(
        FLAGS.batch_size, (FLAGS.image_size, FLAGS.image_size, 3),
        FLAGS.num_classes, FLAGS.seed)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    specs = candidate_specs()
    calls = {}
    for name, (kind, j) in specs.items():
        calls[name] = fit_call(kind, j, data)
        losses = [calls[name]() for _ in range(FLAGS.warmup)]
        print(f"  {name}: traced and warmed up ({FLAGS.warmup} calls"
              + (f", loss {losses[-1]:.3f})" if losses else ")"),
              flush=True)
    times, cpu_times, shares = common.interleave(
        calls, FLAGS.rounds, {name: 1 for name in calls},
        format_seconds=lambda seconds: f"{seconds / FLAGS.steps:.2f}s")
    per_step = {name: [t / FLAGS.steps for t in ts]
                for name, ts in times.items()}
    results = {}
    print(f"\nmodel.fit step, {FLAGS.model}, B={FLAGS.batch_size}, "
          f"{FLAGS.rounds} rounds x {FLAGS.steps} steps")
    print(f"{'candidate':<20} {'step (s)':>22} {'ratio to sgd':>22} "
          f"{'bound':>6} {'cpu-t x':>7} {'cpu share':>9}")
    cpu_per_step = {name: statistics.median(
        [c / FLAGS.steps for c in cpu_times[name]]) for name in specs}
    for name, (kind, j) in specs.items():
        ratios = [t / base for t, base in zip(per_step[name],
                                              per_step["sgd"])]
        step = statistics.median(per_step[name])
        bound = target_bound(kind, j)
        results[name] = {
            "step_seconds_median": step,
            "step_seconds_min": min(per_step[name]),
            "step_seconds_max": max(per_step[name]),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "bound": bound,
            "cpu_seconds_median": cpu_per_step[name],
            # The ratio of process CPU times, which other processes on the
            # machine disturb less than wall time.
            "cpu_time_ratio": cpu_per_step[name] / cpu_per_step["sgd"],
            "cpu_share_median": statistics.median(shares[name]),
        }
        print(f"{name:<20} {step:6.3f} ({min(per_step[name]):.3f}.."
              f"{max(per_step[name]):.3f}) "
              f"{statistics.median(ratios):8.3f} ({min(ratios):.3f}.."
              f"{max(ratios):.3f}) "
              f"{'' if bound is None else f'{bound:.3f}':>6} "
              f"{cpu_per_step[name] / cpu_per_step['sgd']:7.3f} "
              f"{statistics.median(shares[name]):9.2f}")
    if FLAGS.output:
        common.write_results(
            FLAGS.output, dict(batch_size=FLAGS.batch_size,
                               rounds=FLAGS.rounds, steps=FLAGS.steps,
                               model=FLAGS.model),
            results=results)


if __name__ == "__main__":
    app.run(main)
