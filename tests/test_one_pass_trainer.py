"""The trainer with estimator.method=one_pass: reruns, resumes, results.

Each run in its own process, as users run it (`test_trainer.run_trainer`).
"""

import json
import os

import numpy as np

from test_trainer import run_trainer
from test_trainer import checkpoint_values

# 256 trained examples: 4 steps of 64 per epoch, 2 epochs.
SHORT = ("task.dataset=synthetic,task.validation_examples=7936,"
         "estimator.method=one_pass,train.epochs=2,train.steps_per_loop=1,"
         "train.checkpoint_every_steps=1,train.diagnostics_every_steps=4")


def _epochs(model_dir):
    with open(os.path.join(model_dir, "results.json")) as f:
        return json.load(f)["epochs"]


def test_reruns_and_resumes_bit_for_bit_with_one_entry_per_epoch(
        tmp_path, fashion_mnist_dir):
    """train.deterministic=true (in SMALL): a rerun, and a run stopped
    mid-epoch by train.max_steps then extended, end on the same weights,
    bit for bit, and report each epoch once, as the uninterrupted run."""
    reference = str(tmp_path / "uninterrupted")
    result = run_trainer(reference, fashion_mnist_dir, "--mode=train",
                         override=SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = str(tmp_path / "extended")
    for max_steps in (6, 0):  # 0: no limit, the configured epochs
        result = run_trainer(resumed, fashion_mnist_dir, "--mode=train",
                             override=f"{SHORT},train.max_steps={max_steps}")
        assert result.returncode == 0, result.stderr[-3000:]
    want, got = checkpoint_values(reference), checkpoint_values(resumed)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    want, got = _epochs(reference), _epochs(resumed)
    assert [e["epoch"] for e in got] == [e["epoch"] for e in want] == [1, 2]
    for key in ("step", "train_loss", "train_accuracy", "eval_loss"):
        assert [e[key] for e in got] == [e[key] for e in want], key
    # Diagnostics come from the estimator that trains.
    with open(os.path.join(reference, "diagnostics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4, 8]
