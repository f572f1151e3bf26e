"""A stand-in for trainers.train in the study tests: instant, scripted.

Accepts the trainer's flags, "trains" 2 epochs of 4 steps and writes
results.json, steps.jsonl and step lines as the trainer does. Validation accuracy is a
fixed function of the rate (peak at base 0.4 with warmup, 0.2 without,
1 point lower per factor 2 away; a no-warmup rate >= 3.2 diverges), so tests
can compute the study's choices by hand. With STAND_IN_FAIL_ONCE naming a
file that does not exist, the first run creates it and fails with an error;
with STAND_IN_IMPORT_ERROR set, every run fails as a trainer started by an
interpreter without absl does.
"""

import json
import math
import os
import sys


def main():
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    overrides = dict(item.split("=", 1)
                     for item in flags["params_override"].split(","))
    rate = float(overrides["optimizer.base_learning_rate"])
    warmup = float(overrides["optimizer.warmup_epochs"])
    seed = int(overrides["train.seed"])
    splits = overrides["train.eval_splits"].split("+")
    best = 0.4 if warmup else 0.2
    accuracy = 0.9 - 0.01 * abs(math.log2(rate / best)) - (
        0.0 if warmup else 0.05) + 0.001 * seed
    model_dir = flags["model_dir"]
    if os.environ.get("STAND_IN_IMPORT_ERROR"):
        print("ModuleNotFoundError: No module named 'absl'")
        sys.exit(1)
    if os.environ.get("STAND_IN_ALWAYS_FAIL"):
        print("error: OSError: the stand-in's disk is full")
        sys.exit(1)
    marker = os.environ.get("STAND_IN_FAIL_ONCE")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        print("error: the stand-in's one failure")
        sys.exit(1)
    os.makedirs(model_dir, exist_ok=True)
    print("I1130 stand_in_trainer.py:1] intra-op threads "
          f"{os.environ.get('TF_NUM_INTRAOP_THREADS', 'default')}")
    with open(os.path.join(model_dir, "steps.jsonl"), "w") as f:
        for step in range(1, 9):
            print(f"I1130 train.py:1] step {step}/8 epoch {step / 4:.2f} "
                  f"loss {2.0 / step + rate:.4f} accuracy 0.5 lr 1 100 "
                  "images/s")
            f.write(json.dumps({"step": step, "epoch": step / 4,
                                "loss": 2.0 / step + rate, "accuracy": 0.5,
                                "learning_rate": 1.0}) + "\n")
    if not warmup and rate >= 3.2:
        print("error: Non-finite gradient or gradient-norm estimate at step 3")
        sys.exit(1)
    if "train.diagnostics_every_steps" in overrides:
        # Two kernels: conv's unclipped trust 0.01 * 2 / 0.1 = 0.2 (at the
        # clip), dense's 0.01 * 1 / 1 = 0.01; a_l / ||g_l|| 3 and 1.5.
        with open(os.path.join(model_dir, "diagnostics.jsonl"), "w") as f:
            for step in range(1, 9):
                f.write(json.dumps({"step": step, "layers": {
                    "conv/kernel": {"weight_norm": 2.0, "estimate": 0.1,
                                    "noise_ratio": 3.0},
                    "dense/kernel": {"weight_norm": 1.0, "estimate": 1.0,
                                     "noise_ratio": 1.5 * step},
                    "dense/bias": {"weight_norm": 1.0, "estimate": 0.0,
                                   "noise_ratio": 0.0}}}) + "\n")
    epochs = []
    for epoch in (1, 2):
        entry = {"epoch": epoch, "step": 4 * epoch,
                 "train_loss": 1.0 / epoch + rate}
        if "validation" in splits:
            entry["validation_accuracy"] = accuracy - 0.1 * (2 - epoch)
        if "test" in splits:
            entry["eval_accuracy"] = accuracy - 0.02
        epochs.append(entry)
    with open(os.path.join(model_dir, "results.json"), "w") as f:
        json.dump({"config": {"train": {"epochs": 2},
                              "clars": {"trust_coefficient": 0.01,
                                        "trust_clip": 0.1}},
                   "steps_per_epoch": 4, "epochs": epochs, "final": None}, f)


if __name__ == "__main__":
    main()
