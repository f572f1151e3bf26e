"""The one place an estimator of `a_l` is built from a configuration."""

from clars_tf import gradient_norms
from clars_tf import one_pass_norms

METHODS = {"loop": gradient_norms.GradientNormEstimator,
           "one_pass": one_pass_norms.OnePassGradientNormEstimator}


def estimator_from_config(config, jit_compile=False):
    """A `NormEstimator` from a mapping of its settings.

    Args:
        config: `{"method": "loop" | "one_pass", "micro_batch_size": s,
            "num_micro_batches": J, "refresh_every": n, "check_every": k}`
            (refresh_every defaults to 1, method to "loop"; check_every,
            the one-pass estimator's alone, to its own default, with 0
            for never); other keys are ignored.
        jit_compile: whether the steps are compiled with XLA.

    Returns:
        A `GradientNormEstimator` or `OnePassGradientNormEstimator`.

    Raises:
        ValueError: for an unknown method.

    Example:

    ```python
    estimator = clars_tf.estimator_from_config(
        {"method": "one_pass", "micro_batch_size": 8,
         "num_micro_batches": 64})
    ```
    """
    method = config.get("method", "loop")
    if method not in METHODS:
        raise ValueError(f"Unknown estimator method {method!r}: choose one "
                         f"of {', '.join(sorted(METHODS))}.")
    options = {}
    if method == "one_pass" and "check_every" in config:
        options["check_every"] = config["check_every"] or None
    estimator = METHODS[method](config["micro_batch_size"],
                                config["num_micro_batches"],
                                config.get("refresh_every", 1), **options)
    estimator.jit_compile = bool(jit_compile)
    return estimator
