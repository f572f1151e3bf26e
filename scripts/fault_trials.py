r"""SIGKILL trials: a killed trainer always leaves a restorable checkpoint.

Runs one uninterrupted reference, then `--trials` times: starts the same
run in a fresh directory, kills it with SIGKILL at a random moment (during
start-up, training or one of the checkpoint writes: a checkpoint is written
every step), checks that the latest checkpoint reads back completely, reruns
the same command to the end and compares the final weights with the
reference bit for bit.

    python3 scripts/fault_trials.py --trials=20 --output=runs/fault_trials.json
"""

import argparse
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
OVERRIDE = ("task.dataset=synthetic,train.global_batch_size=64,"
            "estimator.num_micro_batches=4,train.max_steps=24,"
            "train.steps_per_loop=1,train.checkpoint_every_steps=1,"
            "train.deterministic=true")


def command(model_dir):
    return [sys.executable, "-m", "trainers.train",
            "--config_file=configs/fashion_mnist_resnet8_clars.yaml",
            f"--model_dir={model_dir}", "--mode=train",
            f"--params_override={OVERRIDE}"]


def environment():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


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
    reference_dir = os.path.join(work, "reference")
    start = time.time()
    run_to_end(reference_dir)
    duration = time.time() - start
    reference = latest_values(reference_dir)
    trials = []
    for trial in range(args.trials):
        model_dir = os.path.join(work, f"trial{trial}")
        kill_after = rng.uniform(0.3, duration)
        process = subprocess.Popen(command(model_dir), cwd=REPO,
                                   env=environment(),
                                   stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(kill_after)
        killed_running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        record = {"trial": trial, "kill_after_s": round(kill_after, 2),
                  "killed_while_running": killed_running}
        try:
            values = latest_values(model_dir)
            record["checkpoint_after_kill"] = (
                None if values is None else
                int(values["optimizer/_iterations/.ATTRIBUTES/"
                           "VARIABLE_VALUE"]))
            record["restorable"] = True
        except Exception as error:  # any unreadable checkpoint is a failure
            record["restorable"] = False
            record["error"] = str(error)[:500]
        try:
            run_to_end(model_dir)
            final = latest_values(model_dir)
            record["identical_to_reference"] = set(final) == set(
                reference) and all(np.array_equal(final[k], reference[k])
                                   for k in reference)
        except Exception as error:
            record["identical_to_reference"] = False
            record["error"] = str(error)[:500]
        trials.append(record)
        print(json.dumps(record), flush=True)
        shutil.rmtree(model_dir, ignore_errors=True)
    summary = {
        "trials": len(trials),
        "killed_while_running": sum(t["killed_while_running"] for t in trials),
        "checkpoints_lost": sum(not t["restorable"] for t in trials),
        "resumes_not_identical": sum(not t["identical_to_reference"]
                                     for t in trials),
        "reference_run_seconds": round(duration, 1),
        "command": "python3 scripts/fault_trials.py " + " ".join(
            sys.argv[1:]),
    }
    print(json.dumps(summary, indent=2))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)),
                    exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"summary": summary, "trials": trials}, f, indent=2)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not (summary["checkpoints_lost"]
                     or summary["resumes_not_identical"]) else 1


if __name__ == "__main__":
    sys.exit(main())
