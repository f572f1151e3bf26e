r"""Training speed of the study's candidate models, side by side.

One SGD (momentum 0.9) training step, forward and backward, at global batch
`--batch_size` on fixed random Fashion-MNIST-shaped inputs (`--image_size`, 32x32x1 by
default, as the trainer feeds them; a model whose smallest input is larger
gets its smallest), each model in its own `tf.function`. After 2 warm-up
steps per model, `--rounds` rounds time every model for `--steps` steps,
starting at a different model each round; the table gives the median
images/s (min..max) and the median per-round ratio to the first model.
Input pipeline, evaluation and start-up are not included. Run from the
repository root:

    python3 -m experiments.model_speed --models resnet8,small_cnn
    python3 -m experiments.model_speed --image_size 28 --batch_size 2048 \
        --models small_cnn,sigmoid_mlp,sigmoid_cnn,plain_cnn
"""

import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from clars_tf import models


def _step_function(model, batch_size):
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal(
        (batch_size, *model.input_shape[1:])).astype("float32"))
    labels = tf.constant(rng.integers(0, 10, batch_size).astype("int32"))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet8,small_cnn")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image_size", type=int, default=32,
                        help="input side (the trainer feeds Fashion-MNIST at "
                             "task.image_size; 28 for the models without "
                             "batch norm)")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    steps, sides = {}, {}
    for name in names:
        side = max(args.image_size, models.min_input_size(name))
        model = models.build_model(name, (side, side, 1), 10)
        sides[name] = side
        steps[name] = _step_function(model, args.batch_size)
        for _ in range(2):
            float(steps[name]())
    rates = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index
                                                         % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = steps[name]()
            float(loss)
            rates[name].append(args.steps * args.batch_size
                               / (time.perf_counter() - start))
    print(f"batch {args.batch_size}, {args.rounds} rounds x {args.steps} "
          f"steps; images/s median (min..max), ratio to {names[0]}")
    for name in names:
        ratios = [r / b for r, b in zip(rates[name], rates[names[0]])]
        print(f"{name:12s} {sides[name]:3d} px "
              f"{statistics.median(rates[name]):8.0f} "
              f"({min(rates[name]):.0f}..{max(rates[name]):.0f})  "
              f"x{statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}..{max(ratios):.2f})")


if __name__ == "__main__":
    main()
