r"""How far the one-pass estimate is from the loop estimate with batch norm.

The loop estimator normalizes each micro-batch with its own batch-norm
statistics (as the reference does); the one-pass estimator reads the groups
off the main pass, normalized with the whole replica batch's statistics.
This script measures the per-variable relative difference
`|a_one_pass - a_loop| / a_loop` on the same micro-batches of Fashion-MNIST
(s and J as given), for each model, at initialization and after
`--train_steps` CLARS steps (one-pass estimator, the README job's settings),
and prints the median and maximum over kernels and over batch-norm
gamma/beta, the median ratio one-pass / loop with its range, and the
largest-difference variables.

    python3 scripts/one_pass_batch_norm.py --models=resnet8,resnet20 \
        --output=/tmp/one_pass_batch_norm.json

The short training comparison (accuracy of both estimators over seeds)
runs the trainer itself; the commands are in docs/measurements.md (Costs).
"""

import json
import os
import statistics
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

flags.DEFINE_list("models", ["resnet8", "resnet20"], "Models to measure.")
flags.DEFINE_integer("batch_size", 1024, "Examples per step.")
flags.DEFINE_integer("micro_batch_size", 8, "s.")
flags.DEFINE_integer("num_micro_batches", 64, "J.")
flags.DEFINE_integer("train_steps", 30, "CLARS steps between the two "
                     "measurements.")
flags.DEFINE_float("learning_rate", 4.0, "CLARS peak rate (the README job: "
                   "0.5 * B / 128).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets directory.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS


def _summary(differences, paths, variables):
    kernels = [d for d, v in zip(differences, variables) if len(v.shape) > 1]
    norms = [d for d, p in zip(differences, paths)
             if p.endswith(("gamma", "beta"))]
    largest = sorted(zip(differences, paths), reverse=True)[:3]
    return {
        "kernel_median": statistics.median(kernels),
        "kernel_max": max(kernels),
        "batch_norm_median": statistics.median(norms),
        "batch_norm_max": max(norms),
        "largest": [[p, d] for d, p in largest],
    }


def measure(model_name, batches):
    import keras
    import tensorflow as tf

    import clars_tf
    from clars_tf import models
    from clars_tf.trainers import builders

    keras.utils.set_random_seed(0)
    model = models.build_model(model_name, (32, 32, 1), 10)
    loss = builders.per_example_loss(10, 0.0)
    s, j = FLAGS.micro_batch_size, FLAGS.num_micro_batches
    loop = clars_tf.GradientNormEstimator(s, j)
    one_pass = clars_tf.OnePassGradientNormEstimator(s, j)
    optimizer = clars_tf.CLARS(FLAGS.learning_rate, weight_decay_rate=5e-4)
    optimizer.build(model.trainable_variables)
    variables = model.trainable_variables
    paths = [v.path for v in variables]

    @tf.function
    def both(x, y):
        out = clars_tf.compute_loss_gradients_and_norms(
            model, loss, x, y, global_batch_size=FLAGS.batch_size,
            estimator=one_pass, defer_state_updates=True)
        return out.gradient_norms, loop(model, loss, x, y)

    @tf.function
    def train_step(x, y):
        out = clars_tf.compute_loss_gradients_and_norms(
            model, loss, x, y, global_batch_size=FLAGS.batch_size,
            optimizer=optimizer, estimator=one_pass)
        optimizer.apply(out.gradients, variables,
                        gradient_norms=out.gradient_norms)
        return out.loss

    def compare(x, y):
        fast, reference = both(x, y)
        fast, reference = [float(a) for a in fast], [float(b) for b in
                                                     reference]
        # Zero-initialized residual gammas give some variables no gradient
        # at initialization; both estimators must then say 0.
        kept = [i for i, b in enumerate(reference) if b > 0]
        summary = _summary(
            [abs(fast[i] - reference[i]) / reference[i] for i in kept],
            [paths[i] for i in kept], [variables[i] for i in kept])
        ratios = [fast[i] / reference[i] for i in kept]
        summary["ratio_one_pass_to_loop_median"] = statistics.median(ratios)
        summary["ratio_one_pass_to_loop_min_max"] = [min(ratios),
                                                     max(ratios)]
        summary["zero_in_loop"] = len(reference) - len(kept)
        summary["zero_in_loop_but_not_one_pass"] = sum(
            fast[i] > 0 for i in range(len(reference)) if i not in kept)
        return summary

    x, y = next(batches)
    result = {"init": compare(x, y)}
    losses = [float(train_step(*next(batches)))
              for _ in range(FLAGS.train_steps)]
    x, y = next(batches)
    result[f"after_{FLAGS.train_steps}_steps"] = compare(x, y)
    result["train_loss_first_last"] = [losses[0], losses[-1]]
    return result


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from clars_tf.trainers import data

    data.prepare("fashion_mnist", FLAGS.data_dir)
    results = {}
    for name in FLAGS.models:
        dataset = data.build_dataset(
            "fashion_mnist", "train", data_dir=FLAGS.data_dir,
            global_batch_size=FLAGS.batch_size, is_training=True,
            image_size=32, seed=0)
        results[name] = measure(name, iter(dataset))
        print(name, json.dumps(results[name], indent=1), flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump({"settings": {k: FLAGS[k].value for k in (
                "batch_size", "micro_batch_size", "num_micro_batches",
                "train_steps", "learning_rate")}, "results": results}, f,
                indent=2)


if __name__ == "__main__":
    app.run(main)
