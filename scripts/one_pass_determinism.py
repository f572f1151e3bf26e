r"""Does one compiled one-pass step give the same bits every time?

Under `tf.config.experimental.enable_op_determinism()` (what
`train.deterministic=true` sets), runs one compiled
`compute_loss_gradients_and_norms` step of a ResNet with the one-pass
estimator on a fixed batch `--runs` times after a first one, and counts the
runs whose gradients or estimates differ from the first's in any bit, with
the variables that differed. Issue 17: summing the kernel gradients from
per-group filter-gradient ops varied in the last bits on CPU.

    python3 scripts/one_pass_determinism.py --runs=30
"""

import collections
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from benchmarks import common  # noqa: E402  (after the path insert)

flags.DEFINE_string("model", "resnet8", "Model name for build_model.")
flags.DEFINE_integer("batch_size", 128, "Examples in the batch.")
flags.DEFINE_integer("micro_batch_size", 8, "s.")
flags.DEFINE_integer("num_micro_batches", 8, "J.")
flags.DEFINE_integer("runs", 30, "Steps compared with the first.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import keras
    import numpy as np
    import tensorflow as tf

    import clars_tf
    from clars_tf import models

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    model = models.build_model(FLAGS.model, (32, 32, 1), 10)
    x, y = common.synthetic_batch(FLAGS.batch_size, (32, 32, 1))
    loss = common.logits_loss

    estimator = clars_tf.OnePassGradientNormEstimator(
        FLAGS.micro_batch_size, FLAGS.num_micro_batches)
    step = tf.function(lambda: clars_tf.compute_loss_gradients_and_norms(
        model, loss, x, y, global_batch_size=FLAGS.batch_size,
        estimator=estimator, defer_state_updates=True))

    def values():
        out = step()
        return [g.numpy() for g in out.gradients + out.gradient_norms]

    names = [v.path for v in model.trainable_variables]
    labels = ([f"gradient {n}" for n in names]
              + [f"estimate {n}" for n in names])
    first = values()
    differing_runs, differing = 0, collections.Counter()
    for _ in range(FLAGS.runs):
        changed = [label for label, a, b in zip(labels, first, values())
                   if np.any(a != b)]
        differing_runs += bool(changed)
        differing.update(changed)
    print(f"{differing_runs} of {FLAGS.runs} runs differ from the first "
          f"({FLAGS.model}, B={FLAGS.batch_size}, s={FLAGS.micro_batch_size},"
          f" J={FLAGS.num_micro_batches})")
    for label, count in differing.most_common():
        print(f"  {count:3d}  {label}")
    return 1 if differing_runs else 0


if __name__ == "__main__":
    app.run(main)
