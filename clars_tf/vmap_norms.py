"""The gradient-norm estimate on JAX and PyTorch, exact by construction.

Spec step 1, `a_l = (1/J) * sum_j ||grad_l of the mean loss over micro-batch
S_j||`: each micro-batch's gradient is the backend's `grad` (`jax.grad`,
`torch.func.grad`) of `model.stateless_call` on that micro-batch alone,
vectorised over the J micro-batches with its `vmap` (`jax.vmap`,
`torch.func.vmap`), and reduced to one norm per variable inside the
vectorised function. Whatever the backend differentiates (control flow,
RNNs, any layer) is estimated exactly; there is no per-layer bookkeeping to
get wrong. Batch normalization takes its statistics over each micro-batch
(the function sees one micro-batch), and the state the calls would write
(moving statistics, seed generators) is dropped, as in
`clars_tf.GradientNormEstimator` on TensorFlow.

`jax` and `torch` are imported when an estimate is first made, so
`import clars_tf` works without them.
"""

import functools
import inspect

import keras
import numpy as np
from keras import ops

from clars_tf import clars
from clars_tf import gradient_norms

# What the vectorised micro-batch gradients may occupy at once, by default.
DEFAULT_CHUNK_MEMORY_BYTES = 2**30


def _all_layers(layer):
    for sublayer in getattr(layer, "layers", None) or []:
        yield sublayer
        yield from _all_layers(sublayer)


class VmapGradientNormEstimator:
    """Estimates `a_l` for every trainable variable on JAX and PyTorch.

    Micro-batch j of a batch of B examples holds the s examples from
    `floor(j * B / J)`, the grouping of `clars_tf.GradientNormEstimator`, so
    both estimators see the same examples. Under
    `keras.distribution.DataParallel` the step sees the global batch: the
    micro-batches are sharded over the devices along J and the mean over J
    is XLA's cross-device reduction, so the estimate is the one of a single
    device (up to float32 rounding), as on TensorFlow.

    Memory: the vectorised gradients take `chunk_size` times the trainable
    parameters at once. `chunk_size=None` picks the largest number of
    micro-batches whose float32 gradients fit `chunk_memory_bytes` (all J
    when they fit); fewer than J run as a sequential map over chunks of
    that many micro-batches (`jax.lax.map` with `batch_size`,
    `torch.func.vmap` with `chunk_size`), which bounds memory at the cost
    of running the chunks one after another (`docs/measurements.md` has
    the figure).

    Args:
        micro_batch_size: `s`, examples per micro-batch (>= 1).
        num_micro_batches: `J`, micro-batches per step (>= 1).
        refresh_every: recompute every this many steps and reuse the stored
            estimates in between (>= 1; 1 is the reference).
        chunk_size: micro-batches vectorised at once, or None to derive it
            from `chunk_memory_bytes`.
        chunk_memory_bytes: the memory the vectorised gradients may take
            when `chunk_size` is None. Defaults to 1 GiB.

    Example:

    ```python
    # KERAS_BACKEND=jax or torch
    clars_tf.attach_gradient_norm_estimator(
        model, clars_tf.VmapGradientNormEstimator(micro_batch_size=8,
                                                  num_micro_batches=64))
    ```
    """

    def __init__(self, micro_batch_size=8, num_micro_batches=64,
                 refresh_every=1, chunk_size=None,
                 chunk_memory_bytes=DEFAULT_CHUNK_MEMORY_BYTES):
        check = gradient_norms._check_positive_int  # pylint: disable=protected-access
        check("micro_batch_size", micro_batch_size)
        check("num_micro_batches", num_micro_batches)
        check("refresh_every", refresh_every)
        if chunk_size is not None:
            check("chunk_size", chunk_size)
        check("chunk_memory_bytes", chunk_memory_bytes)
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = num_micro_batches
        self.refresh_every = refresh_every
        self.chunk_size = chunk_size
        self.chunk_memory_bytes = chunk_memory_bytes

    @classmethod
    def like(cls, estimator):
        """This estimator with the settings of a TensorFlow one.

        Args:
            estimator: a `VmapGradientNormEstimator` (returned as it is) or a
                `clars_tf.GradientNormEstimator`, whose definition (the same
                micro-batches, per-micro-batch batch-norm statistics) this
                estimator computes exactly.

        Returns:
            A `VmapGradientNormEstimator`.
        """
        if isinstance(estimator, cls):
            return estimator
        if type(estimator) is gradient_norms.GradientNormEstimator:
            return cls(estimator.micro_batch_size, estimator.num_micro_batches,
                       estimator.refresh_every)
        raise ValueError(
            f"On the {keras.backend.backend()} backend the gradient-norm "
            f"estimator is `VmapGradientNormEstimator`; got {estimator!r}. "
            "Pass `clars_tf.VmapGradientNormEstimator(s, J)` or "
            "`clars_tf.GradientNormEstimator(s, J)` (the same estimate); the "
            "one-pass estimator exists on TensorFlow only.")

    def micro_batch_indices(self, batch_size):
        """The examples of each micro-batch, `[J, s]` NumPy int32 indices.

        Args:
            batch_size: examples in the step's batch, an int.

        Returns:
            Row j holds `floor(j * B / J) + [0, s)`.

        Raises:
            ValueError: when the micro-batches do not fit the batch.
        """
        needed = self.num_micro_batches * self.micro_batch_size
        if batch_size < needed:
            raise ValueError(
                f"The estimator needs {self.num_micro_batches} micro-batches "
                f"of {self.micro_batch_size} examples ({needed}), but the "
                f"batch has {batch_size}. Lower `num_micro_batches` or "
                "`micro_batch_size`, or raise the batch size (a last partial "
                "batch: make the data a multiple of the batch size).")
        starts = np.arange(self.num_micro_batches) * batch_size
        starts //= self.num_micro_batches
        return (starts[:, None] + np.arange(self.micro_batch_size)).astype(
            "int32")

    def micro_batches_per_chunk(self, trainable_values):
        """How many micro-batches are vectorised at once (see the class).

        Args:
            trainable_values: the trainable variables' values (their sizes
                give the memory of one micro-batch's gradients).

        Returns:
            An int in [1, J].
        """
        if self.chunk_size is not None:
            return min(self.chunk_size, self.num_micro_batches)
        gradient_bytes = 4 * sum(int(np.prod(v.shape))
                                 for v in trainable_values)
        fitting = self.chunk_memory_bytes // max(gradient_bytes, 1)
        return int(min(max(fitting, 1), self.num_micro_batches))

    def __call__(self, model, per_example_loss, trainable_values,
                 non_trainable_values, x, y, sample_weight=None):
        """Returns the estimates, a float32 array with one entry per variable.

        Pure: the model's state is read from the values passed and written
        nowhere, so it can run inside a jitted JAX train step.

        Args:
            model: a built Keras model.
            per_example_loss: `fn(y_true, y_pred) -> [batch]` losses.
            trainable_values: values of `model.trainable_variables`.
            non_trainable_values: values of `model.non_trainable_variables`.
            x, y, sample_weight: the step's batch.

        Returns:
            A `[len(trainable_values)]` float32 array, `a_l` per variable.
        """
        if self.micro_batch_size == 1 and any(
                isinstance(layer, keras.layers.BatchNormalization)
                for layer in _all_layers(model)):
            raise ValueError(gradient_norms.MICRO_BATCH_OF_ONE_WITH_BATCH_NORM)
        batch_size = keras.tree.flatten(x)[0].shape[0]
        indices = self.micro_batch_indices(batch_size)
        if sample_weight is None:
            # Weights of 1 (exact) keep every part a tensor, which
            # torch.func.vmap needs.
            sample_weight = ops.ones((batch_size,), "float32")

        def take(tensor):
            return _shard_along_micro_batches(ops.take(tensor, indices, axis=0))

        micro_batches = keras.tree.map_structure(take,
                                                 (x, y, sample_weight))
        call_kwargs = ({"training": True}
                       if "training" in inspect.signature(model.call).parameters
                       else {})

        def micro_batch_loss(values, micro_x, micro_y, micro_weight):
            predictions, _ = model.stateless_call(
                values, non_trainable_values, micro_x, **call_kwargs)
            losses = ops.cast(per_example_loss(micro_y, predictions),
                              "float32")
            return ops.mean(losses * ops.cast(micro_weight, "float32"))

        grad, vectorised = _function_transforms(
            self.micro_batches_per_chunk(trainable_values),
            self.num_micro_batches)

        def norms_of_micro_batch(micro_batch):
            gradients = grad(micro_batch_loss)(list(trainable_values),
                                               *micro_batch)
            return ops.stack([
                ops.sqrt(ops.sum(ops.square(ops.cast(g, "float32"))))
                for g in gradients])

        return ops.mean(vectorised(norms_of_micro_batch)(micro_batches),
                        axis=0)


def _function_transforms(chunk, count):
    """This backend's `(grad, vectorised map)`, the map in chunks of `chunk`.

    JAX: `jax.vmap`, or `jax.lax.map` over chunks of `chunk` vectorised
    micro-batches. PyTorch: `torch.func.vmap` with its `chunk_size`.
    """
    backend = keras.backend.backend()
    # pylint: disable=import-outside-toplevel
    if backend == "jax":
        import jax
        if chunk >= count:
            return jax.grad, jax.vmap
        return jax.grad, lambda function: functools.partial(
            jax.lax.map, function, batch_size=chunk)
    if backend == "torch":
        import torch
        return torch.func.grad, lambda function: torch.func.vmap(
            function, chunk_size=chunk)
    raise ValueError(
        f"VmapGradientNormEstimator runs on the jax and torch backends, not "
        f"{backend!r}; on TensorFlow use GradientNormEstimator.")


def _shard_along_micro_batches(micro_batched):
    """Shards `[J, s, ...]` over the data-parallel devices along J."""
    distribution = keras.distribution.distribution()
    if getattr(distribution, "batch_dim_name", None) is None:
        return micro_batched
    mesh = distribution.device_mesh
    devices = mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]
    if micro_batched.shape[0] % devices:
        return micro_batched
    return keras.distribution.distribute_tensor(
        micro_batched, distribution.get_data_layout(micro_batched.shape))


def attach_to_jax_step(model, estimator, per_example_loss_for):
    """Wraps the JAX `train_step(state, data)` of `model` for CLARS.

    Each CLARS step estimates the norms from the step's own state and data
    (before the weights change), writes them into the optimizer's state as
    `set_gradient_norms` does, then runs Keras's own step on that state,
    all inside the one function Keras jits. Other optimizers run Keras's
    step untouched.

    Args:
        model: a Keras model on the JAX backend.
        estimator: a `VmapGradientNormEstimator`.
        per_example_loss_for: `fn(model) -> fn(y_true, y_pred)`, the loss
            the estimate differentiates.

    Returns:
        The model.
    """
    import jax  # pylint: disable=import-outside-toplevel

    keras_train_step = model.train_step

    def train_step(state, data):
        optimizer = model.optimizer
        inner = _clars_inside(optimizer)
        if inner is None:
            return keras_train_step(state, data)
        trainable, non_trainable, optimizer_values, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss = per_example_loss_for(model)

        def estimate():
            return estimator(model, loss, trainable, non_trainable, x, y,
                             sample_weight)

        with keras.StatelessScope(state_mapping=list(
                zip(optimizer.variables, optimizer_values))) as scope:
            if estimator.refresh_every == 1:
                norms = estimate()
            else:
                norms = jax.lax.cond(
                    inner.iterations.value % estimator.refresh_every == 0,
                    estimate, lambda: inner.gradient_norm_estimates.value)
            inner.set_gradient_norms(ops.unstack(norms))
        optimizer_values = [scope.get_current_value(v)
                            for v in optimizer.variables]
        return keras_train_step(
            (trainable, non_trainable, optimizer_values, metrics), data)

    model.train_step = train_step
    return model


def attach_to_torch_step(model, estimator, per_example_loss_for):
    """Wraps the PyTorch `train_step(data)` of `model` for CLARS.

    As on TensorFlow: each CLARS step estimates the norms on the step's own
    batch (before the weights change), hands them to the optimizer, then
    runs Keras's own step.

    Args:
        model: a Keras model on the PyTorch backend.
        estimator: a `VmapGradientNormEstimator`.
        per_example_loss_for: `fn(model) -> fn(y_true, y_pred)`.

    Returns:
        The model.
    """
    keras_train_step = model.train_step

    def train_step(data):
        inner = _clars_inside(model.optimizer)
        if inner is None:
            return keras_train_step(data)
        if int(inner.iterations.value) % estimator.refresh_every == 0:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            norms = estimator(
                model, per_example_loss_for(model),
                [v.value.detach() for v in model.trainable_variables],
                [v.value.detach() for v in model.non_trainable_variables],
                x, y, sample_weight)
        else:
            norms = inner.gradient_norm_estimates.value
        inner.set_gradient_norms(ops.unstack(norms))
        return keras_train_step(data)

    model.train_step = train_step
    return model


def _clars_inside(optimizer):
    """The CLARS optimizer itself or inside a `LossScaleOptimizer`, else None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, clars.CLARS) else None
