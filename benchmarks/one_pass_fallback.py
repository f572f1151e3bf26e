"""What a variable the one-pass estimator falls back on costs.

The one-pass estimator takes a variable it cannot read off the main pass
from the loop estimator, run for the falling-back variables alone: each
micro-batch's forward pass is the whole model's, its backward pass only
reaches as deep as the deepest falling-back variable. This benchmark times
one CLARS step (forward, backward, estimate, update, in one `tf.function`)
of a ResNet (default ResNet-8, 32x32x3 inputs, 10 classes) at batch B on
synthetic data, side by side in one process:

  * `sgd`: momentum SGD, the unit;
  * `one_pass`: the one-pass estimator, every variable read off the pass
    (on a model without batch norm or dropout, e.g. `--model=plain_cnn`;
    with them every variable falls back);
  * `one_pass_checked_every_step`: the same with the step's check that
    each read variable's gradient is the sum of its per-example terms on
    every step (`check_every=1`; `one_pass` checks on its first step, a
    warm-up step here, and then every 100th);
  * `one_pass_unchecked`: the same without the check (`check_every=None`):
    `one_pass` over it is what the check costs the steps that skip it,
    `one_pass_checked_every_step` over it what a checked step costs;
  * `one_pass_fallback_output`: the same network with one per-class scale
    variable (a custom layer, not read) after the logits: the loop runs
    for that variable only, its backward pass stops at the logits;
  * `one_pass_fallback_input`: the scale on the input channels instead:
    the backward pass of every micro-batch goes through the whole network
    (for the input's gradient only, no weight gradients);
  * `loop`: the loop estimator for every variable.

Every variant's step is timed against the same SGD step; the table gives
the median step time and the median per-round ratio to SGD (min..max).
With the three check candidates it also gives, paired per round and in
SGD steps, what a skipped check and a checked step cost over no check
(median, mean and the mean's 95% interval, by wall and by CPU time) and
the check amortised over `check_every` = 100 steps; `--paired_of=JSON`
prints that for a run's `--output` without running (several files,
comma-separated: their rounds pooled).

    TF_ENABLE_ONEDNN_OPTS=1 python3 -m benchmarks.one_pass_fallback \\
        --model=plain_cnn --output=/tmp/one_pass_fallback.json
"""

import json
import logging
import statistics

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet8", "Model name for models.build_model.")
flags.DEFINE_integer("batch_size", 256, "Batch size B.")
flags.DEFINE_integer("micro_batch_size", 8, "s.")
flags.DEFINE_integer("num_micro_batches", 32, "J.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds.")
flags.DEFINE_integer("steps", 2, "Timed steps per candidate per round.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
flags.DEFINE_list("candidates", None, "Time only these (sgd always).")
flags.DEFINE_list("paired_of", None, "Print the check's paired costs of "
                  "earlier runs' --output files instead of a run; several "
                  "files pool their rounds.")

_CHECK_EVERY = 100  # OnePassGradientNormEstimator's default


def _scale_layer():
    import keras

    class Scale(keras.layers.Layer):
        """One trainable factor per channel: a type the estimator does not
        read."""

        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],),
                                         initializer="ones", name="scale")

        def call(self, inputs):
            return inputs * self.scale

    return Scale()


def _models():
    import keras

    from clars_tf import models

    keras.utils.set_random_seed(0)
    network = models.build_model(FLAGS.model, (32, 32, 3), 10)
    inputs = keras.Input((32, 32, 3))
    return {
        "plain": network,
        "fallback_output": keras.Model(inputs,
                                       _scale_layer()(network(inputs))),
        "fallback_input": keras.Model(inputs,
                                      network(_scale_layer()(inputs))),
    }


def check_costs(rows):
    """What the check costs in SGD steps, paired per round.

    Args:
        rows: `common.per_round_rows` with `sgd` and the three check
            candidates.

    Returns:
        `{"wall" | "cpu": {"skipped" | "checked": (median, mean, low,
        high), "amortised": median, "amortised_high": bound}}`: a skipped
        check is `one_pass` over `one_pass_unchecked`, a checked step
        `one_pass_checked_every_step` over it (`common.paired_extra`);
        `amortised_high` takes both at their 95% intervals' upper ends.
    """
    costs = {}
    for clock in ("wall", "cpu"):
        costs[clock] = {
            cost: common.paired_extra(rows, name, "one_pass_unchecked",
                                      "sgd")[clock]
            for cost, name in (("skipped", "one_pass"),
                               ("checked", "one_pass_checked_every_step"))}
        skipped, checked = costs[clock]["skipped"], costs[clock]["checked"]
        costs[clock]["amortised"] = skipped[0] + checked[0] / _CHECK_EVERY
        costs[clock]["amortised_high"] = (skipped[3]
                                          + checked[3] / _CHECK_EVERY)
    return costs


def _print_check_costs(rows):
    costs = check_costs(rows)
    print(f"\nThe check, in SGD steps, paired per round: median (mean, "
          f"95% interval of the mean); amortised over {_CHECK_EVERY} steps")
    for clock, cost in costs.items():
        print(f"  {clock}: " + "; ".join(
            f"{name} {m:.3f} ({mean:.3f}, {low:.3f}..{high:.3f})"
            for name, (m, mean, low, high) in
            ((n, cost[n]) for n in ("skipped", "checked")))
            + f"; amortised {cost['amortised']:.3f}, at most "
            f"{cost['amortised_high']:.3f} at the intervals' upper ends")
    return costs


def main(argv):
    del argv
    if FLAGS.paired_of:
        runs = []
        for path in FLAGS.paired_of:
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f)["candidates"])
        rows = common.pooled_rows(runs)
        print(f"{len(runs)} run(s), {len(rows['sgd']['seconds'])} paired "
              "rounds")
        _print_check_costs(rows)
        return
    import keras
    import tensorflow as tf

    import clars_tf

    # The fallback warning is expected here.
    logging.getLogger("clars_tf.one_pass_norms").setLevel(logging.ERROR)
    x, y = common.synthetic_batch(FLAGS.batch_size, (32, 32, 3))
    loss = common.logits_loss

    groups = (FLAGS.micro_batch_size, FLAGS.num_micro_batches)
    built = _models()
    candidates = {
        "sgd": ("plain", None),
        "one_pass": ("plain", clars_tf.OnePassGradientNormEstimator(*groups)),
        "one_pass_checked_every_step": (
            "plain", clars_tf.OnePassGradientNormEstimator(
                *groups, check_every=1)),
        "one_pass_unchecked": ("plain", clars_tf.OnePassGradientNormEstimator(
            *groups, check_every=None)),
        "one_pass_fallback_output": (
            "fallback_output",
            clars_tf.OnePassGradientNormEstimator(*groups)),
        "one_pass_fallback_input": (
            "fallback_input", clars_tf.OnePassGradientNormEstimator(*groups)),
        "loop": ("plain", clars_tf.GradientNormEstimator(*groups)),
    }
    if FLAGS.candidates:
        candidates = {name: candidate for name, candidate in candidates.items()
                      if name == "sgd" or name in FLAGS.candidates}
    steps = {}
    for name, (model_name, estimator) in candidates.items():
        model = built[model_name]
        optimizer = (keras.optimizers.SGD(0.01, momentum=0.9)
                     if estimator is None else clars_tf.CLARS(0.01))
        optimizer.build(model.trainable_variables)

        def step(model=model, optimizer=optimizer, estimator=estimator):
            out = clars_tf.compute_loss_gradients_and_norms(
                model, loss, x, y, global_batch_size=FLAGS.batch_size,
                optimizer=optimizer, estimator=estimator)
            kwargs = ({} if estimator is None
                      else {"gradient_norms": out.gradient_norms})
            optimizer.apply(out.gradients, model.trainable_variables,
                            **kwargs)
            return out.loss

        compiled = tf.function(step)
        steps[name] = lambda compiled=compiled: float(compiled())
        for _ in range(3):  # tracing and warm-up
            steps[name]()
    times, cpu_times, shares = common.interleave(
        steps, FLAGS.rounds, {name: FLAGS.steps for name in steps})
    rows = common.per_round_rows(times, cpu_times, shares, "sgd")
    print(f"\n{FLAGS.model}, B={FLAGS.batch_size}, s={groups[0]}, "
          f"J={groups[1]}; ratio = step time / SGD step time, per round")
    print(f"{'candidate':28s} {'step s':>8s} {'ratio':>6s} {'min..max':>12s}"
          f" {'cpu':>5s}")
    for name, row in rows.items():
        print(f"{name:28s} {statistics.median(row['seconds']):8.3f} "
              f"{common.ratio_columns(row)}")
    checks = ("one_pass", "one_pass_checked_every_step", "one_pass_unchecked")
    if all(name in rows for name in checks):
        _print_check_costs(rows)
    if FLAGS.output:
        common.write_results(
            FLAGS.output, dict(model=FLAGS.model, batch_size=FLAGS.batch_size,
                               micro_batch_size=groups[0],
                               num_micro_batches=groups[1],
                               rounds=FLAGS.rounds, steps=FLAGS.steps),
            candidates=rows)

if __name__ == "__main__":
    app.run(main)
