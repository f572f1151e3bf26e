"""The gradient-norm estimate taken from the training step's own pass.

The loop estimator (`clars_tf.gradient_norms`) runs J extra forward and
backward passes over micro-batches of s examples. This one reads the same
quantities off the main step: for a layer `z = op(x, W) + b`, the step's
weight gradient is a sum over examples of terms built from the layer's input
`x_i` and output gradient `dz_i`, so the gradient of a group of s examples is
the same sum restricted to the group:

    kernel:  sum_{i in group} patches(x_i)^T dz_i. For an (undilated)
             convolution, the library's own filter-gradient op on each
             micro-batch. Elsewhere (Dense, dilated convolutions, steps
             compiled with XLA) one batched einsum over the inputs (image
             patches for convolutions), or without forming the gradient
             from the Gram matrices of inputs and output gradients ("ghost
             norm", Goodfellow 2015; used for per-example norms in
             differentially private training), whichever costs fewer
             multiplications;
    bias:    sum_{i in group} dz_i;
    batch-norm gamma / beta: sum_{i in group} dy_i * x_hat_i / sum dy_i,
             from per-example sums over positions.

The main loss is `sum(losses) / global_batch * loss_scale`, so multiplying a
group's term by `global_batch / (s * loss_scale)` gives the gradient of the
group's mean loss: the quantity the reference averages.

The step's gradients are the tape's, of the whole loss, for any model:
a recorded call reads its kernel and bias as watched tensors with the
gradient stopped, so the tape's gradient of the variable holds its other
uses (a kernel regularizer, weight tying) and is added to the call's own;
the output gradients the norms are read from are those of the data loss
alone (layer losses and activity regularizers enter the gradients only, as
the loop estimator leaves them out too).

Exact for models without batch norm or dropout (the same micro-batches as
the loop estimator give the same `a_l` up to rounding). With batch norm it
differs by design: the main pass normalizes with the statistics of the whole
replica batch (of the global batch with synchronized batch norm), the loop
estimator and the reference with each micro-batch's, so a group's gradient
here also carries the batch-statistics coupling to the rest of the batch. On
ResNet-8 and ResNet-20 with s = 8 it is about 2-3x the loop's estimate
(`scripts/one_pass_batch_norm.py`), so it is not a drop-in replacement for
a `trust_coefficient` tuned with the loop. With dropout the groups keep the
main pass's dropout masks where the loop draws new ones: another sample of
the same quantity, not the loop's numbers.

Read: `Conv1D` (causal padding too), `Conv2D`, `DepthwiseConv2D`
(channels_last, one group, activation or not), `Dense` (activation or not,
inputs of any rank whose leading axis is the batch) and
`BatchNormalization` (no renorm, no mask, channels last), each called once
per forward pass. Every other trainable variable (other
layer types such as LayerNormalization or Conv3D, shared layers, layers
applied to rows that are not the examples, variables also used outside
their layer's call) gets its estimate from the loop estimator, run for
those variables alone, and one warning per model names each with its layer
and the reason; a model without any such variable runs no extra forward or
backward pass.
"""

import collections
import contextlib
import logging
import threading

import keras
import tensorflow as tf

from clars_tf import gradient_norms
from clars_tf import layer_patches

_LOG = logging.getLogger(__name__)
_THREAD = threading.local()
# The layer attributes holding the variables a layer's call reads, per kind.
_READ_VARIABLES = {"conv": ("kernel", "bias"),
                   "depthwise": ("kernel", "bias"),
                   "dense": ("kernel", "bias"), "batch_norm": ()}


def _plain(layer):
    return (not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None)


def _kind(layer):
    """The handler for `layer`, or None when it needs the loop estimator."""
    kind = type(layer)
    if kind in (keras.layers.Conv1D, keras.layers.Conv2D,
                keras.layers.DepthwiseConv2D):
        if (layer.data_format == "channels_last" and _plain(layer)
                and getattr(layer, "groups", 1) == 1):
            return "depthwise" if kind is keras.layers.DepthwiseConv2D else (
                "conv")
    elif kind is keras.layers.Dense:
        if _plain(layer):
            return "dense"
    elif kind is keras.layers.BatchNormalization:
        if not layer.renorm:
            return "batch_norm"
    return None


_Call = collections.namedtuple(
    "_Call", ["inputs", "outputs", "moments", "reads"])
_Call.__doc__ = """One call of a recorded layer.

`outputs` is the tensor the norms are read from: the pre-activation of a
Dense or convolution (its gradient is the bias's, and the kernel's per
example), the output of a batch norm. `reads` maps the names of the
variables the call read to the tensors it read instead of them: their
values with the gradient stopped, watched by the tape, so the tape's
gradient of a variable holds only its uses elsewhere and the gradient of a
read this call's use."""


class _Recording:
    """One forward pass's layer calls, kept per tracing thread."""

    def __init__(self, tape):
        self.tape = tape
        self.calls = {}  # id(layer) -> [_Call]
        self.moments = {}  # id(layer) -> (mean, variance) of the running call
        self.pre_activations = {}  # id(layer) -> input of its activation

    @property
    def outputs(self):
        """The tensors whose gradients the estimate needs, in a fixed order."""
        return [call.outputs for calls in self.calls.values()
                for call in calls]


def _stopped_read(variable):
    """The variable's value as the layer reads it, with the gradient stopped.

    In the variable's dtype: under mixed precision the float16 value the
    layer computes with, cast back, so the layer computes the same numbers.
    """
    value = tf.cast(tf.convert_to_tensor(variable.value), variable.dtype)
    return tf.stop_gradient(value)


def _recording_call(layer, call):
    names = _READ_VARIABLES[_kind(layer)]

    def recorded(inputs, *args, **kwargs):
        recording = getattr(_THREAD, "recording", None)
        if recording is None:
            return call(inputs, *args, **kwargs)
        variables = {name: getattr(layer, name) for name in names
                     if getattr(layer, name, None) is not None
                     and getattr(layer, name).trainable}
        reads = {name: _stopped_read(variable)
                 for name, variable in variables.items()}
        for read in reads.values():
            recording.tape.watch(read)
        # A StatelessScope is per thread: replica threads tracing the same
        # layer concurrently each read their own tensors. A Dense or
        # convolution call reads its kernel and bias only and writes no
        # state, so no outer scope's values are hidden.
        with keras.StatelessScope(
                [(variables[name], read) for name, read in reads.items()],
                initialize_variables=False) as scope:
            outputs = call(inputs, *args, **kwargs)
        # What the call wrote (a batch norm's moving statistics) the scope
        # held back: written here, as the call would have without it, to
        # the variable or to the caller's own StatelessScope.
        read_ids = {id(variable) for variable in variables.values()}
        for variable in layer.weights:
            written = scope.get_current_value(variable)
            if id(variable) not in read_ids and written is not None:
                variable.assign(written)
        pre_activation = recording.pre_activations.pop(id(layer), outputs)
        # A masked batch norm is not read (it falls back to the loop).
        moments = (recording.moments.pop(id(layer), None)
                   if kwargs.get("mask") is None else None)
        recording.calls.setdefault(id(layer), []).append(
            _Call(inputs, pre_activation, moments, reads))
        return outputs

    return recorded


def _recording_activation(layer, activation):
    def recorded(pre_activation):
        recording = getattr(_THREAD, "recording", None)
        if recording is not None:
            recording.pre_activations[id(layer)] = pre_activation
        return activation(pre_activation)

    return recorded


def _recording_moments(layer, moments):
    def recorded(inputs, mask):
        mean, variance = moments(inputs, mask)
        recording = getattr(_THREAD, "recording", None)
        if recording is not None:
            recording.moments[id(layer)] = (mean, variance)
        return mean, variance

    return recorded


def _recording_hooks(layer):
    """The attributes that make a layer record its calls."""
    hooks = {"call": _recording_call(layer, layer.call)}
    if _kind(layer) == "batch_norm":
        hooks["_moments"] = _recording_moments(layer, layer._moments)
    elif layer.activation is not None:
        hooks["activation"] = _recording_activation(layer, layer.activation)
    return hooks


@contextlib.contextmanager
def recording_layers(model, tape):
    """Records the calls of the model's supported layers.

    The hooks are instance attributes shared by every thread (replica threads
    of MirroredStrategy trace the same layers concurrently); what they record
    goes to the calling thread's recording only.

    Args:
        model: the Keras model about to be called.
        tape: the `tf.GradientTape` recording the forward pass; it watches
            the variable reads of the recorded calls.

    Yields:
        The `_Recording` the forward pass fills in.
    """
    layers = [layer for layer in model._flatten_layers(include_self=False)
              if _kind(layer)]
    recording = _Recording(tape)
    outer = getattr(_THREAD, "recording", None)
    with layer_patches.patched(layers, "one_pass_recording",
                               _recording_hooks):
        _THREAD.recording = recording
        try:
            yield recording
        finally:
            _THREAD.recording = outer


def _squared_norms_of_products(inputs, output_gradients):
    """`||sum_n inputs[g, n] (x) output_gradients[g, n]||^2` for each group g.

    Args:
        inputs: `[groups, n, p]` float32.
        output_gradients: `[groups, n, k]` float32.
    """
    n, p = inputs.shape[1], inputs.shape[2]
    k = output_gradients.shape[2]
    # Per group: forming the p x k gradient costs n*p*k multiplications, the
    # two n x n Gram matrices n*n*(p+k).
    if None not in (n, p, k) and n * (p + k) < p * k:
        input_gram = tf.einsum("gnp,gmp->gnm", inputs, inputs)
        gradient_gram = tf.einsum("gnk,gmk->gnm", output_gradients,
                                  output_gradients)
        # The exact value is >= 0; where a group's gradient nearly cancels,
        # rounding in the sum can make it slightly negative (NaN under
        # sqrt).
        return tf.maximum(
            tf.reduce_sum(input_gram * gradient_gram, axis=[1, 2]), 0.0)
    gradients = tf.einsum("gnp,gnk->gpk", inputs, output_gradients)
    return tf.reduce_sum(tf.square(gradients), axis=[1, 2])


_Geometry = collections.namedtuple(
    "_Geometry", ["kernel_size", "strides", "dilations", "padding",
                  "kernel_shape"])


def _geometry(layer):
    """The convolution as a 2D one over `[batch, h, w, channels]` images.

    A Conv1D over `[batch, steps, channels]` is a 2D convolution of height
    1; its causal padding, the left padding its call adds before a valid
    convolution (see `_as_images`).
    """
    if len(layer.kernel.shape) == 3:
        return _Geometry(
            (1, layer.kernel_size[0]), (1, layer.strides[0]),
            (1, layer.dilation_rate[0]),
            "VALID" if layer.padding == "causal" else layer.padding.upper(),
            (1, *layer.kernel.shape))
    return _Geometry(tuple(layer.kernel_size), tuple(layer.strides),
                     tuple(layer.dilation_rate), layer.padding.upper(),
                     tuple(layer.kernel.shape))


def _as_images(layer, inputs, output_gradients):
    """A Conv1D's inputs and output gradients as images of height 1."""
    if len(layer.kernel.shape) != 3:
        return inputs, output_gradients
    if layer.padding == "causal":
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        inputs = tf.pad(inputs, [[0, 0], [left, 0], [0, 0]])
    return inputs[:, None], output_gradients[:, None]


def _patches(layer, inputs):
    """`[groups * s, out_h, out_w, kh * kw * channels]`, in kernel order.

    Args:
        inputs: `[groups, s, h, w, channels]`.
    """
    inputs = tf.reshape(inputs, [-1, *inputs.shape[2:]])
    geometry = _geometry(layer)
    if geometry.kernel_size == (1, 1) and geometry.strides == (1, 1):
        return inputs
    return tf.image.extract_patches(
        inputs, sizes=[1, *geometry.kernel_size, 1],
        strides=[1, *geometry.strides, 1],
        rates=[1, *geometry.dilations, 1], padding=geometry.padding)


def _squares_by_filter_gradients(kind, layer, jit_compile):
    """Whether the kernel's group norms come from filter-gradient ops.

    Undilated convolutions in a step not compiled with XLA: one
    filter-gradient op per group, the op the tape itself uses. The CPU
    kernels of dilated filter gradients support float32 only (Keras reaches
    them through space-to-batch instead), and XLA lowers many small
    convolutions slowly: there the norms come from einsums over image
    patches.
    """
    return (kind in ("conv", "depthwise") and layer.kernel.trainable
            and _geometry(layer).dilations == (1, 1) and not jit_compile)


def _filter_gradient(kind, layer, inputs, output_gradients):
    """The kernel gradient over these examples, as the tape builds it.

    In the layer's compute dtype (float16 under mixed_float16, as the
    backward pass of the convolution computes it), cast to the kernel's.
    """
    geometry = _geometry(layer)
    backprop = (tf.raw_ops.DepthwiseConv2dNativeBackpropFilter
                if kind == "depthwise" else tf.raw_ops.Conv2DBackpropFilter)
    gradient = backprop(input=inputs, filter_sizes=geometry.kernel_shape,
                        out_backprop=output_gradients,
                        strides=[1, *geometry.strides, 1],
                        padding=geometry.padding,
                        dilations=[1, *geometry.dilations, 1])
    return tf.cast(gradient, layer.kernel.dtype)


def _kernel_squares_from_filter_gradients(kind, layer, inputs,
                                          output_gradients):
    """Squared per-group norms of the kernel gradients, one op per group.

    Args:
        inputs, output_gradients: `[groups, s, ...]` layer inputs and output
            gradients, in the pass's dtype and loss scale.

    Returns:
        `[groups]` float32 squared norms, in the pass's loss scale.
    """
    groups = [_filter_gradient(kind, layer, group_inputs, group_gradients)
              for group_inputs, group_gradients in zip(
                  tf.unstack(inputs), tf.unstack(output_gradients))]
    return tf.reduce_sum(tf.square(tf.cast(tf.stack(groups), "float32")),
                         axis=[1, 2, 3, 4])


def _kernel_squares_from_patches(kind, layer, inputs, output_gradients):
    """Squared per-group norms of the kernel gradients, by einsums.

    Args:
        inputs: `[groups, s, ...]` float32 layer inputs.
        output_gradients: `[groups, s, ...]` float32 output gradients,
            already scaled to the micro-batches' mean losses.
    """
    groups = inputs.shape[0]
    flat = [-1 if groups is None else groups]
    kernel_shape = layer.kernel.shape
    outputs = output_gradients.shape[-1]
    if kind == "dense":
        patches = tf.reshape(inputs, flat + [-1, inputs.shape[-1]])
        dz = tf.reshape(output_gradients, flat + [-1, outputs])
        return _squared_norms_of_products(patches, dz)
    patches = _patches(layer, inputs)
    if kind == "depthwise":
        channels, multiplier = kernel_shape[2], kernel_shape[3]
        patches = tf.reshape(patches, flat + [-1, kernel_shape[0]
                                              * kernel_shape[1], channels])
        dz = tf.reshape(output_gradients, flat + [-1, channels, multiplier])
        return tf.reduce_sum(tf.square(
            tf.einsum("gnpc,gncm->gpcm", patches, dz)), axis=[1, 2, 3])
    patches = tf.reshape(patches, flat + [-1, patches.shape[-1]])
    dz = tf.reshape(output_gradients, flat + [-1, outputs])
    return _squared_norms_of_products(patches, dz)


def _bias_squares(output_gradients):
    """Squared per-group norms of the bias gradients, from `[groups, s, ...]`
    output gradients."""
    groups = output_gradients.shape[0]
    dz = tf.reshape(output_gradients, [-1 if groups is None else groups, -1,
                                       output_gradients.shape[-1]])
    return tf.reduce_sum(tf.square(tf.reduce_sum(dz, axis=1)), axis=1)


def _batch_norm_squares(layer, inputs, output_gradients, moments, indices):
    """Squared per-group norms of the gamma and beta gradients.

    Per example, the sums over positions of `dy` and `dy * x` (a pass over
    the batch each, no copies), then each group's rows: its gamma gradient
    is `rsqrt(variance + epsilon) * (sum dy * x - mean * sum dy)`.

    Args:
        inputs, output_gradients: the layer's, over the replica's batch, as
            the pass computed them (in the pass's loss scale).
        moments: the `(mean, variance)` the pass normalized with.
        indices: `[groups, s]` examples of each group.
    """
    mean, variance = (tf.cast(moment, "float32") for moment in moments)
    positions = list(range(1, len(inputs.shape) - 1))
    dy = tf.cast(output_gradients, "float32")

    def group_sums(per_position):
        per_example = tf.reduce_sum(per_position, axis=positions)
        return tf.reduce_sum(tf.gather(per_example, indices), axis=1)

    beta = group_sums(dy)
    result = {}
    if layer.scale:
        gamma = (group_sums(dy * tf.cast(inputs, "float32")) - mean * beta
                 ) * tf.math.rsqrt(variance + layer.epsilon)
        result["gamma"] = tf.reduce_sum(tf.square(gamma), axis=1)
    if layer.center:
        result["beta"] = tf.reduce_sum(tf.square(beta), axis=1)
    return result


class OnePassGradientNormEstimator(gradient_norms.GradientNormEstimator):
    """`a_l` from the inputs and output gradients of the step's own pass.

    Same micro-batches and meaning as `GradientNormEstimator` (the loop
    estimator, which stays the reference): J groups of s examples, evenly
    spaced in each replica's batch, `a_l` the mean norm of the groups'
    mean-loss gradients. Used through
    `clars_tf.compute_loss_gradients_and_norms` (custom loops) or
    `clars_tf.attach_gradient_norm_estimator` (`model.fit`), which record
    the layers during the main forward pass and differentiate the loss with
    respect to their outputs along with the variables. Called directly, it
    runs one extra forward and backward pass over the replica's batch.

    Right or loud: the step's gradients are the tape's gradients of the same
    loss (regularization losses included) whatever the model, and each
    variable's estimate is either read off the pass, equal to the loop
    estimator's without batch norm or dropout, or taken from the loop
    estimator for that variable alone, with one warning per model naming
    the variable, its layer and the reason. A variable falls back when its
    layer is of a type not read, is called more than once per pass, has a
    leading axis that is not the batch, or when the variable is also used
    outside its layer's call (weight tying, another layer's op on it).
    Losses added by layers (activity regularizers, `add_loss`) and any
    loss scaling the optimizer applies do not enter the estimate, as they
    do not enter the loop's.

    Args:
        micro_batch_size: `s`, examples per group (>= 1).
        num_micro_batches: `J`, groups per global step (>= 1).
        jit_compile: whether the step computing the estimates is compiled
            with XLA (`tf.function(jit_compile=True)`). It picks how the
            convolution kernels' group norms are computed, not what they
            are: einsums over image patches, which XLA compiles well,
            instead of a filter-gradient op per group, which XLA lowers
            slowly. `attach_gradient_norm_estimator` takes it from
            `model.jit_compile`. Defaults to False.

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

    records_main_pass = True

    def __init__(self, micro_batch_size=8, num_micro_batches=64,
                 jit_compile=False):
        super().__init__(micro_batch_size, num_micro_batches)
        self.jit_compile = bool(jit_compile)
        self._reported_models = set()

    @staticmethod
    def recording(model, tape):
        """Context manager recording the model's layers in a forward pass.

        Args:
            model: the model about to be called.
            tape: the persistent `tf.GradientTape` recording the pass.

        Returns:
            A context manager whose value is given to
            `gradients_and_norms`.
        """
        return recording_layers(model, tape)

    # Plain Python over the layers, no tensor-dependent control flow:
    # autograph has nothing to convert, and converting the helpers from
    # concurrently tracing replica threads has failed (MirroredStrategy).
    @tf.autograph.experimental.do_not_convert
    def __call__(self, model, per_example_loss, x, y, sample_weight=None,
                 loss_scale=None):
        """Estimates from a separate forward and backward pass (no update).

        Args:
            model, per_example_loss, x, y, sample_weight: as in
                `GradientNormEstimator.__call__`.
            loss_scale: as in `GradientNormEstimator.__call__`: the pass's
                loss is multiplied by it, so float16 output gradients
                underflow only where the main pass's would, and the norms
                are unscaled in float32.

        Returns:
            One float32 scalar per `model.trainable_variables`.
        """
        _, batch = gradient_norms._batch_size(x)
        with tf.GradientTape(persistent=True) as tape:
            with self.recording(model, tape) as recording:
                with keras.StatelessScope():
                    predictions = model(x, training=True)
            losses = tf.cast(per_example_loss(y, predictions), "float32")
            if sample_weight is not None:
                losses *= tf.cast(sample_weight, "float32")
            loss = tf.reduce_mean(losses)
            if loss_scale is not None:
                loss *= tf.cast(loss_scale, "float32")
        _, norms = self.gradients_and_norms(
            model, recording, loss, None, batch, loss_scale,
            per_example_loss, x, y, sample_weight)
        return norms

    def _layer_reason(self, layer, kind, calls, static_batch):
        """Why the layer's calls cannot be read, or None."""
        if kind is None:
            return (f"a {type(layer).__name__} is not read (read: Conv1D, "
                    "Conv2D, DepthwiseConv2D and Dense, channels last, one "
                    "group, "
                    "no LoRA or quantization; BatchNormalization without "
                    "renorm)")
        if len(calls) > 1:
            return f"called {len(calls)} times in one forward pass"
        inputs, outputs, moments, _ = calls[0]
        for name, tensor in (("input", inputs), ("output", outputs)):
            rows = tensor.shape[0] if tensor.shape.rank else None
            if rows != static_batch and (
                    static_batch is not None or rows is not None):
                return (f"its {name}'s leading axis has {rows} rows where "
                        f"the batch has {static_batch} examples (a layer "
                        "applied to rows that are not the examples, e.g. "
                        "[batch * time, features])")
        if kind == "batch_norm":
            if moments is None:
                return "a masked batch normalization"
            if layer.axis not in (-1, len(inputs.shape) - 1):
                return "a batch normalization over an axis that is not last"
        return None

    def _plan(self, model, recording, static_batch):
        """`(readable, reasons)` for the recorded layers.

        `readable`: `(layer, kind, call)` of the layers read off the pass;
        `reasons`: `{id(layer): why not}` for the others.
        """
        readable, reasons = [], {}
        for layer in model._flatten_layers(include_self=False):
            calls = recording.calls.get(id(layer), [])
            if not calls and _kind(layer):
                continue  # Not called: no gradient, nothing to read.
            reason = self._layer_reason(layer, _kind(layer), calls,
                                        static_batch)
            if reason is None:
                readable.append((layer, _kind(layer), calls[0]))
            else:
                reasons[id(layer)] = reason
        return readable, reasons

    @tf.autograph.experimental.do_not_convert
    def gradients_and_norms(self, model, recording, data_loss,
                            regularization_loss, global_batch_size,
                            loss_scale, per_example_loss, x, y,
                            sample_weight=None, jit_compile=None):
        """The step's gradients and every variable's estimate.

        Args:
            model: the model whose forward pass was recorded.
            recording: what `recording(model, tape)` recorded; its tape
                (persistent) recorded the losses too.
            data_loss: `sum(per-example losses) / global_batch_size`, times
                the loss scale: what the norms are read from.
            regularization_loss: the losses the model's layers added
                (weight and activity regularizers, `add_loss`), with the
                same scaling, or None. Only the gradients include it.
            global_batch_size: examples per step over all replicas.
            loss_scale: the factor both losses were multiplied by (float16
                loss scaling, `loss_scale_factor`), or None.
            per_example_loss: `fn(y_true, y_pred) -> [batch]`, for the loop
                estimator if some variables need it.
            x: the replica's inputs, for the loop estimator.
            y: the replica's targets, for the loop estimator.
            sample_weight: the replica's example weights, or None.
            jit_compile: whether the step is compiled with XLA; defaults
                to the estimator's `jit_compile`.

        Returns:
            `(gradients, norms)`, each one entry per
            `model.trainable_variables`: the gradient of
            `data_loss + regularization_loss` (None where it does not
            depend on the variable) and the float32 estimate `a_l`.
        """
        context = tf.distribute.get_replica_context()
        num_replicas = context.num_replicas_in_sync if context else 1
        static_batch, batch = self.check_batch(x, num_replicas)
        tape = recording.tape
        variables = model.trainable_variables
        readable, reasons = self._plan(model, recording, static_batch)
        all_reads = [(getattr(layer_of_call, name), read)
                     for layer_of_call, calls in self._calls_by_layer(
                         model, recording)
                     for call in calls for name, read in call.reads.items()]
        checks = []
        if static_batch is None:
            checks = [self._assert_batch_rows(layer, call, batch)
                      for layer, _, call in readable]
        outputs = [call.outputs for _, _, call in readable]
        # The tape builds every gradient, the kernels' too: summing them
        # from per-group pieces would save a filter-gradient op per layer,
        # but the CPU kernels' sums then vary in the last bits from run to
        # run (train.deterministic=true would not rerun bit for bit).
        data_gradients = tape.gradient(
            data_loss, variables + outputs + [r for _, r in all_reads])
        elsewhere = data_gradients[:len(variables)]
        output_gradients = data_gradients[
            len(variables):len(variables) + len(outputs)]
        parts = collections.defaultdict(list)  # id(variable) -> gradients
        for variable, gradient in zip(variables, elsewhere):
            parts[id(variable)].append(gradient)
        for (variable, _), gradient in zip(
                all_reads, data_gradients[len(variables) + len(outputs):]):
            parts[id(variable)].append(gradient)
        with tf.control_dependencies(checks):
            squares = self._squares(
                readable, output_gradients, batch, num_replicas,
                global_batch_size, loss_scale,
                self.jit_compile if jit_compile is None else jit_compile)
        in_data_loss = {variable_id for variable_id, gradients in parts.items()
                        if any(g is not None for g in gradients)}
        if regularization_loss is not None:
            regularization_gradients = tape.gradient(
                regularization_loss, variables + [r for _, r in all_reads])
            for variable, gradient in zip(
                    variables + [v for v, _ in all_reads],
                    regularization_gradients):
                parts[id(variable)].append(gradient)
        gradients = [_sum(parts[id(v)], v.dtype) for v in variables]

        # A variable read off its layer's call and used nowhere else in the
        # data loss gets its estimate from the pass; one not in the data
        # loss at all has zero gradients in every group, as in the loop.
        read = {id(v) for v, _ in all_reads}
        used_elsewhere = {id(v) for v, g in zip(variables, elsewhere)
                          if g is not None and id(v) in read}
        layer_of = self._layers_of_variables(model)
        norms, fallback, why = [None] * len(variables), [], {}
        for index, variable in enumerate(variables):
            if id(variable) in squares and id(variable) not in used_elsewhere:
                norms[index] = tf.reduce_mean(tf.sqrt(squares[id(variable)]))
            elif id(variable) not in in_data_loss:
                norms[index] = tf.constant(0.0)
            else:
                fallback.append(index)
                layer = layer_of.get(id(variable))
                why[index] = reasons.get(id(layer)) or (
                    "it is also used outside its layer's call (e.g. weight "
                    "tying, or another layer's op on it)")
        if fallback:
            self._report_fallback(model, variables, fallback, why, layer_of)
            looped = super().__call__(
                model, per_example_loss, x, y, sample_weight,
                loss_scale=loss_scale,
                variables=[variables[i] for i in fallback])
            for index, norm in zip(fallback, looped):
                norms[index] = norm
        return gradients, norms

    @staticmethod
    def _calls_by_layer(model, recording):
        for layer in model._flatten_layers(include_self=False):
            if id(layer) in recording.calls:
                yield layer, recording.calls[id(layer)]

    @staticmethod
    def _layers_of_variables(model):
        """`{id(variable): the layer that created it}`.

        A layer's weights include its sublayers'; its own are those none of
        them holds (a layer tracking another to use its kernel holds it as
        a sublayer's).
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

    def _squares(self, readable, output_gradients, batch, num_replicas,
                 global_batch_size, loss_scale, jit_compile):
        """Per-group squared norms of the readable variables' gradients.

        Returns:
            `{id(variable): [groups] squared norms}`.
        """
        indices = self.micro_batch_indices(batch, num_replicas)
        # d(group mean loss) = d(main loss) * global_batch / (s * scale).
        factor = tf.cast(global_batch_size, "float32") / float(
            self.micro_batch_size)
        if loss_scale is not None:
            factor /= tf.cast(loss_scale, "float32")

        def groups_of(tensor):
            """`[groups, s, ...]`: the one way examples are grouped."""
            return tf.gather(tensor, indices)

        squares = {}
        for (layer, kind, (inputs, outputs, moments, _)), dz in zip(
                readable, output_gradients):
            if dz is None:
                dz = tf.zeros_like(outputs)
            if kind == "batch_norm":
                per_name = _batch_norm_squares(layer, inputs, dz, moments,
                                               indices)
                per_name = {name: value * tf.square(factor)
                            for name, value in per_name.items()}
            else:
                group_gradients = tf.cast(groups_of(dz), "float32") * factor
                if kind != "dense":
                    inputs, dz = _as_images(layer, inputs, dz)
                if _squares_by_filter_gradients(kind, layer, jit_compile):
                    kernel = _kernel_squares_from_filter_gradients(
                        kind, layer, groups_of(inputs), groups_of(dz)
                    ) * tf.square(factor)
                else:
                    kernel = _kernel_squares_from_patches(
                        kind, layer, tf.cast(groups_of(inputs), "float32"),
                        group_gradients)
                per_name = {"kernel": kernel}
                if layer.bias is not None:
                    per_name["bias"] = _bias_squares(group_gradients)
            for name, value in per_name.items():
                variable = getattr(layer, name)
                if variable.trainable:
                    squares[id(variable)] = value
        return squares

    def _report_fallback(self, model, variables, fallback, why, layer_of):
        if id(model) in self._reported_models:
            return
        self._reported_models.add(id(model))
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


def _sum(gradients, dtype):
    """The sum of the non-None gradients in `dtype`, None if there are none.

    A read under mixed precision has the layer's compute dtype, and so has
    its gradient; the tape would cast it to the variable's dtype too.
    """
    present = [g for g in gradients if g is not None]
    if not present:
        return None
    if len(present) == 1 and present[0].dtype == dtype:
        return present[0]
    return tf.add_n([tf.cast(tf.convert_to_tensor(g), dtype)
                     for g in present])
