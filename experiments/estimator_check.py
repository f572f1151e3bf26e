r"""Does the one-pass estimator give the loop's estimates on the study's model?

    python3 -m experiments.estimator_check \
        --output experiments/gate_results/estimator_check.json

The third study's CLARS runs used the loop estimator (J extra passes, the
reference). Without batch norm or dropout the one-pass estimator is meant to
read the same per-variable estimates off the step's own pass. This check
takes the study's CLARS config (configs/gate_study/clars.yaml: sigmoid_mlp,
batch 2048, s = 8, J = 64), the trainer's own model, data pipeline and loss,
and over the first steps of a CLARS run (each step applied with the loop's
estimates, so the weights move as in the study) computes both estimates of
every trainable variable on the same batch (seed 0, the tuned base rate
0.354). It reports the largest relative
difference per variable, also in units of float32's rounding step, and
passes when every one is within --rtol (1e-5, float32 rounding of sums of a
few thousand terms; a wrong micro-batch or a missing term moves an estimate
by percents).
"""

import argparse
import json
import os
import sys
import tempfile

# Float32's relative rounding step near 1 (2^-24): the two estimators sum
# the same terms in different orders, so a few of these are rounding.
FLOAT32_ULP = 2.0 ** -24
FLOAT32_RTOL = 1e-5


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/gate_study/clars.yaml")
    parser.add_argument("--steps", type=int, default=5,
                        help="training steps compared (default 5)")
    parser.add_argument("--rtol", type=float, default=FLOAT32_RTOL,
                        help="largest relative difference accepted in "
                             "float32")
    parser.add_argument("--output", default="",
                        help="JSON file for the per-variable differences")
    return parser.parse_args(argv)


def _estimates(clars_tf, model, loss_fn, images, labels, batch, estimator):
    out = clars_tf.compute_loss_gradients_and_norms(
        model, loss_fn, images, labels, global_batch_size=batch,
        estimator=estimator)
    return out.gradients, [float(n) for n in out.gradient_norms]


def _relative(one_pass, loop):
    return [abs(a - b) / abs(b) if b else abs(a)
            for a, b in zip(one_pass, loop)]


def main(argv=None):
    args = _parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import clars_tf
    from clars_tf.trainers import config as config_lib
    from clars_tf.trainers import data
    from clars_tf.trainers import train as train_lib

    # The rate CLARS without warmup was tuned to, so the steps move the
    # weights as the study's runs did.
    config = config_lib.build_config(
        args.config, "train.seed=0,optimizer.base_learning_rate=0.354")
    estimator_config = config["estimator"]
    groups = (estimator_config["micro_batch_size"],
              estimator_config["num_micro_batches"])
    loop = clars_tf.GradientNormEstimator(*groups)
    one_pass = clars_tf.OnePassGradientNormEstimator(*groups)
    data.prepare(config["task"]["dataset"], None)
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = train_lib.Trainer(config, tf.distribute.get_strategy(),
                                    model_dir, None, "default", loop)
        model, loss_fn = trainer.model, trainer.loss_fn
        batch = trainer.global_batch
        iterator = trainer._train_iterator(0)
        compare = tf.function(lambda images, labels: (
            _estimates(clars_tf, model, loss_fn, images, labels, batch,
                       loop),
            _estimates(clars_tf, model, loss_fn, images, labels, batch,
                       one_pass)[1]))
        names = [v.path for v in model.trainable_variables]
        worst = dict.fromkeys(names, 0.0)
        steps = []
        for step in range(args.steps):
            images, labels = next(iterator)
            (gradients, loop_norms), one_pass_norms = compare(images, labels)
            loop_norms = [float(n) for n in loop_norms]
            one_pass_norms = [float(n) for n in one_pass_norms]
            relative = _relative(one_pass_norms, loop_norms)
            for name, value in zip(names, relative):
                worst[name] = max(worst[name], value)
            steps.append({"step": step, "loop": loop_norms,
                          "one_pass": one_pass_norms})
            trainer.optimizer.apply(gradients, model.trainable_variables,
                                    gradient_norms=loop_norms)
    passed = all(value <= args.rtol for value in worst.values())
    report = {
        "command": "python3 -m experiments.estimator_check "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": args.config, "micro_batch_size": groups[0],
        "num_micro_batches": groups[1], "batch_size": batch,
        "steps": args.steps, "rtol": args.rtol,
        "largest_relative_difference_float32": worst,
        "passed": passed, "per_step": steps}
    print(f"one-pass vs loop estimates, {config['model']['name']}, batch "
          f"{batch}, s = {groups[0]}, J = {groups[1]}, {args.steps} steps "
          "of a CLARS run (seed 0):")
    for name in names:
        print(f"  {name:24s} largest relative difference float32 "
              f"{worst[name]:.2e} ({worst[name] / FLOAT32_ULP:.1f} float32 "
              "ulps)")
    print(f"{'PASS' if passed else 'FAIL'}: every variable within "
          f"rtol {args.rtol:g} in float32.")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
