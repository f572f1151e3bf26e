r"""How far one and two replicas drift apart, step by step.

Trains the same config with --strategy=one_device and with
--strategy=mirrored over 2 logical CPUs (same global batch, synchronized
batch norm, op determinism), keeps a checkpoint after every step and prints,
after each step, the largest absolute difference among the model's weights,
among its batch-norm moving statistics and among the optimizer's variables
(momentum buffers, estimates, step), each with the variable it is in.
--precision=float64 trains both in float64, to tell rounding from a bug.

    python3 scripts/replica_agreement.py --steps=20 --dataset=synthetic
    python3 scripts/replica_agreement.py --steps=20 --dataset=fashion_mnist
    python3 scripts/replica_agreement.py --steps=5 --precision=float64
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(model_dir, flags, args):
    override = (f"task.dataset={args.dataset},optimizer.name={args.optimizer},"
                f"train.global_batch_size=64,estimator.num_micro_batches=4,"
                "optimizer.base_learning_rate=0.1,"
                f"train.max_steps={args.steps},train.steps_per_loop=1,"
                f"train.checkpoint_every_steps=1,"
                f"train.checkpoints_to_keep={args.steps},"
                "train.deterministic=true,model.use_sync_bn=true,"
                f"train.precision={args.precision}")
    subprocess.run(
        [sys.executable, "-m", "trainers.train",
         "--config_file=configs/fashion_mnist_resnet8_clars.yaml",
         f"--model_dir={model_dir}", f"--data_dir={args.data_dir}",
         "--mode=train", f"--params_override={override}", *flags],
        cwd=REPO, check=True, capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def values(model_dir, step):
    import tensorflow as tf

    path = os.path.join(model_dir, "checkpoints", f"ckpt-{step}")
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name)
            for name, _ in tf.train.list_variables(path)
            if name.endswith("VARIABLE_VALUE")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--optimizer", default="clars")
    parser.add_argument("--precision", default="float32",
                        choices=["float32", "float64"])
    parser.add_argument("--data_dir", default=os.path.expanduser(
        "~/tensorflow_datasets"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="replicas_")
    one, two = os.path.join(work, "one"), os.path.join(work, "two")
    train(one, ["--strategy=one_device"], args)
    train(two, ["--strategy=mirrored", "--cpu_devices=2"], args)
    rows = []
    for step in range(1, args.steps + 1):
        a, b = values(one, step), values(two, step)
        differences = {
            k: float(np.max(np.abs(a[k].astype(np.float64) - b[k])))
            for k in a}
        row = {"step": step}
        # epoch_sums, the running sums of the reported loss, is no state.
        # The weights are saved once, under the optimizer that tracks them.
        parts = {
            "weights": lambda k: "/_trainable_variables/" in k,
            "statistics": lambda k: "/moving_" in k,
            "optimizer": lambda k: k.startswith("optimizer/") and (
                "/_trainable_variables/" not in k),
        }
        for part, belongs in parts.items():
            largest = max(filter(belongs, differences), key=differences.get)
            row[part] = differences[largest]
            row[f"{part}_variable"] = largest.split("/.ATTRIBUTES")[0]
        rows.append(row)
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
