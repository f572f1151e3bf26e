"""Cost of one full training step with CLARS's gradient-norm estimator.

One step of ResNet-20 (32x32x3 inputs, 10 classes) at global batch B on
fixed synthetic data: forward, backward, (for CLARS) the micro-batch
gradient-norm estimate, and the optimizer update, all in one `tf.function`:

    out = clars_tf.compute_loss_gradients_and_norms(
        model, per_example_loss, x, y, global_batch_size=B, optimizer=opt,
        estimator=est)
    opt.apply(out.gradients, model.trainable_variables,
              gradient_norms=out.gradient_norms)   # no norms for SGD/LARS

Candidates (timed side by side in one process):

  * `sgd`: `keras.optimizers.SGD(momentum=0.9)`, the baseline;
  * `lars`: `clars_tf.LARS`;
  * `clars_s8_j64`: CLARS with the reference estimator (s=8, J=64);
  * `clars_s1_j64`: CLARS with per-example norms (s=1, J=64);
  * `clars_s8_j{8,16,32}`: the J sweep at s=8 (J=64 is the reference);
  * `one_pass_s8_j64`, `one_pass_s8_j128`: CLARS with the one-pass
    estimator (`OnePassGradientNormEstimator`) at the reference J and with
    every example in a micro-batch (J * s = B), against the issue's bounds
    1.15 and 1.3 (`1 + 0.3 * J * s / B`);
  * `clars_s8_j64_every2`: the reference estimator refreshed every 2nd step
    (`GradientNormEstimator(refresh_every=2)`; timed over 2 steps a round);
  * `mirrored{1,2}/sgd`, `mirrored{1,2}/clars_s8_j64`: the same steps under
    `tf.distribute.MirroredStrategy` over 1 and 2 logical CPU devices
    (`strategy.run`, the batch split contiguously with
    `experimental_distribute_values_from_function`), giving the estimator's
    overhead at 1 vs 2 replicas. One MirroredStrategy per device set.

Every CLARS ratio (step time / SGD step time, SGD under the same strategy
for the mirrored ones) is printed next to the target bound
`1 + 1.1 * J * s / B`: the estimator processes J*s extra examples, and may
cost at most 10% more per example than the main batch does. The `est/ex`
column gives that per-example cost, `(ratio - 1) * B * k / (J * s)` for a
refresh every k steps, against the main step's cost per example.

All candidates without a strategy share one model, those under one strategy
share that strategy's model; each has its own optimizer (built eagerly
before tracing). Two logical CPU devices are configured at startup for the
mirrored runs; candidates without a strategy run on CPU:0 as usual.

Timing: every candidate is traced and warmed up first, then `--rounds`
rounds each time every candidate for `--steps` steps, starting at a
different candidate each round. The table gives the median per-step time
with its min..max, and the median of the per-round ratios with min..max.

Peak memory (`--memory`): each candidate runs alone in a fresh subprocess
(`--memory_child`), so peaks do not mix. It reads /proc/self/status: the
RSS once TensorFlow, the model, the optimizer and the data are set up; the
peak RSS (VmHWM) through tracing and warm-up; and the peak during
`--memory_steps` further steps (VmHWM after resetting it through
/proc/self/clear_refs). The table shows the overall peak and the "step
working set", peak minus set-up RSS. (The allocator keeps its memory, so the
RSS stays at the peak between steps.) `ru_maxrss` is not used: Linux carries
the parent's peak into a child across fork + exec; and
`tf.config.experimental.get_memory_info("CPU:0")` returns zeros on CPU.

Default (B=1024, 7 rounds x 1 step, 2 warm-up steps, no memory) takes about
8 minutes on a 2-core CPU; `--memory` takes about 6 more minutes (run it
alone with `--notiming`). Run from the repository root:

    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.train_step \\
        --output=/tmp/train_step.json
    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.train_step \\
        --notiming --memory --output=/tmp/train_step_memory.json

Longer, steadier runs: `--rounds=9 --steps=2`. Other batch sizes:
`--batch_size=4096` (the estimator must fit: J/replicas * s examples per
replica).
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 1024, "Global batch size B.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds (each times every "
                     "candidate).")
flags.DEFINE_integer("steps", 1, "Timed steps per candidate per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per candidate after the "
                     "tracing step.")
flags.DEFINE_integer("micro_batch_size", 8, "s of the reference estimator "
                     "and of the J sweep.")
flags.DEFINE_integer("num_micro_batches", 64, "J of the reference estimator "
                     "and of the s=1 estimator.")
flags.DEFINE_list("j_sweep", ["8", "16", "32", "64"], "J values swept at "
                  "s=--micro_batch_size.")
flags.DEFINE_bool("one_pass", True, "Include CLARS with the one-pass "
                  "estimator at J=--num_micro_batches and at J*s=B.")
flags.DEFINE_bool("per_example", True, "Include CLARS with s=1.")
flags.DEFINE_list("refresh_every", ["2"], "Also time the reference estimator "
                  "refreshed every k steps (clars_tf's refresh_every), for "
                  "each k listed; timed over k steps per round.")
flags.DEFINE_bool("mirrored", True, "Include the MirroredStrategy runs over "
                  "1 and 2 logical CPU devices.")
flags.DEFINE_list("candidates", None, "Only these candidates (their "
                  "baselines are added). Default: all.")
flags.DEFINE_bool("timing", True, "Time the candidates side by side.")
flags.DEFINE_bool("memory", False, "Measure each candidate's peak memory in "
                  "its own subprocess.")
flags.DEFINE_integer("memory_steps", 3, "Steady-state steps per memory run.")
flags.DEFINE_string("memory_child", None, "Internal: measure this candidate's "
                    "memory and print it as JSON.")
flags.DEFINE_string("model", "resnet20", "Model name for models.build_model.")
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("num_classes", 10, "Number of classes.")
flags.DEFINE_float("learning_rate", 0.01, "Learning rate of every optimizer.")
flags.DEFINE_float("weight_decay_rate", 5e-4, "Coupled L2 decay of LARS and "
                   "CLARS; SGD has none.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data and the model.")
flags.DEFINE_string("output", None, "Write the results as JSON to this path.")

LOGICAL_DEVICES = 2
MEMORY_TAG = "MEMORY_RESULT "


# --------------------------------------------------------------- helpers
def candidate_specs():
    """name -> dict(optimizer, s, J, replicas, baseline); replicas 0 = none."""
    s, j = FLAGS.micro_batch_size, FLAGS.num_micro_batches
    specs = {
        "sgd": dict(optimizer="sgd", s=None, j=None, replicas=0,
                    baseline="sgd"),
        "lars": dict(optimizer="lars", s=None, j=None, replicas=0,
                     baseline="sgd"),
        f"clars_s{s}_j{j}": dict(optimizer="clars", s=s, j=j, replicas=0,
                                 baseline="sgd", reference=True),
    }
    if FLAGS.one_pass:
        # The one-pass estimator at the reference J and with every example
        # of the batch in a micro-batch (J * s = B).
        for one_pass_j in sorted({j, FLAGS.batch_size // s}):
            specs[f"one_pass_s{s}_j{one_pass_j}"] = dict(
                optimizer="clars", s=s, j=one_pass_j, replicas=0,
                baseline="sgd", method="one_pass")
    if FLAGS.per_example:
        specs[f"clars_s1_j{j}"] = dict(optimizer="clars", s=1, j=j,
                                       replicas=0, baseline="sgd")
    for k in sorted({int(v) for v in FLAGS.refresh_every} - {1}):
        specs[f"clars_s{s}_j{j}_every{k}"] = dict(
            optimizer="clars", s=s, j=j, replicas=0, baseline="sgd",
            refresh_every=k)
    for sweep_j in sorted({int(v) for v in FLAGS.j_sweep}):
        name = f"clars_s{s}_j{sweep_j}"
        if name not in specs:
            specs[name] = dict(optimizer="clars", s=s, j=sweep_j, replicas=0,
                               baseline="sgd")
    if FLAGS.mirrored:
        for replicas in (1, 2):
            prefix = f"mirrored{replicas}/"
            specs[prefix + "sgd"] = dict(optimizer="sgd", s=None, j=None,
                                         replicas=replicas,
                                         baseline=prefix + "sgd")
            specs[prefix + f"clars_s{s}_j{j}"] = dict(
                optimizer="clars", s=s, j=j, replicas=replicas,
                baseline=prefix + "sgd")
    if FLAGS.candidates:
        wanted = set(FLAGS.candidates)
        unknown = wanted - set(specs)
        if unknown:
            raise app.UsageError(
                f"Unknown candidates {sorted(unknown)}; known: "
                f"{', '.join(specs)}")
        wanted |= {specs[name]["baseline"] for name in wanted}
        specs = {k: v for k, v in specs.items() if k in wanted}
    return specs


def target_bound(spec):
    """`common.estimator_bound` of a CLARS candidate, else None."""
    if spec["optimizer"] != "clars":
        return None
    return common.estimator_bound(spec.get("method", "loop"), spec["s"],
                                  spec["j"], FLAGS.batch_size)


def fits(spec):
    """Why the estimator can't run at this batch size, or None."""
    if spec["optimizer"] != "clars":
        return None
    replicas = max(1, spec["replicas"])
    per_replica = FLAGS.batch_size // replicas
    count = max(1, spec["j"] // replicas)
    if FLAGS.batch_size % replicas or spec["j"] % replicas:
        return f"B and J must be multiples of {replicas} replicas"
    if count * spec["s"] > per_replica:
        return (f"needs {count}x{spec['s']} examples per replica, has "
                f"{per_replica}")
    return None


class Builder:
    """Creates strategies, models, data and step functions, each once."""

    def __init__(self):
        import tensorflow as tf

        self.tf = tf
        self.strategies = {}
        self.models = {}
        self.batches = {}
        rng = tf.random.Generator.from_seed(FLAGS.seed)
        shape = [FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3]
        self.x = rng.normal(shape)
        self.y = rng.uniform([FLAGS.batch_size], 0, FLAGS.num_classes,
                             dtype=tf.int32)

    def strategy(self, replicas):
        if replicas and replicas not in self.strategies:
            devices = [f"CPU:{i}" for i in range(replicas)]
            self.strategies[replicas] = (
                self.tf.distribute.MirroredStrategy(devices))
        return self.strategies.get(replicas)

    def scope(self, replicas):
        import contextlib

        strategy = self.strategy(replicas)
        return strategy.scope() if strategy else contextlib.nullcontext()

    def model(self, replicas):
        import keras

        from clars_tf import models

        if replicas not in self.models:
            keras.utils.set_random_seed(FLAGS.seed)
            with self.scope(replicas):
                self.models[replicas] = models.build_model(
                    FLAGS.model, (FLAGS.image_size, FLAGS.image_size, 3),
                    FLAGS.num_classes)
        return self.models[replicas]

    def batch(self, replicas):
        if replicas not in self.batches:
            if not replicas:
                self.batches[replicas] = (self.x, self.y)
            else:
                per = FLAGS.batch_size // replicas
                x, y = self.x, self.y

                def part(context):
                    i = context.replica_id_in_sync_group
                    return x[i * per:(i + 1) * per], y[i * per:(i + 1) * per]

                self.batches[replicas] = (
                    self.strategy(replicas)
                    .experimental_distribute_values_from_function(part))
        return self.batches[replicas]

    def step(self, spec):
        """A no-argument callable running one training step."""
        import keras

        import clars_tf

        tf = self.tf
        replicas = spec["replicas"]
        model = self.model(replicas)
        lr, wd = FLAGS.learning_rate, FLAGS.weight_decay_rate
        with self.scope(replicas):
            if spec["optimizer"] == "sgd":
                optimizer = keras.optimizers.SGD(lr, momentum=0.9)
            elif spec["optimizer"] == "lars":
                optimizer = clars_tf.LARS(lr, momentum=0.9,
                                          weight_decay_rate=wd)
            else:
                optimizer = clars_tf.CLARS(lr, momentum=0.9,
                                           weight_decay_rate=wd)
            # Eagerly: optimizer variables created inside a tf.function
            # under MirroredStrategy fail to initialise.
            optimizer.build(model.trainable_variables)
        estimator = None
        if spec["optimizer"] == "clars":
            estimator = clars_tf.estimator_from_config({
                "method": spec.get("method", "loop"),
                "micro_batch_size": spec["s"], "num_micro_batches": spec["j"],
                "refresh_every": spec.get("refresh_every", 1)})
        global_batch = FLAGS.batch_size

        def per_example_loss(y_true, logits):
            return keras.losses.sparse_categorical_crossentropy(
                y_true, logits, from_logits=True)

        def train_step(x, y):
            out = clars_tf.compute_loss_gradients_and_norms(
                model, per_example_loss, x, y,
                global_batch_size=global_batch, optimizer=optimizer,
                estimator=estimator)
            if estimator is None:
                optimizer.apply(out.gradients, model.trainable_variables)
            else:
                optimizer.apply(out.gradients, model.trainable_variables,
                                gradient_norms=out.gradient_norms)
            return out.loss

        batch = self.batch(replicas)
        if not replicas:
            function = tf.function(train_step)
            return lambda: float(function(*batch))
        strategy = self.strategy(replicas)

        @tf.function
        def distributed_step(batch):
            losses = strategy.run(train_step, args=batch)
            return strategy.reduce("SUM", losses, axis=None)

        return lambda: float(distributed_step(batch))


def _proc_status_kib(field):
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False if it can't."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(name):
    """Runs one candidate alone and prints its memory as a JSON line."""
    spec = candidate_specs()[name]
    builder = Builder()
    step = builder.step(spec)
    rss_setup = _proc_status_kib("VmRSS")
    step()  # trace
    for _ in range(FLAGS.warmup):
        step()
    # VmHWM belongs to this process's address space, so unlike ru_maxrss it
    # does not inherit the parent's peak across fork + exec.
    tracing_peak = _proc_status_kib("VmHWM")
    reset = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    for _ in range(FLAGS.memory_steps):
        loss = step()
    hwm = _proc_status_kib("VmHWM") if reset else None
    result = {
        "lifetime_peak_rss_mib": max(tracing_peak or 0, hwm or 0) / 1024,
        "tracing_peak_rss_mib": tracing_peak / 1024 if tracing_peak else None,
        "setup_rss_mib": rss_setup / 1024 if rss_setup else None,
        "rss_before_steps_mib": rss_before / 1024 if rss_before else None,
        "steady_peak_rss_mib": hwm / 1024 if hwm else None,
        "steady_step_extra_mib": (hwm - rss_before) / 1024
        if hwm and rss_before else None,
        # What the step itself holds at its peak: above the process's RSS
        # once TensorFlow, the model, its optimizer and the data are set up.
        "step_working_set_mib": (max(tracing_peak or 0, hwm or 0)
                                 - rss_setup) / 1024 if rss_setup else None,
        "final_loss": loss,
    }
    print(MEMORY_TAG + json.dumps(result), flush=True)


def measure_memory(specs):
    """One subprocess per candidate; returns name -> memory dict."""
    passed = [f"--batch_size={FLAGS.batch_size}",
              f"--micro_batch_size={FLAGS.micro_batch_size}",
              f"--num_micro_batches={FLAGS.num_micro_batches}",
              f"--j_sweep={','.join(FLAGS.j_sweep)}",
              f"--warmup={FLAGS.warmup}",
              f"--memory_steps={FLAGS.memory_steps}",
              f"--model={FLAGS.model}",
              f"--image_size={FLAGS.image_size}",
              f"--num_classes={FLAGS.num_classes}",
              f"--learning_rate={FLAGS.learning_rate}",
              f"--weight_decay_rate={FLAGS.weight_decay_rate}",
              f"--seed={FLAGS.seed}",
              f"--refresh_every={','.join(FLAGS.refresh_every)}",
              "--per_example" if FLAGS.per_example else "--noper_example",
              "--one_pass" if FLAGS.one_pass else "--noone_pass",
              "--mirrored" if FLAGS.mirrored else "--nomirrored"]
    results = {}
    for name in specs:
        start = time.perf_counter()
        process = subprocess.run(
            [sys.executable, "-m", "benchmarks.train_step",
             f"--memory_child={name}"] + passed,
            capture_output=True, text=True, check=False,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = [line for line in process.stdout.splitlines()
                 if line.startswith(MEMORY_TAG)]
        if process.returncode or not lines:
            print(f"  memory {name}: FAILED (exit {process.returncode})\n"
                  + process.stderr[-2000:], flush=True)
            results[name] = {"error": process.stderr[-2000:]}
            continue
        results[name] = json.loads(lines[-1][len(MEMORY_TAG):])
        print(f"  memory {name}: peak RSS "
              f"{results[name]['lifetime_peak_rss_mib']:.0f} MiB, step "
              f"working set {results[name]['step_working_set_mib']:.0f} MiB "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    for name, result in results.items():
        base = results.get(specs[name]["baseline"], {})
        for key in ("steady_peak_rss_mib", "steady_step_extra_mib",
                    "lifetime_peak_rss_mib", "step_working_set_mib"):
            if result.get(key) and base.get(key):
                result[key.replace("_mib", "_ratio")] = result[key] / base[key]
    return results


def print_table(specs, results, memory):
    B = FLAGS.batch_size
    print()
    print(f"One training step of {FLAGS.model}, B={B} "
          f"(median of {FLAGS.rounds} rounds x {FLAGS.steps} step(s); "
          f"ratio = step / SGD step in the same round and strategy)")
    header = (f"{'candidate':24s} {'s/step':>6s} {'min..max s':>11s} "
              f"{'x SGD':>6s} {'min..max':>11s} {'bound':>6s} {'met':>4s} "
              f"{'est/ex':>6s} {'cpu-t x':>7s}")
    if memory:
        header += (f" {'peak MiB':>8s} {'x SGD':>6s} {'step MiB':>8s} "
                   f"{'x SGD':>6s}")
    print(header)
    print("-" * len(header))
    for name, spec in specs.items():
        r = results.get(name, {})
        if "skipped" in r:
            print(f"{name:24s} skipped: {r['skipped']}")
            continue
        line = f"{name:24s} "
        if "median_s" in r:
            bound = "" if r["bound"] is None else f"{r['bound']:.3f}"
            met = "" if r["meets_bound"] is None else (
                "yes" if r["meets_bound"] else "NO")
            line += (f"{r['median_s']:6.2f} "
                     f"{r['min_s']:5.2f}..{r['max_s']:<5.2f}"
                     f"{r['median_ratio']:6.3f} "
                     f"{r['min_ratio']:5.3f}..{r['max_ratio']:<5.3f}"
                     f"{bound:>6s} {met:>4s} ")
            per_example = r.get("estimator_cost_per_example_vs_main")
            line += "      " if per_example is None else f"{per_example:6.2f}"
            line += f" {r['median_cpu_time_ratio']:7.3f}"
        else:
            line += " " * 66
        m = (memory or {}).get(name)
        if m and m.get("lifetime_peak_rss_mib"):
            line += (f" {m['lifetime_peak_rss_mib']:8.0f} "
                     f"{m.get('lifetime_peak_rss_ratio', 1.0):6.3f}"
                     f" {m['step_working_set_mib']:8.0f} "
                     f"{m.get('step_working_set_ratio', 1.0):6.3f}")
        print(line)
    if memory:
        print("peak MiB: the process's peak RSS (VmHWM); step MiB: that peak "
              "minus the RSS once TensorFlow, model, optimizer and data are "
              "set up, i.e. what tracing and the steps add.")
    print("bound = 1 + 1.1*J*s/B for the loop (the reference bound also "
          "for _every<k>), 1 + 0.3*J*s/B for one_pass (1.15 at J*s = B/2, "
          "1.3 at J*s = B); "
          "est/ex = estimator cost per example it processes / main step "
          "cost per example = (ratio - 1) * B * k / (J * s), at most 1.1 "
          "to meet the bound. cpu-t x: median ratio of process CPU time per "
          "step (a cross-check less sensitive to other processes).")
    for replicas in (1, 2):
        s, j = FLAGS.micro_batch_size, FLAGS.num_micro_batches
        r = results.get(f"mirrored{replicas}/clars_s{s}_j{j}", {})
        if "median_ratio" in r:
            print(f"MirroredStrategy, {replicas} replica(s): CLARS/SGD "
                  f"{r['median_ratio']:.3f} "
                  f"({r['min_ratio']:.3f}..{r['max_ratio']:.3f}), "
                  f"estimator overhead {100 * (r['median_ratio'] - 1):.0f}%")


# ------------------------------------------------------------------ main
def configure_devices():
    """Logical CPU devices; must run before TensorFlow initialises."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * LOGICAL_DEVICES)


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_devices()
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if FLAGS.memory_child:
        memory_child(FLAGS.memory_child)
        return

    env = common.environment_info(logical_cpu_devices=LOGICAL_DEVICES)
    print("Environment:", json.dumps(env), flush=True)
    specs = candidate_specs()
    results = {}
    runnable = {}
    for name, spec in specs.items():
        reason = fits(spec)
        if reason:
            results[name] = {"skipped": reason}
            print(f"skipping {name}: {reason}")
        else:
            runnable[name] = spec

    if FLAGS.timing:
        builder = Builder()
        steps = {}
        trace_seconds = {}
        for name, spec in runnable.items():
            start = time.perf_counter()
            step = builder.step(spec)
            step()
            trace_seconds[name] = time.perf_counter() - start
            for _ in range(FLAGS.warmup):
                step()
            steps[name] = step
            print(f"traced {name} in {trace_seconds[name]:.1f} s, warmed up "
                  f"in {time.perf_counter() - start - trace_seconds[name]:.1f}"
                  " s", flush=True)
        print(f"Timing {FLAGS.rounds} rounds x {FLAGS.steps} step(s)...",
              flush=True)
        load_before = os.getloadavg()
        per_round = {name: FLAGS.steps * spec.get("refresh_every", 1)
                     for name, spec in runnable.items()}
        times, cpu_times, shares = common.interleave(steps, FLAGS.rounds,
                                                     per_round)
        load_after = os.getloadavg()
        for name, spec in runnable.items():
            base = times[spec["baseline"]]
            ratios = [t / b for t, b in zip(times[name], base)]
            cpu_ratios = [t / b for t, b in zip(
                cpu_times[name], cpu_times[spec["baseline"]])]
            bound = target_bound(spec)
            median_ratio = statistics.median(ratios)
            if spec["optimizer"] == "clars":
                # Estimator cost per example it processes, relative to the
                # main step's cost per example; the bound allows 1.1.
                examples = spec["j"] * spec["s"] / spec.get(
                    "refresh_every", 1)
                per_example = (median_ratio - 1) * FLAGS.batch_size / examples
            else:
                per_example = None
            results[name] = {
                **{k: v for k, v in spec.items()},
                "step_seconds": times[name],
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "max_s": max(times[name]),
                "images_per_second": FLAGS.batch_size
                / statistics.median(times[name]),
                "ratio_to_baseline": ratios,
                "median_ratio": median_ratio,
                "min_ratio": min(ratios),
                "max_ratio": max(ratios),
                "bound": bound,
                "meets_bound": None if bound is None
                else median_ratio <= bound,
                "estimator_cost_per_example_vs_main": per_example,
                "trace_and_first_step_s": trace_seconds[name],
                "cpu_seconds_per_step": cpu_times[name],
                "cpu_time_ratio_to_baseline": cpu_ratios,
                "median_cpu_time_ratio": statistics.median(cpu_ratios),
                "min_cpu_time_ratio": min(cpu_ratios),
                "max_cpu_time_ratio": max(cpu_ratios),
                "cpu_share": shares[name],
                "median_cpu_share": statistics.median(shares[name]),
            }
        all_shares = [x for v in shares.values() for x in v]
        load = {"before": load_before[0], "after": load_after[0],
                "median_cpu_share": statistics.median(all_shares),
                "min_cpu_share": min(all_shares)}

    else:
        load = None

    memory = None
    if FLAGS.memory:
        print("Peak memory, one subprocess per candidate...", flush=True)
        memory = measure_memory(runnable)

    print_table(specs, results, memory)
    if load:
        print(f"CPU share used by this process while timing: median "
              f"{load['median_cpu_share']:.2f}, min "
              f"{load['min_cpu_share']:.2f} (1.00 = all {env['cpu_count']} "
              f"CPUs); load average {load['before']:.2f} before, "
              f"{load['after']:.2f} after.")

    if FLAGS.output:
        payload = {
            "benchmark": "train_step",
            "command": " ".join([os.path.basename(sys.executable), "-m",
                                 "benchmarks.train_step"] + sys.argv[1:]),
            "environment": env,
            "settings": {
                "model": FLAGS.model,
                "input_shape": [FLAGS.image_size, FLAGS.image_size, 3],
                "num_classes": FLAGS.num_classes,
                "batch_size": FLAGS.batch_size,
                "rounds": FLAGS.rounds,
                "steps_per_round": FLAGS.steps,
                "warmup": FLAGS.warmup,
                "learning_rate": FLAGS.learning_rate,
                "weight_decay_rate": FLAGS.weight_decay_rate,
                "bound": "1 + 1.1 * J * s / B",
            },
            "timing": results if FLAGS.timing else None,
            "load": load,
            "memory": memory,
        }
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"\nWrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
