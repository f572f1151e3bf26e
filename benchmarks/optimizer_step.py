"""Cost of one optimizer step over ResNet-50's variables: CLARS, LARS vs SGD.

Times `optimizer.apply(gradients, variables)` alone (no forward or backward
pass) over the 161 trainable variables (25.6M floats) of
`models.build_model("resnet50", (224, 224, 3), 1000)`, for

  * `sgd`:   `keras.optimizers.SGD(momentum=0.9)`, the baseline;
  * `lars`:  `clars_tf.LARS`;
  * `clars`: `clars_tf.CLARS`, with `gradient_norms=` fixed random positive
    floats (the estimator itself is not timed here; see `train_step.py`).

Each candidate's apply is wrapped in its own `tf.function` (optionally
`jit_compile=True`). The gradients are random, fixed tensors captured by the
functions. All optimizers update the SAME model variables: an update costs
the same whatever the values are (no data-dependent branches; the learning
rate is small, so the drift from repeated fixed gradients stays far from
overflow or denormals), and sharing keeps the memory footprint, allocation
and cache behaviour identical for every candidate, where separate copies
would add 100 MB per candidate and let allocation order favour one of them.
Each optimizer has its own momentum buffers.

The candidates are interleaved: after tracing and warm-up, each of
`--rounds` rounds times every candidate for `--iterations` back-to-back
steps (one untimed step first), starting at a different candidate every
round. Each round gives a per-step time per candidate and a ratio to that
round's SGD time; the table reports medians with min..max over rounds, so the
noise of this shared machine shows instead of hiding in a single number.

Targets (from the issue): CLARS <= 1.3x SGD, LARS <= 1.5x SGD.

Command (2-core CPU: about 1 minute):

    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.optimizer_step \\
        --output=/tmp/optimizer_step.json

Run it from the repository root.
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 15, "Interleaved rounds (each times every "
                     "candidate once).")
flags.DEFINE_integer("iterations", 10, "Timed steps per candidate per round "
                     "(short rounds keep each ratio's two timings close in "
                     "time).")
flags.DEFINE_integer("warmup", 5, "Untimed steps per candidate after tracing.")
flags.DEFINE_string("model", "resnet50", "Model whose variables are updated.")
flags.DEFINE_integer("image_size", 224, "Input height and width.")
flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
flags.DEFINE_float("learning_rate", 0.01, "Learning rate of every optimizer.")
flags.DEFINE_float("weight_decay_rate", 2e-4,
                   "Coupled L2 decay of LARS and CLARS (the spec's ImageNet "
                   "value); SGD has none, as Keras's default.")
flags.DEFINE_bool("jit_compile", False,
                  "Wrap every candidate in tf.function(jit_compile=True).")
flags.DEFINE_integer("seed", 0, "Seed of the random gradients and norms.")
flags.DEFINE_string("output", None, "Write the results as JSON to this path.")

TARGETS = {"clars": 1.3, "lars": 1.5}


# --------------------------------------------------------------- helpers
def summarize(times, baseline_times, cpu_times, baseline_cpu_times):
    """Medians and spreads of per-step times and of per-round ratios."""
    ratios = [t / b for t, b in zip(times, baseline_times)]
    cpu_ratios = [t / b for t, b in zip(cpu_times, baseline_cpu_times)]
    return {
        "cpu_seconds_per_step": cpu_times,
        "cpu_time_ratio_to_baseline": cpu_ratios,
        "median_cpu_time_ratio": statistics.median(cpu_ratios),
        "min_cpu_time_ratio": min(cpu_ratios),
        "max_cpu_time_ratio": max(cpu_ratios),
        "step_seconds": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "ratio_to_baseline": ratios,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


# ------------------------------------------------------------------ main
def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import clars_tf
    from clars_tf import models

    # One tf.function per candidate wraps the same Python closure, which
    # TensorFlow reports as "retracing"; it is expected here.
    tf.get_logger().setLevel("ERROR")
    env = common.environment_info()
    print("Environment:", json.dumps(env), flush=True)

    model = models.build_model(
        FLAGS.model, (FLAGS.image_size, FLAGS.image_size, 3),
        FLAGS.num_classes)
    variables = model.trainable_variables
    sizes = [int(np.prod(v.shape)) for v in variables]
    print(f"{FLAGS.model}: {len(variables)} trainable variables, "
          f"{sum(sizes):,} floats, "
          f"{sum(len(v.shape) > 1 for v in variables)} of rank > 1",
          flush=True)
    rng = np.random.default_rng(FLAGS.seed)
    grads = [tf.constant(1e-3 * rng.standard_normal(v.shape).astype(
        "float32")) for v in variables]
    norms = [tf.constant(x) for x in
             rng.uniform(0.1, 1.0, len(variables)).astype("float32")]

    lr = FLAGS.learning_rate
    wd = FLAGS.weight_decay_rate
    optimizers = {
        "sgd": keras.optimizers.SGD(lr, momentum=0.9),
        "lars": clars_tf.LARS(lr, momentum=0.9, weight_decay_rate=wd),
        "clars": clars_tf.CLARS(lr, momentum=0.9, weight_decay_rate=wd),
    }
    descriptions = {
        "sgd": "keras SGD(momentum=0.9), baseline",
        "lars": f"clars_tf.LARS(weight_decay_rate={wd})",
        "clars": f"clars_tf.CLARS(weight_decay_rate={wd})",
    }
    candidates = {}
    op_counts = {}
    for name, optimizer in optimizers.items():
        optimizer.build(variables)
        if isinstance(optimizer, clars_tf.CLARS):
            def step(optimizer=optimizer):
                optimizer.apply(grads, variables, gradient_norms=norms)
        else:
            def step(optimizer=optimizer):
                optimizer.apply(grads, variables)
        function = tf.function(step, jit_compile=FLAGS.jit_compile)
        start = time.perf_counter()
        function()
        op_counts[name] = len(
            function.get_concrete_function().graph.get_operations())
        for _ in range(FLAGS.warmup):
            function()
        print(f"traced and warmed {name} in "
              f"{time.perf_counter() - start:.1f} s "
              f"({op_counts[name]} graph ops)", flush=True)
        candidates[name] = function

    print(f"Timing {FLAGS.rounds} rounds x {FLAGS.iterations} steps...",
          flush=True)
    load_before = os.getloadavg()
    times, cpu_times, shares = common.interleave(
        candidates, FLAGS.rounds, {name: FLAGS.iterations for name in candidates},
        rewarm=True, format_seconds=lambda s: f"{s * 1e3:.1f} ms")
    load_after = os.getloadavg()

    results = {}
    for name in candidates:
        summary = summarize(times[name], times["sgd"], cpu_times[name],
                            cpu_times["sgd"])
        summary["description"] = descriptions[name]
        summary["graph_ops"] = op_counts[name]
        summary["cpu_share"] = shares[name]
        summary["median_cpu_share"] = statistics.median(shares[name])
        summary["target"] = TARGETS.get(name)
        summary["meets_target"] = (
            None if summary["target"] is None
            else summary["median_ratio"] <= summary["target"])
        results[name] = summary

    print()
    print(f"One optimizer step over {FLAGS.model}'s variables "
          f"(median of {FLAGS.rounds} rounds x {FLAGS.iterations} steps; "
          f"jit_compile={FLAGS.jit_compile}; "
          f"TF_ENABLE_ONEDNN_OPTS={env['TF_ENABLE_ONEDNN_OPTS']}; "
          f"{env['cpu_count']} CPUs, TF {env['tensorflow']})")
    header = (f"{'candidate':16s} {'ms/step':>8s} {'min..max ms':>15s} "
              f"{'x SGD':>6s} {'min..max':>11s} {'target':>7s} {'met':>4s}"
              f" {'ops':>5s} {'cpu':>5s} {'cpu-t x':>7s}")
    print(header)
    print("-" * len(header))
    for name, s in results.items():
        target = "" if s["target"] is None else f"<={s['target']}"
        met = "" if s["meets_target"] is None else (
            "yes" if s["meets_target"] else "NO")
        print(f"{name:16s} {s['median_s'] * 1e3:8.2f} "
              f"{s['min_s'] * 1e3:7.2f}..{s['max_s'] * 1e3:<7.2f}"
              f"{s['median_ratio']:6.3f} "
              f"{s['min_ratio']:5.3f}..{s['max_ratio']:<5.3f}"
              f"{target:>7s} {met:>4s} {s['graph_ops']:5d} "
              f"{s['median_cpu_share']:5.2f} "
              f"{s['median_cpu_time_ratio']:7.3f}")
    print("x SGD: median of per-round wall-time ratios; cpu: median share "
          "of all CPUs used; cpu-t x: median ratio of process CPU time per "
          "step (less sensitive to other processes).")
    all_shares = [x for name in results for x in results[name]["cpu_share"]]
    print(f"CPU share used by this process while timing: median "
          f"{statistics.median(all_shares):.2f}, min {min(all_shares):.2f} "
          f"(1.00 = all {env['cpu_count']} CPUs); load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after.")

    if FLAGS.output:
        payload = {
            "benchmark": "optimizer_step",
            "command": " ".join([os.path.basename(sys.executable), "-m",
                                 "benchmarks.optimizer_step"] + sys.argv[1:]),
            "environment": env,
            "settings": {
                "model": FLAGS.model,
                "input_shape": [FLAGS.image_size, FLAGS.image_size, 3],
                "num_classes": FLAGS.num_classes,
                "trainable_variables": len(variables),
                "trainable_floats": sum(sizes),
                "rounds": FLAGS.rounds,
                "iterations": FLAGS.iterations,
                "warmup": FLAGS.warmup,
                "learning_rate": lr,
                "weight_decay_rate": wd,
                "jit_compile": FLAGS.jit_compile,
                "variables": "shared by all candidates; separate momentum "
                             "buffers per optimizer",
                "baseline": "sgd",
            },
            "load_average_1min": {"before": load_before[0],
                                  "after": load_after[0]},
            "results": results,
        }
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"\nWrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
