"""A few `model.fit` steps of CLARS and LARS on this process's Keras backend.

`tests/test_backends.py` runs this file once per backend (KERAS_BACKEND
set in the environment) and compares what it prints, one JSON object, across
backends and against float64 NumPy references. On JAX and PyTorch it also
checks the vectorised estimate alone; on JAX, optax's LARS and the same fit
under `keras.distribution.DataParallel` on the host devices that XLA_FLAGS
asks for.
"""

import json
import sys

import keras
import numpy as np

import clars_tf

STEPS = 3
BATCH = 32
FEATURES = 10
CLASSES = 3
# J s = 16 < B = 32: micro-batch j starts at example 8 j (floor(j B / J)).
ESTIMATOR = {"micro_batch_size": 4, "num_micro_batches": 4}
CLARS_SETTINGS = {"learning_rate": 0.5, "momentum": 0.9,
                  "weight_decay_rate": 0.01, "trust_coefficient": 0.05,
                  "trust_clip": 10.0, "epsilon": 0.0}
LARS_SETTINGS = {"learning_rate": 0.5, "momentum": 0.9,
                 "weight_decay_rate": 0.01, "trust_coefficient": 0.05}


def data():
    """Inputs, regression targets and class labels for STEPS batches."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, FEATURES)).astype("float32")
    targets = rng.normal(size=(STEPS * BATCH, CLASSES)).astype("float32")
    labels = rng.integers(0, CLASSES, size=STEPS * BATCH)
    return x, targets, labels


def initial_values(model, seed=1):
    """The same starting weights on every backend (Keras's seeded
    initializers draw from each backend's own generator)."""
    rng = np.random.default_rng(seed)
    values = []
    for variable in model.trainable_variables:
        noise = rng.normal(scale=0.3, size=variable.shape)
        values.append((noise + (1.0 if "gamma" in variable.path else 0.0))
                      .astype("float32"))
    return values


def linear_model():
    return keras.Sequential([keras.Input((FEATURES,)),
                             keras.layers.Dense(CLASSES)])


def batch_norm_model():
    return keras.Sequential([
        keras.Input((FEATURES,)), keras.layers.Dense(16),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Dense(CLASSES)])


def recurrent_model():
    return keras.Sequential([
        keras.Input((5, 2)), keras.layers.SimpleRNN(6),
        keras.layers.Dense(CLASSES)])


def fit(model, optimizer, loss, x, y, refresh_every=1):
    """Weights (all of them, batch-norm statistics included) after fit."""
    for variable, value in zip(model.trainable_variables,
                               initial_values(model)):
        variable.assign(value)
    model.compile(optimizer=optimizer, loss=loss)
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(**ESTIMATOR,
                                              refresh_every=refresh_every))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return [np.asarray(w).tolist() for w in model.get_weights()]


def fits():
    """The fits every backend runs, by name."""
    x, targets, labels = data()
    sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return {
        "linear_clars": fit(linear_model(), clars_tf.CLARS(**CLARS_SETTINGS),
                            "mean_squared_error", x, targets),
        # Step 1 reuses step 0's estimates.
        "linear_clars_refresh_every_2": fit(
            linear_model(), clars_tf.CLARS(**CLARS_SETTINGS),
            "mean_squared_error", x, targets, refresh_every=2),
        "linear_lars": fit(linear_model(), clars_tf.LARS(**LARS_SETTINGS),
                           "mean_squared_error", x, targets),
        "batch_norm_clars": fit(batch_norm_model(),
                                clars_tf.CLARS(**CLARS_SETTINGS), sparse, x,
                                labels),
        "recurrent_clars": fit(recurrent_model(),
                               clars_tf.CLARS(**CLARS_SETTINGS), sparse,
                               x.reshape(-1, 5, 2), labels),
    }


def estimator_checks():
    """The estimate alone, whole and in chunks, and fit without it."""
    x, targets, _ = data()
    results = {}
    model = linear_model()
    model.build((None, FEATURES))
    values = [keras.ops.convert_to_tensor(v) for v in initial_values(model)]
    batch = [keras.ops.convert_to_tensor(t[:BATCH]) for t in (x, targets)]
    per_example = clars_tf.per_example_loss_of("mean_squared_error")
    estimators = {
        "estimate": clars_tf.VmapGradientNormEstimator(**ESTIMATOR),
        # 3 micro-batches at a time: a chunk of 3 and a remainder of 1.
        "estimate_chunked": clars_tf.VmapGradientNormEstimator(
            **ESTIMATOR, chunk_size=3),
    }
    for name, estimator in estimators.items():
        def estimate(values, x, y, estimator=estimator):
            return estimator(model, per_example, values, [], x, y)

        if keras.backend.backend() == "jax":
            import jax  # pylint: disable=import-outside-toplevel
            estimate = jax.jit(estimate)
        results[name] = keras.ops.convert_to_numpy(
            estimate(values, *batch)).tolist()

    model = linear_model()
    model.compile(optimizer=clars_tf.CLARS(0.1), loss="mean_squared_error")
    try:
        model.fit(x, targets, batch_size=BATCH, epochs=1, verbose=0)
        results["missing_estimator_error"] = None
    except ValueError as error:
        results["missing_estimator_error"] = str(error)
    return results


def jax_checks():
    """What only JAX has: optax, DataParallel."""
    import jax  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel

    results = {}
    # LARS against optax's, without weight decay (where they agree).
    rng = np.random.default_rng(2)
    params = [rng.normal(size=(FEATURES, CLASSES)).astype("float32"),
              rng.normal(size=(CLASSES,)).astype("float32")]
    gradients = [[rng.normal(size=p.shape).astype("float32") for p in params]
                 for _ in range(4)]
    variables = [keras.Variable(p) for p in params]
    lars = clars_tf.LARS(learning_rate=0.1, momentum=0.9,
                         trust_coefficient=0.02)
    transform = optax.lars(
        0.1, trust_coefficient=0.02, momentum=0.9,
        trust_ratio_mask=lambda tree: [p.ndim > 1 for p in tree])
    state = transform.init(params)
    optax_params = params
    for step_gradients in gradients:
        lars.apply(step_gradients, variables)
        updates, state = transform.update(step_gradients, state, optax_params)
        optax_params = optax.apply_updates(optax_params, updates)
    results["lars_keras"] = [np.asarray(v).tolist() for v in variables]
    results["lars_optax"] = [np.asarray(p).tolist() for p in optax_params]

    x, _, labels = data()
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    results["data_parallel_devices"] = len(jax.devices())
    results["data_parallel_batch_norm_clars"] = fit(
        batch_norm_model(), clars_tf.CLARS(**CLARS_SETTINGS),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), x,
        labels)
    keras.distribution.set_distribution(None)
    return results


def main():
    results = {"backend": keras.backend.backend(), "fits": fits()}
    if keras.backend.backend() != "tensorflow":
        results.update(estimator_checks())
    if keras.backend.backend() == "jax":
        results.update(jax_checks())
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
