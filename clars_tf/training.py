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
        # keras.ops, so the same function serves the JAX and PyTorch steps.
        return function(y_true, keras.tree.map_structure(
            lambda t: keras.ops.cast(t, dtype), y_pred))

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


def gradient_norms_for_step(optimizer, estimator, estimate, variables):
    """Fresh estimates on refresh steps, the stored ones in between.

    Args:
        optimizer: the step's optimizer (possibly a `LossScaleOptimizer`),
            or None when the estimator refreshes on every step.
        estimator: a `clars_tf.gradient_norms.NormEstimator`.
        estimate: `fn() -> [float32 scalar]`, the fresh estimates.
        variables: the model's trainable variables (the optimizer is built
            for them if it is not yet).

    Returns:
        One float32 scalar per `model.trainable_variables`.
    """
    if estimator.refresh_every == 1:
        return list(estimate())
    if optimizer is None:
        raise ValueError(
            "`optimizer` is required when the estimator refreshes less "
            "than every step (its stored estimates are reused).")
    optimizer = _unwrap(optimizer)
    if not optimizer.built:
        optimizer.build(variables)
    refresh = tf.equal(optimizer.iterations % estimator.refresh_every, 0)
    stored = optimizer.gradient_norm_estimates
    return tf.unstack(tf.cond(refresh, lambda: tf.stack(estimate()),
                              lambda: tf.identity(stored)))


def _difference(total, part):
    if part is None or total is None:
        return total
    return tf.convert_to_tensor(total) - tf.cast(
        tf.convert_to_tensor(part), total.dtype)


def _gradients_and_norms(model, tape, observation, scaled_loss,
                         scaled_regularization, *, estimator, optimizer,
                         per_example_loss, x, y, sample_weight, loss_weight,
                         jit_compile):
    """The gradients of the step's own loss, and the estimator's norms.

    The gradients are `tape.gradient(scaled_loss, variables)`, whatever
    the estimator: it is asked for norms only, given the gradients of the
    data loss (`scaled_loss` less `scaled_regularization`) with respect to
    the variables and to the tensors it observed, taken in the same
    backward pass.
    """
    variables = model.trainable_variables
    if estimator is None:
        return tape.gradient(scaled_loss, variables), None
    sources = list(observation.sources)
    total = tape.gradient(scaled_loss, variables + sources)
    data = total
    if sources and scaled_regularization is not None:
        regularization = tape.gradient(scaled_regularization,
                                       variables + sources)
        data = [_difference(t, r) for t, r in zip(total, regularization)]
    step = gradient_norms.StepPass(
        per_example_loss, x, y, sample_weight, loss_scale_of(optimizer),
        loss_weight, data[:len(variables)], data[len(variables):],
        jit_compile)
    norms = gradient_norms_for_step(
        optimizer, estimator,
        lambda: estimator.estimate(model, observation, step), variables)
    return total[:len(variables)], norms


def compute_loss_gradients_and_norms(model, per_example_loss, x, y,
                                     sample_weight=None, *, global_batch_size,
                                     optimizer=None, estimator=None,
                                     defer_state_updates=False):
    """Loss, gradients and (for CLARS) norm estimates of one replica's batch.

    Call it inside the function given to `strategy.run`. The loss is scaled
    for the sum all-reduce that Keras optimizers perform: per-example losses
    summed and divided by the *global* batch size, model regularization
    losses (weight and activity regularizers, `add_loss`) divided by the
    number of replicas. The gradients are the tape's gradients of this loss
    times the optimizer's `scale_loss`, whichever estimator is used (an
    estimator supplies norms only); the norms are of the per-example losses
    alone, unscaled. Then apply with
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
        estimator: a `clars_tf.gradient_norms.NormEstimator`
            (`GradientNormEstimator`, the loop, or
            `OnePassGradientNormEstimator`, norms read off this pass), or
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
    # Persistent: an estimator reading the pass also needs the
    # regularization loss's gradients, to leave them out of its norms.
    with tf.GradientTape(persistent=True) as tape:
        with (keras.StatelessScope(collect_losses=True) if defer_state_updates
              else contextlib.nullcontext()) as scope, _observing(
                estimator, model) as observation:
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
        scale = optimizer.scale_loss if optimizer else (lambda value: value)
        scaled_loss = scale(loss)
        scaled_regularization = (None if regularization_loss is None
                                 else scale(regularization_loss))
    state_updates = None
    if defer_state_updates:
        state_updates = [
            (variable, scope.get_current_value(variable))
            for variable in model.non_trainable_variables
            if scope.get_current_value(variable) is not None
        ]
    gradients, norms = _gradients_and_norms(
        model, tape, observation, scaled_loss, scaled_regularization,
        estimator=estimator, optimizer=optimizer,
        per_example_loss=per_example_loss, x=x, y=y,
        sample_weight=sample_weight,
        loss_weight=1.0 / tf.cast(global_batch_size, "float32"),
        jit_compile=estimator is not None and estimator.jit_compile)
    del tape
    return StepGradients(loss, predictions, gradients, norms, state_updates)


def _observing(estimator, model):
    return (estimator.observe(model) if estimator is not None
            else contextlib.nullcontext())


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


def _fit_step(model, estimator, per_example_loss, data, reported_models):
    """Keras's train step, with the estimator's norms for CLARS.

    Mirrors Keras's TensorFlow `train_step` (the loss of `compute_loss`,
    its tracker, `scale_loss`, the tape's gradients, `apply_gradients`,
    `compute_metrics`); the estimator observes the forward pass and gives
    the norms, never the gradients.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = model.optimizer
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    batch = tf.shape(first)[0]
    global_batch_size = tf.cast(batch * num_replicas, "float32")
    variables = model.trainable_variables
    per_example = per_example_loss or per_example_loss_of(model.loss)
    with tf.GradientTape(persistent=True) as tape:
        with estimator.observe(model) as observation:
            y_pred = (model(x, training=True) if model._call_has_training_arg
                      else model(x))
        losses = tf.cast(per_example(y, y_pred), "float32")
        if sample_weight is not None:
            losses *= tf.cast(sample_weight, "float32")
        reason = _why_fit_loss_does_not_split(model, per_example_loss,
                                              y_pred, losses)
        if reason is None:
            # Keras's `compute_loss`, in its two parts: the compiled loss
            # (a mean, masked or not, already divided by the number of
            # replicas) and the layers'.
            data_loss = tf.cast(
                model._compile_loss(y, y_pred, sample_weight), "float32")
            added = [model._aggregate_additional_loss(loss)
                     for loss in model.losses]
            loss = data_loss + tf.add_n(added) if added else data_loss
        else:
            if id(model) not in reported_models:
                reported_models.add(id(model))
                _LOG.warning(
                    "model.fit with a gradient-norm estimator reading the "
                    "pass: %s, so the norms are read off the per-example "
                    "loss's own gradients and the step takes a second "
                    "backward pass (the gradients are still those of "
                    "Keras's loss).", reason)
            loss = model._compute_loss(x=x, y=y, y_pred=y_pred,
                                       sample_weight=sample_weight,
                                       training=True)
            data_loss = tf.reduce_sum(losses) / global_batch_size
        model._loss_tracker.update_state(loss * num_replicas,
                                         sample_weight=batch)
        scaled_loss = optimizer.scale_loss(loss)
        scaled_rest = optimizer.scale_loss(tf.cast(loss, "float32")
                                           - data_loss)
    # The data loss over the weighted per-example losses: 1 / global batch
    # for a mean, 1 / valid examples for a masked one (`ignore_class`).
    total = tf.reduce_sum(losses)
    loss_weight = tf.where(tf.equal(total, 0.0), 1.0 / global_batch_size,
                           tf.math.divide_no_nan(data_loss, total))
    gradients, norms = _gradients_and_norms(
        model, tape, observation, scaled_loss,
        None if reason is None and not model.losses else scaled_rest,
        estimator=estimator, optimizer=optimizer,
        per_example_loss=per_example, x=x, y=y, sample_weight=sample_weight,
        loss_weight=loss_weight, jit_compile=bool(model.jit_compile))
    del tape
    _unwrap(optimizer).set_gradient_norms(norms, variables)
    optimizer.apply_gradients(zip(gradients, variables))
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def attach_gradient_norm_estimator(model, estimator=None,
                                   per_example_loss=None):
    """Lets `model.fit` train with CLARS: the one extra line it needs.

    Wraps the model's `train_step` for CLARS (other optimizers run Keras's
    own step): Keras's own step (its loss from `compute_loss`,
    regularization losses and sample weights included, its loss tracker,
    `scale_loss`, the tape's gradients and `apply_gradients`, its compiled
    metrics), with the estimator observing the forward pass and handing
    the optimizer the norms before the weights change. Callbacks,
    `steps_per_execution` and distribution strategies work as with any
    Keras optimizer. Call it before or after `compile`, before `fit`.

    An estimator reading the pass (`OnePassGradientNormEstimator`) reads
    the norms off the compiled loss's gradients when Keras's loss is that
    loss (one per example, reduced with 'sum_over_batch_size', masked or
    not, one output, no `loss_weights`, no output mask) plus
    `model.losses`; otherwise (an overridden `compute_loss`, an explicit
    `per_example_loss`, ...) one warning says why, and the norms are read
    off the per-example loss's own gradients, which takes a second
    backward pass. The step reads the private attributes Keras's own train
    step reads (`KERAS_TRAIN_STEP_INTERNALS`); with a Keras that lacks
    one, one warning names it and each step estimates the norms in passes
    of the estimator's own, then runs Keras's step.

    Args:
        model: a Keras model (functional, Sequential or subclassed).
        estimator: a `clars_tf.gradient_norms.NormEstimator`; defaults to
            the reference loop estimator (8 examples x 64 micro-batches,
            every step).
        per_example_loss: `fn(y_true, y_pred) -> [batch]`; defaults to the
            loss given to `compile`.

    Returns:
        The model, for chaining.
    """
    estimator = estimator or gradient_norms.GradientNormEstimator()
    keras_train_step = model.train_step
    reported_models = set()

    def train_step(data):
        optimizer = _unwrap(model.optimizer)
        if not isinstance(optimizer, clars.CLARS):
            return keras_train_step(data)
        missing = [name for name in KERAS_TRAIN_STEP_INTERNALS
                   if not hasattr(model, name)]
        if not missing:
            return _fit_step(model, estimator, per_example_loss, data,
                             reported_models)
        if id(model) not in reported_models:
            reported_models.add(id(model))
            _LOG.warning(
                "model.fit with a gradient-norm estimator: this Keras (%s) "
                "has no %s, which its own train step uses, so each step "
                "estimates the norms in passes of the estimator's own "
                "before Keras's step; Keras 3.15, which clars-tf is tested "
                "with, has them.", keras.version(), ", ".join(missing))
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss = per_example_loss or per_example_loss_of(model.loss)
        loss_scale = loss_scale_of(model.optimizer)
        norms = gradient_norms_for_step(
            model.optimizer, estimator,
            lambda: estimator(model, loss, x, y, sample_weight,
                              loss_scale=loss_scale),
            model.trainable_variables)
        optimizer.set_gradient_norms(norms, model.trainable_variables)
        return keras_train_step(data)

    model.train_step = train_step
    return model
