r"""Initial sharpness lambda_0 and the stability limit it sets on the rate.

    python3 -m experiments.sharpness --config configs/gate_study/sgd.yaml \
        --params_override=model.name=sigmoid_mlp --seeds 0,1,2

For each seed, builds the model exactly as the trainer does (the config,
`keras.utils.set_random_seed(seed)`, then the model) and estimates the top
eigenvalue of the Hessian of the mean training loss at initialisation by
power iteration on Hessian-vector products (double backpropagation) over the
first `--examples` training examples (the validation hold-out excluded, no
augmentation). The coupled L2 decay adds its rate to every eigenvalue.

Heavy-ball momentum beta on a quadratic of curvature lambda is stable for
peak rates below 2 (1 + beta) / lambda (Gilmer et al. 2022, Kalra and
Barkeshli 2024): the script prints that limit as a peak rate and as the
base rate per `optimizer.reference_batch_size` examples at the config's
batch size, the units of the study's grids, and writes them as JSON.
"""

import argparse
import json
import os

import keras
import tensorflow as tf

from clars_tf.trainers import builders
from clars_tf.trainers import config as config_lib
from clars_tf.trainers import data


def _dot(first, second):
    return tf.add_n([tf.reduce_sum(a * b) for a, b in zip(first, second)])


def top_hessian_eigenvalue(model, loss_fn, images, labels, iterations,
                           seed=0):
    """Power iteration on the Hessian of the mean loss at `model`'s weights.

    Returns:
        The Rayleigh quotient of each iteration (the last is the estimate).
    """
    variables = model.trainable_variables

    @tf.function
    def hessian_vector(vector):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_mean(loss_fn(labels, model(images,
                                                             training=True)))
            gradients = inner.gradient(loss, variables)
            projection = _dot(gradients, vector)
        return outer.gradient(projection, variables)

    generator = tf.random.Generator.from_seed(seed)
    vector = [generator.normal(v.shape) for v in variables]
    estimates = []
    for _ in range(iterations):
        norm = tf.sqrt(_dot(vector, vector))
        vector = [v / norm for v in vector]
        product = hessian_vector(vector)
        estimates.append(float(_dot(vector, product)))
        vector = product
    return estimates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--params_override", default="")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated initialisation seeds")
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--output", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    config = config_lib.build_config(args.config, args.params_override)
    task, train, opt = config["task"], config["train"], config["optimizer"]
    validation = task["validation_examples"]
    dataset = data.build_dataset(
        task["dataset"], data.DATASETS[task["dataset"]].train_split,
        data_dir=args.data_dir, global_batch_size=args.examples,
        is_training=False, image_size=task["image_size"], seed=0,
        indices=(data.training_indices(task["dataset"], validation)
                 if validation else None))
    images, labels, weights = next(iter(dataset))
    if float(tf.reduce_min(weights)) < 1:
        raise ValueError(f"--examples={args.examples} is more than the "
                         "training examples; lower it.")
    loss_fn = builders.per_example_loss(
        data.DATASETS[task["dataset"]].num_classes, train["label_smoothing"])
    per_reference = opt["reference_batch_size"] / train["global_batch_size"]
    results = {"config": args.config, "params_override": args.params_override,
               "examples": int(images.shape[0]),
               "iterations": args.iterations, "momentum": opt["momentum"],
               "batch_size": train["global_batch_size"], "seeds": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        keras.utils.set_random_seed(seed)
        model = builders.model(config)
        estimates = top_hessian_eigenvalue(model, loss_fn, images, labels,
                                           args.iterations, seed)
        sharpness = estimates[-1] + opt["weight_decay_rate"]
        limit = 2 * (1 + opt["momentum"]) / sharpness
        results["seeds"][seed] = {
            "lambda_0": sharpness, "last_estimates": estimates[-3:],
            "peak_rate_limit": limit,
            "base_rate_limit": limit * per_reference}
        print(f"seed {seed}: lambda_0 {sharpness:.4g} (last iterations "
              + ", ".join(f"{e:.4g}" for e in estimates[-3:])
              + f"); 2(1+beta)/lambda_0 = {limit:.4g} peak, "
              f"{limit * per_reference:.4g} base at batch "
              f"{train['global_batch_size']}", flush=True)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    main()
