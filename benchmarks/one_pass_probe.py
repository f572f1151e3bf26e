"""What the one-pass estimator's probe costs at trace time, per model.

Before its first estimate for a model and input signature the one-pass
estimator traces the forward pass once more (`one_pass_plan.probe`) and,
for each readable layer, walks the graph above the layer's pre-activation
to find a weight read outside the layer's call. That walk grows with the
number of layers times the graph's size, so this script times the probe
on the shipped models against tracing the model's own training step
(forward and gradient, `get_concrete_function`, nothing run), side by
side in one process, by CPU time (the work) and wall time:

    python3 -m benchmarks.one_pass_probe --models=resnet50,densenet121,mobilenet_v2
"""

import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet50", "densenet121", "mobilenet_v2"],
                  "Model names for models.build_model.")
flags.DEFINE_integer("image_size", 224, "Input side.")
flags.DEFINE_integer("num_classes", 1000, "Classes.")


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from clars_tf import models
    from clars_tf import one_pass_plan
    from clars_tf import one_pass_recording

    shape = (FLAGS.image_size, FLAGS.image_size, 3)
    print(f"{'model':14s} {'readable':>8s} {'probe s':>8s} {'cpu s':>6s} "
          f"{'step trace s':>12s} {'cpu s':>6s} {'probe/trace cpu':>15s}")
    for name in FLAGS.models:
        keras.utils.set_random_seed(0)
        model = models.build_model(name, shape, FLAGS.num_classes)
        x = tf.zeros((2, *shape))
        spec = tf.TensorSpec([None, *shape], tf.float32)

        def step(images, model=model):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(model(images, training=True))
            return tape.gradient(loss, model.trainable_variables)

        _, trace_wall, trace_cpu = _timed(
            lambda: tf.function(step).get_concrete_function(spec))
        plan, probe_wall, probe_cpu = _timed(
            lambda: one_pass_plan.probe(model, x))
        readable = sum(1 for layer in model._flatten_layers(include_self=False)
                       if one_pass_recording.kind_of(layer))
        print(f"{name:14s} {readable:8d} {probe_wall:8.2f} {probe_cpu:6.2f} "
              f"{trace_wall:12.2f} {trace_cpu:6.2f} "
              f"{probe_cpu / trace_cpu:15.2f}"
              + ("" if plan.coupling is None else "  (coupled: every "
                 "variable on the loop)"), flush=True)


if __name__ == "__main__":
    app.run(main)
