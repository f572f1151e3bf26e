"""The gradient-norm estimate read off the training step's own pass.

The loop estimator (`clars_tf.gradient_norms`) runs J extra forward and
backward passes over micro-batches of s examples. This one reads the same
quantities off the step's own pass: the layers it reads (`Dense`, `Conv1D`,
`Conv2D`, `DepthwiseConv2D`; `one_pass_recording`) have weight gradients
that are sums over examples of terms built from the layer's input and its
pre-activation's gradient, so each group's gradient is the same sum over
the group (`group_norms`). The step's data loss is `loss_weight * sum of
the weighted per-example losses * loss_scale` (`loss_weight` is
`1 / global batch` for a mean, `1 / valid examples` for a masked mean), so
the group's term times `1 / (loss_weight * s * loss_scale)` is the
gradient of the group's mean loss: the quantity the loop averages.

The estimator never touches the step's gradients: the step differentiates
its own loss on its own pass, asking the tape for the pre-activations'
gradients along with the variables' in the same backward pass; the
recording only keeps tensors.

Right or loud: a variable's estimate is read off the pass only where it
equals the loop's (`one_pass_plan` says where, before any number is read);
every other variable takes its estimate from a loop estimator the
estimator holds, run for those variables alone, with one warning per model
naming each variable, its layer and the reason. What cannot be seen
beforehand (a read variable also used outside its layer's call: weight
tying, another layer's op on it) the step checks: the per-example terms
must add up to the variable's gradient (`group_norms.decomposes`). Such a
use is in the model's structure, so it shows on every step: the check runs
on the first step and every `check_every`-th after it, and once a check
fails every read variable takes its estimate from the loop from then on
(the check, one projection per layer, may miss another such use), said
once (outside XLA, where the step cannot log).
"""

import logging
import threading

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from clars_tf import gradient_norms
from clars_tf import group_norms
from clars_tf import one_pass_plan
from clars_tf import one_pass_recording

_LOG = logging.getLogger(__name__)
_PLAN_LOCK = threading.Lock()


def _not_read(layer):
    return (f"a {type(layer).__name__} is not read (read: Conv1D, Conv2D, "
            "DepthwiseConv2D and Dense, channels last, one group, no LoRA "
            "or quantization)")


class OnePassGradientNormEstimator(gradient_norms.NormEstimator):
    """`a_l` from the inputs and output gradients of the step's own pass.

    Same micro-batches and meaning as `GradientNormEstimator` (the loop
    estimator, which stays the reference): J groups of s examples, evenly
    spaced in each replica's batch, `a_l` the mean norm of the groups'
    mean-loss gradients. Used through
    `clars_tf.compute_loss_gradients_and_norms` (custom loops) or
    `clars_tf.attach_gradient_norm_estimator` (`model.fit`), which run the
    step's forward pass inside `observe` and hand `estimate` the gradients
    of the step's own loss. Called directly, it runs one extra forward and
    backward pass over the replica's batch.

    Right or loud: each variable's estimate is either read off the pass,
    equal to the loop estimator's, or taken from the loop estimator (held
    as `reference`) for that variable alone, with one warning per model
    naming the variable, its layer and the reason (see `one_pass_plan`:
    layer types not read, layers called more than once or inside a
    control-flow body, rows that are not the examples, and any op that
    makes an example's pass depend on the rest of the batch or on chance,
    such as batch normalization and dropout, which send every variable to
    the loop). Losses added by layers (activity regularizers, `add_loss`)
    and any loss scaling the optimizer applies do not enter the estimate,
    as they do not enter the loop's.

    Args:
        micro_batch_size: `s`, examples per group (>= 1).
        num_micro_batches: `J`, groups per global step (>= 1).
        refresh_every: recompute the estimate every this many steps and
            reuse the stored one in between (>= 1).
        jit_compile: whether the step computing the estimates is compiled
            with XLA (`tf.function(jit_compile=True)`). It picks how the
            convolution kernels' group norms are computed, not what they
            are (einsums over image patches, which XLA compiles well,
            instead of a filter-gradient op per group), and leaves the
            run-time warning of a failed check out (XLA cannot log).
            `attach_gradient_norm_estimator` takes it from
            `model.jit_compile`. Defaults to False.
        check_every: check on the first step and then every this many
            steps that every read variable's gradient is the sum of the
            per-example terms its norms are read from (see
            `group_norms.decomposes`); once a check fails, every read
            variable takes its estimate from the loop from that step on
            (kept in the estimator's variables, not in checkpoints: a
            restored run checks again on its first step). 1 checks every step; None
            never, leaving a variable also used outside its layer's call
            undetected. Unchecked steps do not compute the check
            (`benchmarks/one_pass_fallback.py` measures its cost).
            Defaults to 100.

    Example:

    ```python
    estimator = clars_tf.OnePassGradientNormEstimator(8, 64)
    out = clars_tf.compute_loss_gradients_and_norms(
        model, per_example_loss, x, y, global_batch_size=512,
        optimizer=optimizer, estimator=estimator)
    optimizer.apply(out.gradients, model.trainable_variables,
                    gradient_norms=out.gradient_norms)
    ```
    """

    def __init__(self, micro_batch_size=8, num_micro_batches=64,
                 refresh_every=1, jit_compile=False, check_every=100):
        super().__init__(micro_batch_size, num_micro_batches, refresh_every)
        if check_every is not None and (
                isinstance(check_every, bool) or not isinstance(
                    check_every, int) or check_every < 1):
            raise ValueError(
                "`check_every` must be an integer >= 1 (1 checks every "
                "step) or None (never check), got "
                f"{check_every!r}.")
        self.jit_compile = bool(jit_compile)
        self.check_every = check_every
        self.reference = gradient_norms.GradientNormEstimator(
            micro_batch_size, num_micro_batches)
        self._plans = {}
        self._check_states = {}
        self._reported = set()

    def observe(self, model):
        return one_pass_recording.recording_layers(model)

    # Plain Python over the layers, no tensor-dependent control flow:
    # autograph has nothing to convert, and converting the helpers from
    # concurrently tracing replica threads has failed (MirroredStrategy).
    @tf.autograph.experimental.do_not_convert
    def __call__(self, model, per_example_loss, x, y, sample_weight=None,
                 loss_scale=None, variables=None):
        """Estimates from a forward and backward pass of its own.

        Args and returns as in `NormEstimator.__call__`.
        """
        x, y = tf.nest.map_structure(tf.convert_to_tensor, (x, y))
        _, batch = gradient_norms.batch_size(x)
        all_variables = model.trainable_variables
        scale = (tf.constant(1.0) if loss_scale is None
                 else tf.cast(loss_scale, "float32"))
        with tf.GradientTape() as tape:
            with self.observe(model) as observation:
                with keras.StatelessScope():
                    predictions = model(x, training=True)
            losses = tf.cast(per_example_loss(y, predictions), "float32")
            if sample_weight is not None:
                losses *= tf.cast(sample_weight, "float32")
            loss = tf.reduce_mean(losses) * scale
        sources = list(observation.sources)
        gradients = tape.gradient(loss, all_variables + sources)
        step = gradient_norms.StepPass(
            per_example_loss, x, y, sample_weight, loss_scale,
            1.0 / tf.cast(batch, "float32"), gradients[:len(all_variables)],
            gradients[len(all_variables):], self.jit_compile)
        norms = self.estimate(model, observation, step)
        if variables is None:
            return norms
        index = {id(v): i for i, v in enumerate(all_variables)}
        return [norms[index[id(v)]] for v in variables]

    def _plan(self, model, x):
        key = (id(model), tuple((tuple(t.shape[1:]), t.dtype.name)
                                for t in tf.nest.flatten(x)))
        with _PLAN_LOCK:
            if key not in self._plans:
                self._plans[key] = one_pass_plan.probe(model, x)
            return self._plans[key]

    def _check_state(self, model):
        with _PLAN_LOCK:
            if id(model) not in self._check_states:
                self._check_states[id(model)] = _CheckState()
            return self._check_states[id(model)]

    @tf.autograph.experimental.do_not_convert
    def estimate(self, model, observation, step):
        context = tf.distribute.get_replica_context()
        num_replicas = context.num_replicas_in_sync if context else 1
        static_batch, batch = self.check_batch(step.x, num_replicas)
        plan = self._plan(model, step.x)
        output_gradient = {
            id(source): gradient for source, gradient in zip(
                observation.sources, step.source_gradients)}

        def rows(tensor):
            found = tensor.shape[0] if tensor.shape.rank else None
            if found == static_batch and found is not None:
                return None
            if static_batch is None and found is None:
                return None  # Checked when the step runs.
            return (f"leading axis has {found} rows where the batch has "
                    f"{static_batch} examples (a layer applied to rows that "
                    "are not the examples, e.g. [batch * time, features])")

        readable, reasons = [], {}
        for layer in model._flatten_layers(include_self=False):
            kind = one_pass_recording.kind_of(layer)
            calls, nested = observation.calls_of(layer) if kind else ([], 0)
            if kind and not (calls or nested):
                continue  # Not called: no gradient, nothing to read.
            reason = (plan.coupling if kind else _not_read(layer)) or (
                plan.layer_reasons.get(id(layer))
                or one_pass_plan.layer_reason(calls, nested, rows))
            if reason is None:
                readable.append((layer, kind, calls[0]))
            else:
                reasons[id(layer)] = reason

        variables = model.trainable_variables
        data_gradient = {id(v): g for v, g in zip(variables,
                                                  step.variable_gradients)}
        indices = self.micro_batch_indices(batch, num_replicas)
        factor = 1.0 / (tf.cast(step.loss_weight, "float32")
                        * float(self.micro_batch_size))
        if step.loss_scale is not None:
            factor /= tf.cast(step.loss_scale, "float32")
        squares, checks = {}, []
        for layer, kind, call in readable:
            names = list(one_pass_plan.weights_of(layer))
            dz = output_gradient.get(id(call.pre_activation))
            if dz is None:
                dz = tf.zeros_like(call.pre_activation)
            assertions = []
            if static_batch is None:
                assertions = [self._assert_batch_rows(layer, call, batch)]
            with tf.control_dependencies(assertions):
                per_name = group_norms.layer_squares(
                    kind, layer, call.inputs, dz, indices, factor,
                    step.jit_compile)
            for name in names:
                squares[id(getattr(layer, name))] = per_name[name]

            def gradient_of(name):
                variable = getattr(layer, name, None)
                if name not in names:
                    return None
                gradient = data_gradient.get(id(variable))
                return (tf.zeros(variable.shape, "float32") if gradient is None
                        else gradient)

            checks.append((layer, (
                kind, layer, call.inputs, dz, gradient_of("kernel"),
                gradient_of("bias"),
                group_norms.check_tolerance(call.pre_activation.dtype))))

        layer_of = _layers_of_variables(model)
        norms, fallback, why = [None] * len(variables), [], {}
        for index, variable in enumerate(variables):
            if id(variable) in squares:
                continue
            layer = layer_of.get(id(variable))
            # Not in this pass's data loss, and nothing (a draw, a branch)
            # would put it in a micro-batch's: zero in every group.
            if data_gradient[id(variable)] is None and not (
                    plan.coupling or id(layer) in plan.layer_reasons):
                norms[index] = tf.constant(0.0)
                continue
            fallback.append(index)
            why[index] = (
                plan.coupling or reasons.get(id(layer))
                or plan.layer_reasons.get(id(layer))
                or "it is used outside the call of the layer holding it")
        if fallback:
            self._report_fallback(model, variables, fallback, why, layer_of)
            looped = self.reference(
                model, step.per_example_loss, step.x, step.y,
                step.sample_weight, loss_scale=step.loss_scale,
                variables=[variables[i] for i in fallback])
            for index, norm in zip(fallback, looped):
                norms[index] = norm
        read = [i for i, v in enumerate(variables) if id(v) in squares]
        if read:
            for index, norm in zip(read, self._read_or_loop(
                    model, step, [variables[i] for i in read], squares,
                    checks)):
                norms[index] = norm
        return norms

    def _read_or_loop(self, model, step, variables, squares, checks):
        """The read estimates, or the loop's once a check has failed.

        Every read variable goes to the loop, not only those of the layer
        whose check failed: the check is one projection per layer and may
        miss another such use in the same model. The loop runs zero turns
        while no check has failed: no `tf.cond` around it, which would
        cost the common case (`NormEstimator.__call__`'s `run`).
        """
        read = [tf.reduce_mean(tf.sqrt(squares[id(v)])) for v in variables]
        if not checks or self.check_every is None:
            return read
        failed = self._failed_check(model, step, checks)
        looped = self.reference(
            model, step.per_example_loss, step.x, step.y,
            step.sample_weight, loss_scale=step.loss_scale,
            variables=variables, run=failed)
        return [tf.where(failed, loop, norm)
                for loop, norm in zip(looped, read)]

    def _failed_check(self, model, step, checks):
        """Whether a check has failed on this model on any step.

        On a due step (the first, then every `check_every`-th) the checks
        run inside a `tf.cond`, so other steps do not compute them, and a
        failure is kept in the model's `_CheckState`.
        """
        state = self._check_state(model)
        earlier = state.failed.read_value() > 0
        due = tf.equal(state.estimates % self.check_every, 0)
        with tf.control_dependencies([due]):
            counted = state.estimates.assign_add(1)

        def check():
            passed = tf.stack([group_norms.decomposes(*arguments)
                               for _, arguments in checks])
            failed = tf.logical_or(earlier,
                                   tf.logical_not(tf.reduce_all(passed)))
            newly = tf.logical_and(tf.logical_not(passed),
                                   tf.logical_not(earlier))
            with tf.control_dependencies(self._warn_failed_checks(
                    model, [layer for layer, _ in checks], newly,
                    step.jit_compile)):
                update = state.failed.assign(tf.cast(failed, "float32"))
            with tf.control_dependencies([update]):
                return tf.identity(failed)

        with tf.control_dependencies([counted]):
            return tf.cond(due, check, lambda: tf.identity(earlier))

    def _warn_failed_checks(self, model, layers, newly, jit_compile):
        """Warns once per model, where the step can log (not under XLA)."""
        names = [
            f"{layer.name} ("
            + ", ".join(getattr(v, "path", v.name)
                        for v in one_pass_plan.weights_of(layer).values())
            + ")"
            for layer in layers]
        key = (id(model), "checks")

        def warn(flags):
            if key not in self._reported and any(flags.numpy()):
                self._reported.add(key)
                failed = [name for name, bad in zip(names, flags.numpy())
                          if bad]
                _LOG.warning(
                    "One-pass gradient-norm estimator: the gradients of "
                    "layer(s) %s are not the sums of the per-example terms "
                    "their norms are read from (a variable also used "
                    "outside its layer's call: weight tying, or another "
                    "layer's op on it), so from this step on the loop "
                    "estimator gives the estimates of every variable read "
                    "off the pass (the check may miss another such use).",
                    "; ".join(failed))
            return True

        if tf.executing_eagerly():
            warn(newly)
            return []
        if jit_compile or _tracing_for_xla():
            return []
        # Python runs only on the step where a check first fails.
        return [tf.cond(tf.reduce_any(newly),
                        lambda: tf.py_function(warn, [newly], tf.bool),
                        lambda: tf.constant(True))]

    def _assert_batch_rows(self, layer, call, batch):
        """With an unknown batch size, a run-time check of the rows."""
        return tf.debugging.assert_equal(
            tf.shape(call.inputs)[0], batch, message=(
                f"One-pass gradient-norm estimator: layer `{layer.name}` "
                "is applied to rows that are not the batch examples, so "
                "its micro-batches cannot be read off the pass. With a "
                "static batch size (e.g. `drop_remainder=True`) the "
                "estimator sees this when tracing and takes this layer "
                "estimate from the loop estimator instead."))

    def _report_fallback(self, model, variables, fallback, why, layer_of):
        if id(model) in self._reported:
            return
        self._reported.add(id(model))
        lines = []
        for index in fallback:
            variable = variables[index]
            layer = layer_of.get(id(variable))
            where = (f"layer '{layer.name}' ({type(layer).__name__})"
                     if layer is not None else "the model")
            lines.append(f"  {getattr(variable, 'path', variable.name)} of "
                         f"{where}: {why[index]}")
        _LOG.warning(
            "One-pass gradient-norm estimator: %d variable(s) take their "
            "estimate from the loop estimator (its micro-batch passes run "
            "for these variables only):\n%s", len(fallback),
            "\n".join(lines))


class _CheckState:
    """What the step's check found on one model, across steps.

    In variables, so compiled, XLA and replicated steps keep it: how many
    estimates were made (the check runs on every `check_every`-th from the
    first) and whether a check ever failed (1.0) or not (0.0). Created
    outside any step being traced (`tf.init_scope`).
    """

    def __init__(self):
        with tf.init_scope():
            self.estimates = tf.Variable(
                tf.constant(0, "int64"), trainable=False,
                name="one_pass_estimates")
            self.failed = tf.Variable(0.0, trainable=False,
                                      name="one_pass_failed_check")


def _tracing_for_xla():
    """Whether the step being traced is compiled with XLA, which has no op
    that calls Python (TensorFlow's own test of it, private)."""
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def _layers_of_variables(model):
    """`{id(variable): the layer that created it}`.

    A layer's weights include its sublayers'; its own are those none of
    them holds (a layer tracking another to use its kernel holds it as a
    sublayer's).
    """
    owner = {}
    for layer in model._flatten_layers(include_self=True):
        held = {id(v) for sublayer in layer._flatten_layers(
                    include_self=False, recursive=False)
                for v in sublayer.trainable_weights}
        for variable in layer.trainable_weights:
            if id(variable) not in held:
                owner.setdefault(id(variable), layer)
    return owner
