"""Where CLARS meets a training step: custom `strategy.run` loops and fit."""

import collections
import contextlib
import logging

import keras
import tensorflow as tf

from clars_tf import clars
from clars_tf import gradient_norms

_LOG = logging.getLogger(__name__)


class StepGradients(collections.namedtuple(
        "StepGradients",
        ["loss", "predictions", "gradients", "gradient_norms",
         "state_updates"],
        defaults=[None])):
    """What `compute_loss_gradients_and_norms` returns for one replica.

    Pass `gradients` and `gradient_norms` to `optimizer.apply`.

    Attributes:
        loss: this replica's share of the global mean loss (regularization
            losses included), unscaled.
        predictions: the model's outputs on this replica's batch.
        gradients: one per `model.trainable_variables` (None where the loss
            does not depend on it), of the loss times the optimizer's loss
            scale, as Keras's own train step computes them.
        gradient_norms: one float32 `a_l` per trainable variable, or None
            without an estimator.
        state_updates: `(variable, value)` pairs deferred from the forward
            pass with `defer_state_updates=True`, else None.
    """

    __slots__ = ()


def apply_state_updates(state_updates):
    """Assigns the deferred (variable, value) updates of a forward pass.

    Args:
        state_updates: `StepGradients.state_updates`, or any iterable of
            `(variable, value)` pairs.

    Returns:
        None.

    Example:

    ```python
    out = clars_tf.compute_loss_gradients_and_norms(
        model, loss, x, y, global_batch_size=B, defer_state_updates=True)
    clars_tf.apply_state_updates(out.state_updates)
    ```
    """
    for variable, value in state_updates:
        variable.assign(value)


def _unwrap(optimizer):
    """The optimizer doing the update, inside a `LossScaleOptimizer`."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def per_example_loss_of(loss):
    """`fn(y_true, y_pred) -> [batch]` from a Keras loss identifier.

    Args:
        loss: a `keras.losses.Loss`, a loss function or its name, as given to
            `model.compile`.

    Returns:
        `fn(y_true, y_pred) -> [batch]` float32 losses, computed in the
        loss's dtype (float32) even for a mixed-precision model's outputs.

    Raises:
        ValueError: for a loss with no per-example form (e.g. a list or
            dict of losses for several outputs).

    Example:

    ```python
    per_example = clars_tf.per_example_loss_of(
        "sparse_categorical_crossentropy")
    ```
    """
    if isinstance(loss, str) or callable(loss):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        function, dtype = loss.call, loss.dtype
    elif callable(loss):
        function, dtype = loss, "float32"
    else:
        raise ValueError(
            f"Cannot derive a per-example loss from {loss!r} (multi-output "
            "losses need an explicit one): pass `per_example_loss=fn(y_true, "
            "y_pred)` returning one loss per example.")

    def per_example(y_true, y_pred):
        # As compiled Keras losses do: the loss in float32, not in a mixed
        # precision model's float16.
        return function(y_true, tf.nest.map_structure(
            lambda t: tf.cast(t, dtype), y_pred))

    return per_example


def loss_scale_of(optimizer):
    """The factor the optimizer multiplies the loss by, else None.

    Read off `optimizer.scale_loss` (a `LossScaleOptimizer`'s dynamic
    scale, an optimizer's `loss_scale_factor`), so any linear scaling an
    optimizer applies is undone, not only the ones known here.

    Args:
        optimizer: a Keras optimizer or None.

    Returns:
        A float32 scalar tensor, or None when there is no optimizer or it
        does not scale the loss.
    """
    if optimizer is None:
        return None
    one = tf.constant(1.0)
    scale = optimizer.scale_loss(one)
    if scale is one:
        return None
    return tf.cast(scale, "float32")


def gradient_norms_for_step(optimizer, estimator, model, per_example_loss, x,
                            y, sample_weight=None):
    """Fresh estimates on refresh steps, the stored ones in between.

    `optimizer` may be wrapped in a `LossScaleOptimizer`; the estimator then
    gets its scale as `loss_scale` (see `GradientNormEstimator.__call__`).
    """
    loss_scale = loss_scale_of(optimizer)
    optimizer = _unwrap(optimizer)

    def estimate():
        return tf.stack(estimator(model, per_example_loss, x, y,
                                  sample_weight, loss_scale=loss_scale))

    if estimator.refresh_every == 1:
        return tf.unstack(estimate())
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    refresh = tf.equal(optimizer.iterations % estimator.refresh_every, 0)
    stored = optimizer.gradient_norm_estimates
    return tf.unstack(tf.cond(refresh, estimate, lambda: tf.identity(stored)))


def compute_loss_gradients_and_norms(model, per_example_loss, x, y,
                                     sample_weight=None, *, global_batch_size,
                                     optimizer=None, estimator=None,
                                     defer_state_updates=False):
    """Loss, gradients and (for CLARS) norm estimates of one replica's batch.

    Call it inside the function given to `strategy.run`. The loss is scaled
    for the sum all-reduce that Keras optimizers perform: per-example losses
    summed and divided by the *global* batch size, model regularization
    losses (weight and activity regularizers, `add_loss`) divided by the
    number of replicas. The gradients are those of this loss times the
    optimizer's `scale_loss`, whichever estimator is used; the norms are
    of the per-example losses alone, unscaled. Then apply with
    `optimizer.apply(out.gradients, model.trainable_variables,
    gradient_norms=out.gradient_norms)` (LARS/SGD take no norms).

    Args:
        model: a built Keras model.
        per_example_loss: `fn(y_true, y_pred) -> [batch]`.
        x: this replica's inputs.
        y: this replica's targets.
        sample_weight: this replica's example weights, or None.
        global_batch_size: examples per step over all replicas.
        optimizer: needed with an estimator that refreshes less than every
            step (its stored estimates are reused).
        estimator: a `GradientNormEstimator` (the loop), a
            `OnePassGradientNormEstimator` (norms read off this pass), or
            None when the optimizer needs no norms.
        defer_state_updates: if True, the forward pass's state writes
            (batch-norm moving statistics, seed generators) are not applied
            but returned in `state_updates`, for the caller to apply with
            `apply_state_updates` only if it applies the step (a step skipped
            for non-finite values then leaves no trace).

    Returns:
        `StepGradients(loss, predictions, gradients, gradient_norms,
        state_updates)`, where `loss` is this replica's share of the global
        mean loss.
    """
    context = tf.distribute.get_replica_context()
    num_replicas = context.num_replicas_in_sync if context else 1
    variables = model.trainable_variables
    one_pass = getattr(estimator, "records_main_pass", False)
    # Persistent for the one-pass estimator: it differentiates the data
    # loss (the norms are read from it alone) and the regularization loss
    # separately.
    with tf.GradientTape(persistent=one_pass) as tape:
        with (keras.StatelessScope(collect_losses=True) if defer_state_updates
              else contextlib.nullcontext()) as scope, (
                estimator.recording(model, tape) if one_pass
                else contextlib.nullcontext()) as recording:
            predictions = model(x, training=True)
        # In a stateless scope the layers' `add_loss` losses go to the
        # scope; `model.losses` then holds the weight regularizers only.
        regularization = model.losses
        if defer_state_updates:
            regularization = scope.losses + regularization
        losses = tf.cast(per_example_loss(y, predictions), "float32")
        if sample_weight is not None:
            losses *= tf.cast(sample_weight, "float32")
        data_loss = tf.reduce_sum(losses) / tf.cast(global_batch_size,
                                                    "float32")
        regularization_loss = None
        if regularization:
            regularization_loss = tf.add_n(
                [tf.cast(r, "float32") for r in regularization]
            ) / num_replicas
        loss = (data_loss if regularization_loss is None
                else data_loss + regularization_loss)
        if one_pass and optimizer is not None:
            data_loss = optimizer.scale_loss(data_loss)
            if regularization_loss is not None:
                regularization_loss = optimizer.scale_loss(
                    regularization_loss)
        scaled_loss = optimizer.scale_loss(loss) if optimizer else loss
    state_updates = None
    if defer_state_updates:
        state_updates = [
            (variable, scope.get_current_value(variable))
            for variable in model.non_trainable_variables
            if scope.get_current_value(variable) is not None
        ]
    norms = None
    if one_pass:
        gradients, norms = estimator.gradients_and_norms(
            model, recording, data_loss, regularization_loss,
            global_batch_size, loss_scale_of(optimizer), per_example_loss,
            x, y, sample_weight)
        del tape
    else:
        gradients = tape.gradient(scaled_loss, variables)
    if estimator is not None and not one_pass:
        if estimator.refresh_every > 1 and optimizer is None:
            raise ValueError(
                "`optimizer` is required when the estimator refreshes less "
                "than every step (its stored estimates are reused).")
        norms = (
            gradient_norms_for_step(optimizer, estimator, model,
                                    per_example_loss, x, y, sample_weight)
            if optimizer is not None
            else estimator(model, per_example_loss, x, y, sample_weight,
                           loss_scale=None)
        )
    return StepGradients(loss, predictions, gradients, norms, state_updates)


def _why_fit_loss_does_not_split(model, per_example_loss, y_pred,
                                 losses):
    """Why Keras's loss is not `compiled loss + model.losses` with the
    compiled loss the batch mean of `losses`, or None.

    When it is, the norms are read off the compiled loss's own gradients;
    otherwise they need the per-example loss's (a second backward pass).
    """
    if type(model).compute_loss is not keras.Model.compute_loss:
        return "the model overrides `compute_loss`"
    if per_example_loss is not None:
        return ("`per_example_loss` is given, so it may differ from the "
                "compiled loss")
    if model._compile_loss is None:
        return "`compile` was given no loss"
    if getattr(model._compile_loss, "_user_loss_weights", None) is not None:
        return "`compile` was given `loss_weights`"
    reduction = getattr(model.loss, "reduction", "sum_over_batch_size")
    if reduction != "sum_over_batch_size":
        return (f"the compiled loss reduces with {reduction!r}, not "
                "'sum_over_batch_size'")
    if len(tf.nest.flatten(y_pred)) != 1:
        return "the model has several outputs"
    if getattr(y_pred, "_keras_mask", None) is not None:
        return "the model's output carries a mask"
    if losses.shape.rank != 1:
        return (f"the loss gives {losses.shape.rank}-d losses, not one per "
                "example")
    return None


# What Keras's own TensorFlow `train_step` reads off the model, and so does
# the one-pass fit step. They are private: with a Keras that lacks one, fit
# takes two passes (the norms, then Keras's own step) and says so once.
KERAS_TRAIN_STEP_INTERNALS = ("_call_has_training_arg", "_compile_loss",
                              "_aggregate_additional_loss", "_compute_loss",
                              "_loss_tracker")


def _fit_step_in_one_pass(model, estimator, per_example_loss, data,
                          reported_models):
    """Keras's train step with the gradients and norms from one pass.

    Mirrors Keras's TensorFlow `train_step` (the loss of `compute_loss`,
    its tracker, `scale_loss`, `apply_gradients`, `compute_metrics`); only
    the gradients come from the estimator's recorded pass.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = model.optimizer
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    batch = tf.shape(first)[0]
    global_batch_size = batch * num_replicas
    variables = model.trainable_variables
    per_example = per_example_loss or per_example_loss_of(model.loss)
    with tf.GradientTape(persistent=True) as tape:
        with estimator.recording(model, tape) as recording:
            y_pred = (model(x, training=True) if model._call_has_training_arg
                      else model(x))
        losses = tf.cast(per_example(y, y_pred), "float32")
        reason = _why_fit_loss_does_not_split(model, per_example_loss,
                                              y_pred, losses)
        if reason is None:
            # Keras's `compute_loss`, in its two parts: the compiled loss
            # (already divided by the number of replicas) and the layers'.
            data_loss = model._compile_loss(y, y_pred, sample_weight)
            added = [model._aggregate_additional_loss(loss)
                     for loss in model.losses]
            regularization_loss = tf.add_n(added) if added else None
            loss = (data_loss if regularization_loss is None
                    else data_loss + regularization_loss)
        else:
            if id(model) not in reported_models:
                reported_models.add(id(model))
                _LOG.warning(
                    "model.fit with the one-pass gradient-norm estimator: "
                    "%s, so the norms are read off the per-example loss's "
                    "own gradients and the step takes a second backward "
                    "pass (the gradients are still those of Keras's loss).",
                    reason)
            loss = model._compute_loss(x=x, y=y, y_pred=y_pred,
                                       sample_weight=sample_weight,
                                       training=True)
            if sample_weight is not None:
                losses *= tf.cast(sample_weight, "float32")
            data_loss = tf.reduce_sum(losses) / tf.cast(global_batch_size,
                                                        "float32")
            regularization_loss = tf.cast(loss, "float32") - data_loss
        model._loss_tracker.update_state(loss * num_replicas,
                                         sample_weight=batch)
        data_loss = optimizer.scale_loss(data_loss)
        if regularization_loss is not None:
            regularization_loss = optimizer.scale_loss(regularization_loss)
    gradients, norms = estimator.gradients_and_norms(
        model, recording, data_loss, regularization_loss, global_batch_size,
        loss_scale_of(optimizer), per_example, x, y, sample_weight,
        jit_compile=model.jit_compile)
    del tape
    _unwrap(optimizer).set_gradient_norms(norms, variables)
    optimizer.apply_gradients(zip(gradients, variables))
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def attach_gradient_norm_estimator(model, estimator=None,
                                   per_example_loss=None):
    """Lets `model.fit` train with CLARS: the one extra line it needs.

    Wraps the model's `train_step` for CLARS (other optimizers run Keras's
    own step). With a `GradientNormEstimator` (the loop), each step first
    estimates the gradient norms on the step's own batch (before the
    weights change) and hands them to the optimizer, then runs Keras's own
    step unchanged. With a `OnePassGradientNormEstimator`, the step is
    Keras's own step (its loss from `compute_loss`, regularization losses
    and sample weights included, its loss tracker, `scale_loss` and
    `apply_gradients`, its compiled metrics) with the gradients and the
    norms taken from the same forward and backward pass. Either way
    callbacks, `steps_per_execution` and distribution strategies work as
    with any Keras optimizer. Call it before or after `compile`, before
    `fit`.

    With the one-pass estimator the norms are read off the compiled loss's
    gradients when Keras's loss is that loss (one per example, reduced
    with 'sum_over_batch_size', one output, no `loss_weights`, no mask)
    plus `model.losses`; otherwise (an overridden `compute_loss`, an
    explicit `per_example_loss`, ...) one warning says why, and the norms
    are read off the per-example loss's own gradients, which takes a
    second backward pass. The one-pass step reads the private attributes
    Keras's own train step reads (`KERAS_TRAIN_STEP_INTERNALS`); with a
    Keras that lacks one, one warning names it and each step estimates
    the norms in a pass of its own, then runs Keras's step.

    Args:
        model: a Keras model (functional, Sequential or subclassed).
        estimator: a `GradientNormEstimator` or
            `OnePassGradientNormEstimator`; defaults to the reference loop
            estimator (8 examples x 64 micro-batches, every step).
        per_example_loss: `fn(y_true, y_pred) -> [batch]`; defaults to the
            loss given to `compile`.

    Returns:
        The model, for chaining.
    """
    estimator = estimator or gradient_norms.GradientNormEstimator()
    keras_train_step = model.train_step
    one_pass = getattr(estimator, "records_main_pass", False)
    reported_models = set()

    def train_step(data):
        optimizer = _unwrap(model.optimizer)
        if not isinstance(optimizer, clars.CLARS):
            return keras_train_step(data)
        missing = [name for name in KERAS_TRAIN_STEP_INTERNALS
                   if one_pass and not hasattr(model, name)]
        if one_pass and not missing:
            return _fit_step_in_one_pass(model, estimator, per_example_loss,
                                         data, reported_models)
        if missing and id(model) not in reported_models:
            reported_models.add(id(model))
            _LOG.warning(
                "model.fit with the one-pass gradient-norm estimator: this "
                "Keras (%s) has no %s, which its own train step uses, so "
                "each step estimates the norms in a pass of its own before "
                "Keras's step (two forward and backward passes); Keras "
                "3.15, which clars-tf is tested with, has them.",
                keras.version(), ", ".join(missing))
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss = per_example_loss or per_example_loss_of(model.loss)
        norms = gradient_norms_for_step(model.optimizer, estimator, model,
                                        loss, x, y, sample_weight)
        optimizer.set_gradient_norms(norms, model.trainable_variables)
        return keras_train_step(data)

    model.train_step = train_step
    return model
