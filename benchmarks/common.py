"""What the benchmark scripts share: the machine record, the timing loop
and the per-round ratio rows their tables and JSON files are made of."""

import json
import os
import platform
import statistics
import time


def environment_info(**extra):
    """What the numbers were measured on, plus `extra` fields."""
    import keras
    import tensorflow as tf

    try:
        from tensorflow.python.util import _pywrap_util_port
        onednn_built = bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # pylint: disable=broad-except
        onednn_built = None
    cpu_model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "onednn_enabled_in_build": onednn_built,
        **extra,
    }


def estimator_bound(method, micro_batch_size, num_micro_batches,
                    batch_size):
    """The step-cost target of a CLARS step, as a ratio to SGD's step.

    The loop estimator may cost 1.1x the main step per extra example it
    processes, the one-pass estimator 0.3x per example it reads (1.15 at
    J * s = B / 2, 1.3 at J * s = B).
    """
    per_example = 0.3 if method == "one_pass" else 1.1
    return 1.0 + (per_example * micro_batch_size * num_micro_batches
                  / batch_size)


def interleave(steps, rounds, per_round, rewarm=False,
               format_seconds=lambda s: f"{s:.2f}s"):
    """Per-round per-step seconds of every candidate, rotating the order.

    Also returns the process CPU seconds per step (a cross-check that other
    processes affect less than wall time, though it counts work rather than
    time), and per candidate and round the share of the machine's CPUs this
    process used (CPU time / (wall time x CPU count)): a low share flags a
    round slowed by other processes.

    Args:
        steps: name -> callable running one step.
        rounds: interleaved rounds.
        per_round: name -> steps timed per round.
        rewarm: run one untimed step before timing each candidate, to
            re-warm caches after the previous one.
        format_seconds: how the progress line prints a step time.
    """
    names = list(steps)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    shares = {name: [] for name in names}
    cpus = os.cpu_count() or 1
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if rewarm:
                steps[name]()
            cpu_start = time.process_time()
            start = time.perf_counter()
            count = per_round[name]
            for _ in range(count):
                steps[name]()
            wall = time.perf_counter() - start
            times[name].append(wall / count)
            cpu = time.process_time() - cpu_start
            cpu_times[name].append(cpu / count)
            shares[name].append(cpu / (wall * cpus))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {format_seconds(times[n][-1])}" for n in names), flush=True)
    return times, cpu_times, shares


def per_round_rows(times, cpu_times, shares, unit):
    """Each candidate's per-round step seconds, CPU seconds and CPU share
    (from `interleave`), and its ratios to `unit`'s step in the same round."""
    return {name: {"seconds": times[name], "cpu_seconds": cpu_times[name],
                   "cpu_share": shares[name],
                   "ratios": [t / u for t, u in zip(times[name],
                                                    times[unit])]}
            for name in times}


def ratio_columns(row):
    """A row's median ratio, its min..max and its median CPU share."""
    ratios = row["ratios"]
    return (f"{statistics.median(ratios):6.2f} "
            f"{min(ratios):5.2f}..{max(ratios):<5.2f} "
            f"{statistics.median(row['cpu_share']):5.2f}")


def paired_extra(rows, candidate, base, unit):
    """What `candidate` costs over `base`, in steps of `unit`, paired per
    round: `{"wall" | "cpu": (median, mean, low, high)}`, where (low, high)
    is the mean's 95% t interval over the rounds.

    Args:
        rows: `per_round_rows`-like `{name: {"seconds": [...],
            "cpu_seconds": [...]}}`, one entry per round.
    """
    from scipy import stats

    extra = {}
    for clock, key in (("wall", "seconds"), ("cpu", "cpu_seconds")):
        values = [(with_it - without) / step for with_it, without, step
                  in zip(rows[candidate][key], rows[base][key],
                         rows[unit][key])]
        mean = statistics.mean(values)
        half = (stats.t.ppf(0.975, len(values) - 1)
                * statistics.stdev(values) / len(values) ** 0.5)
        extra[clock] = (statistics.median(values), mean, mean - half,
                        mean + half)
    return extra


def pooled_rows(runs):
    """Several runs' per-round rows as one run's: each candidate's rounds
    one after another, run by run.

    Args:
        runs: the `candidates` of each run's `--output`, all with the same
            candidates.

    Raises:
        ValueError: the runs timed different candidates.
    """
    names = set(runs[0])
    for run in runs[1:]:
        if set(run) != names:
            raise ValueError(
                f"The runs timed different candidates "
                f"({sorted(names)} and {sorted(run)}); pool runs of the "
                "same candidates.")
    return {name: {key: [value for run in runs for value in run[name][key]]
                   for key in runs[0][name]}
            for name in runs[0]}


def write_results(path, environment, **results):
    """Writes `results` beside the `environment_info(**environment)` record
    as JSON to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"environment": environment_info(**environment),
                   **results}, f, indent=1)


def synthetic_batch(batch_size, image_shape, num_classes=10, seed=0):
    """Normal images and uniform integer labels, `(x, y)` as tensors."""
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(batch_size, *image_shape)), "float32")
    y = tf.constant(rng.integers(0, num_classes, batch_size), "int32")
    return x, y


def logits_loss(labels, logits):
    """Per-example sparse cross-entropy on logits."""
    import keras
    return keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)
