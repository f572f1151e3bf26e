"""`attach_gradient_norm_estimator` on every Keras backend.

TensorFlow keeps `clars_tf.training`'s step (the loop and one-pass
estimators, `tf.distribute`); JAX and PyTorch get `clars_tf.vmap_norms`'s
vectorised estimate before Keras's own step (inside the one function Keras
jits, on JAX).
"""

import keras
from keras import ops

from clars_tf import gradient_norms
from clars_tf import training
from clars_tf import vmap_norms


def attach_gradient_norm_estimator(model, estimator=None,
                                   per_example_loss=None):
    """Lets `model.fit` train with CLARS, on any Keras backend: one line.

    Wraps the model's `train_step` so each CLARS step first estimates the
    gradient norms on the step's own batch and hands them to the optimizer,
    then runs Keras's own step (other optimizers run Keras's step alone).
    Call it before or after `compile`, before `fit`; without it, CLARS's
    first step stops with an error that names it.

    On TensorFlow this is `clars_tf.training.attach_gradient_norm_estimator`
    (loop or one-pass estimator, `tf.distribute`). On JAX and PyTorch the
    estimate is `VmapGradientNormEstimator`'s (inside Keras's jitted step
    on JAX); a `GradientNormEstimator(s, J)` given there means the same
    estimate and is computed that way.

    Args:
        model: a Keras model.
        estimator: a `GradientNormEstimator`, `OnePassGradientNormEstimator`
            (TensorFlow) or `VmapGradientNormEstimator` (JAX, PyTorch);
            defaults to the reference, 8 examples x 64 micro-batches every
            step.
        per_example_loss: `fn(y_true, y_pred) -> [batch]`; defaults to the
            loss given to `compile`.

    Returns:
        The model, for chaining.

    Example:

    ```python
    model.compile(optimizer=clars_tf.CLARS(0.5), loss=...)
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.GradientNormEstimator(micro_batch_size=8,
                                              num_micro_batches=4))
    model.fit(x, y, batch_size=64)
    ```
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return training.attach_gradient_norm_estimator(
            model, estimator, per_example_loss)

    def per_example_loss_for(model):
        return per_example_loss or training.per_example_loss_of(model.loss)

    estimator = vmap_norms.VmapGradientNormEstimator.like(
        estimator or gradient_norms.GradientNormEstimator())
    if backend == "jax":
        return vmap_norms.attach_to_jax_step(model, estimator,
                                             per_example_loss_for)
    if backend == "torch":
        return vmap_norms.attach_to_torch_step(model, estimator,
                                               per_example_loss_for)
    raise ValueError(
        "clars_tf.attach_gradient_norm_estimator supports the tensorflow, "
        f"jax and torch backends; this Keras runs on {backend!r}.")
