r"""Training-step speed of candidate models, side by side.

Chooses a study's model by what it costs to train: one momentum-SGD step
(forward, backward, update, in one `tf.function`) of each model at batch B
on synthetic Fashion-MNIST-shaped inputs (`--image_size`, one channel; a
model whose smallest input is larger gets its smallest), interleaved in
rounds with `common.interleave`. The table gives the median step time,
images/s and the median per-round ratio to the first model (min..max).
Input pipeline, evaluation and start-up are not included.

    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.model_speed \
        --models=resnet8,small_cnn --output=/tmp/model_speed.json
    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.model_speed \
        --image_size=28 --batch_size=2048 \
        --models=small_cnn,sigmoid_mlp,sigmoid_cnn,plain_cnn
"""

import statistics

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet8", "small_cnn"],
                  "Model names for models.build_model; the first is the "
                  "unit of the ratios.")
flags.DEFINE_integer("batch_size", 1024, "Batch size B.")
flags.DEFINE_integer("image_size", 32,
                     "Input side (the trainer feeds Fashion-MNIST at "
                     "task.image_size; 28 for the models without batch "
                     "norm).")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_integer("steps", 3, "Timed steps per model per round.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")


def _sgd_step(model, x, y):
    import keras
    import tensorflow as tf

    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(common.logits_loss(
                y, model(x, training=True)))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        return loss

    return lambda: float(step())


def main(argv):
    del argv
    import keras

    from clars_tf import models

    keras.utils.set_random_seed(0)
    steps, sides = {}, {}
    for name in FLAGS.models:
        side = max(FLAGS.image_size, models.min_input_size(name))
        sides[name] = side
        model = models.build_model(name, (side, side, 1), 10)
        x, y = common.synthetic_batch(FLAGS.batch_size, (side, side, 1))
        steps[name] = _sgd_step(model, x, y)
        for _ in range(2):  # tracing and warm-up
            steps[name]()
    times, cpu_times, shares = common.interleave(
        steps, FLAGS.rounds, {name: FLAGS.steps for name in steps})
    unit = FLAGS.models[0]
    print(f"\nB={FLAGS.batch_size}, {FLAGS.rounds} rounds x {FLAGS.steps} "
          f"steps; ratio = step time / {unit}'s, per round")
    print(f"{'model':14s} {'px':>3s} {'step s':>8s} {'images/s':>9s} "
          f"{'ratio':>6s} {'min..max':>12s} {'cpu':>5s}")
    rows = common.per_round_rows(times, cpu_times, shares, unit)
    for name, row in rows.items():
        row["image_size"] = sides[name]
        seconds = statistics.median(row["seconds"])
        print(f"{name:14s} {sides[name]:3d} {seconds:8.3f} "
              f"{FLAGS.batch_size / seconds:9.0f} {common.ratio_columns(row)}")
    if FLAGS.output:
        common.write_results(
            FLAGS.output, dict(models=FLAGS.models,
                               batch_size=FLAGS.batch_size,
                               image_size=FLAGS.image_size,
                               rounds=FLAGS.rounds, steps=FLAGS.steps),
            models=rows)


if __name__ == "__main__":
    app.run(main)
