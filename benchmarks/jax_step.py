"""Cost of a CLARS `model.fit` step against SGD's, on JAX beside TensorFlow.

Keras picks its backend once per process, so the command runs this module
twice as child processes, TensorFlow first and JAX second, one after the
other; each times, side by side in its own process (interleaved rounds,
`common.interleave`), one fit step of ResNet-20 (32x32x3 inputs, 10
classes, sparse cross-entropy, accuracy metric) at batch B on fixed
synthetic data for:

  * `sgd`: `keras.optimizers.SGD(momentum=0.9)`, Keras's own step;
  * `clars_s8_j64`: CLARS with `attach_gradient_norm_estimator` at the
    reference s = 8, J = 64: on TensorFlow the loop estimator (J passes in
    a `tf.while_loop`), on JAX `VmapGradientNormEstimator` (the J passes
    vectorised, inside Keras's jitted step);
  * on JAX also `clars_s8_j64_chunk32`: the same estimate in chunks of 32
    micro-batches (`chunk_size=32`, a sequential `jax.lax.map` over 2
    vectorised chunks): what bounding the memory costs.

The step timed is what fit runs per step: `model.train_function(iterator)`
on TensorFlow (as `benchmarks.fit_step`), the jitted `model.train_step` on
the model's state on JAX (what Keras's JAX fit jits). Each backend's
ratio to its own SGD step is the comparable figure; seconds across the two
processes are printed too, with the load average next to them.

Run from the repository root (`--rounds=2 --chunk_size=0` took 14 min on
a 2-core CPU shared with four other jobs):

    python3 -m benchmarks.jax_step --output=/tmp/jax_step.json
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("backend", None, ["tensorflow", "jax"],
                  "Time this backend in this process (set by the command "
                  "for its children); unset: run both as children.")
flags.DEFINE_integer("batch_size", 1024, "Batch size B.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds (each times every "
                     "candidate).")
flags.DEFINE_integer("steps", 1, "fit steps per timed call.")
flags.DEFINE_integer("warmup", 1, "Untimed calls per candidate after the "
                     "tracing fit step.")
flags.DEFINE_integer("micro_batch_size", 8, "s.")
flags.DEFINE_integer("num_micro_batches", 64, "J.")
flags.DEFINE_integer("chunk_size", 32, "Micro-batches per chunk of the "
                     "chunked JAX candidate; 0: no such candidate.")
flags.DEFINE_string("model", "resnet20", "Model name for models.build_model.")
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("num_classes", 10, "Number of classes.")
flags.DEFINE_float("learning_rate", 0.01, "Learning rate of every optimizer.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data and the model.")
flags.DEFINE_string("output", None, "Write the results as JSON to this path.")


def candidate_chunks():
    """name -> the chunk size of its estimator (0: all J), None for SGD."""
    name = f"clars_s{FLAGS.micro_batch_size}_j{FLAGS.num_micro_batches}"
    candidates = {"sgd": None, name: 0}
    if FLAGS.backend == "jax" and FLAGS.chunk_size:
        candidates[f"{name}_chunk{FLAGS.chunk_size}"] = FLAGS.chunk_size
    return candidates


def fit_call(chunk, x, y):
    """A no-argument callable running `--steps` fit steps of a fresh model."""
    import keras

    import clars_tf
    from clars_tf import models

    keras.utils.set_random_seed(FLAGS.seed)
    model = models.build_model(
        FLAGS.model, (FLAGS.image_size, FLAGS.image_size, 3),
        FLAGS.num_classes)
    optimizer = (keras.optimizers.SGD(FLAGS.learning_rate, momentum=0.9)
                 if chunk is None else
                 clars_tf.CLARS(FLAGS.learning_rate, momentum=0.9))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"])
    s, j = FLAGS.micro_batch_size, FLAGS.num_micro_batches
    if chunk is not None:
        clars_tf.attach_gradient_norm_estimator(
            model, clars_tf.VmapGradientNormEstimator(s, j,
                                                      chunk_size=chunk or j)
            if FLAGS.backend == "jax" else clars_tf.GradientNormEstimator(s, j))
    # Builds the train function (optimizer and metric variables) and runs
    # one step.
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0)
    if FLAGS.backend == "jax":
        return _jax_steps(model, x, y)
    import tensorflow as tf

    iterator = iter(model.distribute_strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((x, y)).repeat()))

    def run():
        for _ in range(FLAGS.steps):
            logs = model.train_function(iterator)
        return float(logs["loss"])

    return run


def _jax_steps(model, x, y):
    import jax

    step = jax.jit(model.train_step)
    state = [[v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables)]
    data = (jax.numpy.asarray(x), jax.numpy.asarray(y))

    def run():
        nonlocal state
        for _ in range(FLAGS.steps):
            logs, state = step(state, data)
        return float(logs["loss"])

    return run


def time_backend():
    """Times this process's backend; returns name -> figures."""
    import numpy as np

    rng = np.random.default_rng(FLAGS.seed)
    x = rng.normal(size=(FLAGS.batch_size, FLAGS.image_size,
                         FLAGS.image_size, 3)).astype("float32")
    y = rng.integers(0, FLAGS.num_classes, FLAGS.batch_size).astype("int32")
    calls = {}
    for name, chunk in candidate_chunks().items():
        calls[name] = fit_call(chunk, x, y)
        losses = [calls[name]() for _ in range(FLAGS.warmup)]
        print(f"  {FLAGS.backend} {name}: traced and warmed up, loss "
              f"{losses[-1]:.3f}" if losses else "", flush=True)
    load_before = os.getloadavg()[0]
    times, cpu_times, shares = common.interleave(
        calls, FLAGS.rounds, {name: 1 for name in calls},
        format_seconds=lambda seconds: f"{seconds / FLAGS.steps:.2f}s")
    rows = common.per_round_rows(times, cpu_times, shares, "sgd")
    results = {}
    for name, row in rows.items():
        seconds = [t / FLAGS.steps for t in row["seconds"]]
        results[name] = {
            "step_seconds_median": statistics.median(seconds),
            "ratio_median": statistics.median(row["ratios"]),
            "ratio_min": min(row["ratios"]),
            "ratio_max": max(row["ratios"]),
            # Process CPU time, which other processes disturb less than
            # wall time.
            "cpu_time_ratio": (statistics.median(row["cpu_seconds"])
                               / statistics.median(rows["sgd"]["cpu_seconds"])),
            "cpu_share_median": statistics.median(row["cpu_share"]),
        }
    return {"backend": FLAGS.backend, "load_average_1min": [
        load_before, os.getloadavg()[0]], "candidates": results}


def run_children():
    """Runs each backend in a child process; returns their results."""
    results = []
    passed = [arg for arg in sys.argv[1:] if not arg.startswith("--output")]
    for backend in ("tensorflow", "jax"):
        environment = dict(os.environ, KERAS_BACKEND=backend,
                           TF_CPP_MIN_LOG_LEVEL="2")
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.jax_step",
             f"--backend={backend}", *passed], env=environment,
            stdout=subprocess.PIPE, text=True, check=True)
        lines = completed.stdout.splitlines()
        print("\n".join(lines[:-1]), flush=True)
        results.append(json.loads(lines[-1]))
    return results


def main(argv):
    del argv
    if FLAGS.backend is not None:
        print(json.dumps(time_backend()))
        return
    results = run_children()
    print(f"\nmodel.fit step, {FLAGS.model}, B={FLAGS.batch_size}, "
          f"{FLAGS.rounds} rounds x {FLAGS.steps} steps")
    print(f"{'backend':<11} {'candidate':<22} {'s/step':>7} "
          f"{'x SGD (min..max)':>20} {'cpu-t x':>7} {'cpu share':>9} "
          f"{'load':>11}")
    for result in results:
        load = "{:.1f}->{:.1f}".format(*result["load_average_1min"])
        for name, row in result["candidates"].items():
            print(f"{result['backend']:<11} {name:<22} "
                  f"{row['step_seconds_median']:7.3f} "
                  f"{row['ratio_median']:6.2f} ({row['ratio_min']:.2f}.."
                  f"{row['ratio_max']:.2f}) {row['cpu_time_ratio']:7.2f} "
                  f"{row['cpu_share_median']:9.2f} "
                  f"{load:>11}")
    if FLAGS.output:
        settings = {name: getattr(FLAGS, name) for name in (
            "batch_size", "rounds", "steps", "micro_batch_size",
            "num_micro_batches", "chunk_size", "model")}
        common.write_results(FLAGS.output, settings, results=results)


if __name__ == "__main__":
    app.run(main)
