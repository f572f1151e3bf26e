r"""SIGKILL trials that hit training, checkpoint writes and the export.

Runs one uninterrupted reference (train, evaluate, export) and records its
timeline: when the first checkpoint exists, when the export starts, when it
ends. Then, `--trials` times, starts the same run in a fresh directory and
kills it with SIGKILL at a moment drawn from one of three targets, in turn:

  training:          uniformly between the first checkpoint and the start of
                     the export (the reference's timeline);
  checkpoint_write:  while the n-th checkpoint after the first is being
                     written (its `ckpt-N_temp` directory exists; n random);
  export:            a random moment within the export (its staging
                     directory exists), as long as the reference's took.

Just before each kill it notes the phase the run is really in (what is on
disk), then checks that the latest checkpoint reads back completely and that
any export in place is complete, reruns the same command to the end and
compares the final checkpoint with the reference bit for bit. Prints one
JSON line per trial and a summary with the count of kills per phase.

    python scripts/fault_trials.py --trials=20 --seed=10 \
        --output=runs/fault_trials.json
"""

import argparse
import collections
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A checkpoint every step, so the training window is mostly checkpoint
# writes and resumes land on every step.
OVERRIDE = ("task.dataset=synthetic,train.global_batch_size=64,"
            "estimator.num_micro_batches=4,train.max_steps=12,"
            "train.steps_per_loop=1,train.checkpoint_every_steps=1,"
            "train.eval_batch_size=512,train.deterministic=true")
TARGETS = ("training", "checkpoint_write", "export")
POLL_S = 0.002


def command(model_dir):
    return [sys.executable, "-m", "trainers.train",
            "--config_file=configs/fashion_mnist_resnet8_clars.yaml",
            f"--model_dir={model_dir}", "--mode=train_and_eval",
            f"--params_override={OVERRIDE}"]


def environment():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def start(model_dir):
    return subprocess.Popen(command(model_dir), cwd=REPO, env=environment(),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def checkpoint_temps(model_dir):
    return glob.glob(os.path.join(model_dir, "checkpoints", "*_temp"))


def has_checkpoint(model_dir):
    return os.path.exists(os.path.join(model_dir, "checkpoints",
                                       "checkpoint"))


def export_staging(model_dir):
    return glob.glob(os.path.join(model_dir, "export.partial-*")) + (
        glob.glob(os.path.join(model_dir, "export.previous-*")))


def phase(model_dir, process):
    """What the run is doing, judged by what is on disk."""
    if process.poll() is not None:
        return "after_exit"
    if export_staging(model_dir):
        return "export"
    if checkpoint_temps(model_dir) or glob.glob(os.path.join(
            model_dir, "checkpoints", "checkpoint.tmp*")):
        return "checkpoint_write"
    if not has_checkpoint(model_dir):
        return "start_up"
    if os.path.isdir(os.path.join(model_dir, "export")):
        return "after_export"
    return "training"


def wait_for(condition, process, timeout=900):
    """Polls until condition() or the process exits; whether it held."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(POLL_S)
    return False


def reference_timeline(model_dir):
    """Runs the reference to the end; seconds from start to each event."""
    begin = time.time()
    process = start(model_dir)
    events = {}
    while process.poll() is None:
        now = time.time() - begin
        if "first_checkpoint" not in events and has_checkpoint(model_dir):
            events["first_checkpoint"] = now
        if "export_start" not in events and export_staging(model_dir):
            events["export_start"] = now
        if ("export_start" in events and "export_end" not in events
                and not export_staging(model_dir)):
            events["export_end"] = now
        time.sleep(POLL_S)
    events["end"] = time.time() - begin
    if process.returncode:
        raise RuntimeError(f"the reference run failed ({process.returncode})")
    if set(events) != {"first_checkpoint", "export_start", "export_end",
                       "end"}:
        raise RuntimeError(f"reference timeline incomplete: {events}")
    return events


def latest_values(model_dir):
    """All values of the latest checkpoint, or None if there is none.

    Raises if the checkpoint the index points to cannot be read completely.
    """
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(os.path.join(model_dir,
                                                     "checkpoints"))
    if latest is None:
        return None
    reader = tf.train.load_checkpoint(latest)
    return {name: reader.get_tensor(name)
            for name, _ in tf.train.list_variables(latest)}


def export_complete(model_dir):
    """None when there is no export; else whether it is a whole SavedModel."""
    import tensorflow as tf

    export_dir = os.path.join(model_dir, "export")
    if not os.path.exists(export_dir):
        return None
    try:
        tf.saved_model.load(export_dir)
        return True
    except Exception:  # noqa: BLE001: any unreadable export is a failure
        return False


def kill_during(target, model_dir, timeline, rng):
    """Starts a run and kills it per `target`; the phase it was in."""
    process = start(model_dir)
    wait_for(lambda: has_checkpoint(model_dir), process)
    if target == "training":
        time.sleep(rng.uniform(0, timeline["export_start"]
                               - timeline["first_checkpoint"]))
    elif target == "checkpoint_write":
        writes = rng.randint(1, 8)
        seen = set()

        def nth_write_started():
            seen.update(checkpoint_temps(model_dir))
            return len(seen) >= writes

        wait_for(nth_write_started, process)
    else:
        wait_for(lambda: bool(export_staging(model_dir)), process)
        time.sleep(rng.uniform(0, timeline["export_end"]
                               - timeline["export_start"]))
    landed = phase(model_dir, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return landed


def run_to_end(model_dir):
    result = subprocess.run(command(model_dir), cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=900)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="fault_trials_")
    begin = time.time()
    reference_dir = os.path.join(work, "reference")
    timeline = reference_timeline(reference_dir)
    reference = latest_values(reference_dir)
    print(json.dumps({"reference_timeline_s": {
        k: round(v, 2) for k, v in timeline.items()}}), flush=True)
    trials = []
    for trial in range(args.trials):
        model_dir = os.path.join(work, f"trial{trial}")
        target = TARGETS[trial % len(TARGETS)]
        record = {"trial": trial, "target": target,
                  "phase": kill_during(target, model_dir, timeline, rng)}
        try:
            values = latest_values(model_dir)
            step = (values or {}).get(
                "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")
            record["checkpoint_after_kill"] = (
                None if step is None else int(step))
            record["restorable"] = values is not None
        except Exception as error:  # any unreadable checkpoint is a failure
            record["restorable"] = False
            record["error"] = str(error)[:500]
        record["export_after_kill"] = export_complete(model_dir)
        try:
            run_to_end(model_dir)
            final = latest_values(model_dir)
            record["identical_to_reference"] = set(final) == set(
                reference) and all(np.array_equal(final[k], reference[k])
                                   for k in reference)
            record["export_after_rerun"] = export_complete(model_dir)
        except Exception as error:  # noqa: BLE001: recorded as a failure
            record["identical_to_reference"] = False
            record["error"] = str(error)[:500]
        trials.append(record)
        print(json.dumps(record), flush=True)
        shutil.rmtree(model_dir, ignore_errors=True)
    summary = {
        "trials": len(trials),
        "kills_by_phase": dict(collections.Counter(
            t["phase"] for t in trials)),
        "checkpoints_lost": sum(not t["restorable"] for t in trials),
        "exports_broken": sum(t["export_after_kill"] is False
                              or t.get("export_after_rerun") is not True
                              for t in trials),
        "resumes_not_identical": sum(not t["identical_to_reference"]
                                     for t in trials),
        "reference_timeline_s": {k: round(v, 1) for k, v in timeline.items()},
        "total_minutes": round((time.time() - begin) / 60, 1),
        "command": "python scripts/fault_trials.py " + " ".join(
            sys.argv[1:]),
    }
    print(json.dumps(summary, indent=2))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)),
                    exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"summary": summary, "trials": trials}, f, indent=2)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not (summary["checkpoints_lost"] or summary["exports_broken"]
                     or summary["resumes_not_identical"]) else 1


if __name__ == "__main__":
    sys.exit(main())
