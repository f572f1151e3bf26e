"""The gradient-norm estimate taken from the training step's own pass.

The loop estimator (`clars_tf.gradient_norms`) runs J extra forward and
backward passes over micro-batches of s examples. This one reads the same
quantities off the main step: for a layer `z = op(x, W) + b`, the step's
weight gradient is a sum over examples of terms built from the layer's input
`x_i` and output gradient `dz_i`, so the gradient of a group of s examples is
the same sum restricted to the group:

    kernel:  sum_{i in group} patches(x_i)^T dz_i. For an (undilated)
             convolution, the library's own filter-gradient op on each
             micro-batch (a contiguous slice of the batch) and once on the
             examples in no micro-batch; the step's kernel gradient is the
             sum of these pieces, so the tape does not compute it a second
             time and the estimate costs little more than the step's own
             filter gradients. Elsewhere (Dense, dilated
             convolutions, under XLA) the tape builds the gradient and the
             groups' norms come from one batched einsum over the inputs
             (image patches for convolutions), or without forming the
             gradient from the Gram matrices of inputs and output
             gradients ("ghost norm", Goodfellow 2015; used for
             per-example norms in differentially private training),
             whichever costs fewer multiplications;
    bias:    sum_{i in group} dz_i;
    batch-norm gamma / beta: sum_{i in group} dy_i * x_hat_i / sum dy_i,
             from per-example sums over positions.

The main loss is `sum(losses) / global_batch * loss_scale`, so multiplying a
group's term by `global_batch / (s * loss_scale)` gives the gradient of the
group's mean loss: the quantity the reference averages.

Exact for models without batch norm (the same micro-batches as the loop
estimator give the same `a_l` up to rounding). With batch norm it differs by
design: the main pass normalizes with the statistics of the whole replica
batch (of the global batch with synchronized batch norm), the loop estimator
and the reference with each micro-batch's, so a group's gradient here also
carries the batch-statistics coupling to the rest of the batch. On ResNet-8
and ResNet-20 with s = 8 it is about 2-3x the loop's estimate
(`scripts/one_pass_batch_norm.py`), so it is not a drop-in replacement for
a `trust_coefficient` tuned with the loop.

Supported: `Conv2D`, `DepthwiseConv2D` (channels_last, no activation
inside the layer, one group), `Dense` (no activation inside the layer), and
`BatchNormalization` (no renorm, no mask, channels last), each called once
per forward pass. The variables of any other layer get their estimate from
the loop estimator (said once in the log); a model without any such
variable runs no extra forward or backward pass.
"""

import contextlib
import logging
import threading

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from clars_tf import gradient_norms

_LOG = logging.getLogger(__name__)
_THREAD = threading.local()
_HOOKS_LOCK = threading.Lock()
# id(layer) -> [number of active recordings, attributes replaced].
_INSTALLED = {}


def _has_no_activation(layer):
    return layer.activation in (None, keras.activations.linear)


def _plain(layer):
    return (not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None)


def _kind(layer):
    """The handler for `layer`, or None when it needs the loop estimator."""
    kind = type(layer)
    if kind in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
        if (layer.data_format == "channels_last" and _plain(layer)
                and getattr(layer, "groups", 1) == 1
                and _has_no_activation(layer)):
            return "depthwise" if kind is keras.layers.DepthwiseConv2D else (
                "conv")
    elif kind is keras.layers.Dense:
        if _plain(layer) and _has_no_activation(layer):
            return "dense"
    elif kind is keras.layers.BatchNormalization:
        if not layer.renorm:
            return "batch_norm"
    return None


class _Recording:
    """One forward pass's layer inputs and outputs, kept per tracing thread."""

    def __init__(self):
        self.calls = {}  # id(layer) -> list of (inputs, outputs, moments)
        self.moments = {}  # id(layer) -> (mean, variance) of the last call

    def add(self, layer, inputs, outputs, usable=True):
        moments = self.moments.pop(id(layer), None) if usable else None
        self.calls.setdefault(id(layer), []).append(
            (inputs, outputs, moments))

    @property
    def outputs(self):
        """The tensors whose gradients the estimate needs, in a fixed order."""
        return [outputs for calls in self.calls.values()
                for _, outputs, _ in calls]


def _recording_call(layer, call):
    def recorded(inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        recording = getattr(_THREAD, "recording", None)
        if recording is not None:
            # A masked batch norm is not read (it falls back to the loop).
            recording.add(layer, inputs, outputs,
                          usable=kwargs.get("mask") is None)
        return outputs

    return recorded


def _recording_moments(layer, moments):
    def recorded(inputs, mask):
        mean, variance = moments(inputs, mask)
        recording = getattr(_THREAD, "recording", None)
        if recording is not None:
            recording.moments[id(layer)] = (mean, variance)
        return mean, variance

    return recorded


def _install(layer):
    replaced = {"call": _recording_call(layer, layer.call)}
    if _kind(layer) == "batch_norm":
        replaced["_moments"] = _recording_moments(layer, layer._moments)
    previous = {name: layer.__dict__.get(name) for name in replaced}
    for name, value in replaced.items():
        object.__setattr__(layer, name, value)
    return previous


def _uninstall(layer, previous):
    for name, value in previous.items():
        if value is None:
            object.__delattr__(layer, name)
        else:
            object.__setattr__(layer, name, value)


@contextlib.contextmanager
def recording_layers(model):
    """Records the inputs and outputs of the model's supported layers.

    The hooks are instance attributes shared by every thread (replica threads
    of MirroredStrategy trace the same layers concurrently); what they record
    goes to the calling thread's recording only.
    """
    layers = [layer for layer in model._flatten_layers(include_self=False)
              if _kind(layer)]
    with _HOOKS_LOCK:
        for layer in layers:
            entry = _INSTALLED.setdefault(id(layer), [0, None])
            if not entry[0]:
                entry[1] = _install(layer)
            entry[0] += 1
    recording = _Recording()
    outer = getattr(_THREAD, "recording", None)
    _THREAD.recording = recording
    try:
        yield recording
    finally:
        _THREAD.recording = outer
        with _HOOKS_LOCK:
            for layer in layers:
                entry = _INSTALLED[id(layer)]
                entry[0] -= 1
                if not entry[0]:
                    _uninstall(layer, entry[1])
                    del _INSTALLED[id(layer)]


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
        return tf.reduce_sum(input_gram * gradient_gram, axis=[1, 2])
    gradients = tf.einsum("gnp,gnk->gpk", inputs, output_gradients)
    return tf.reduce_sum(tf.square(gradients), axis=[1, 2])


def _patches(layer, inputs):
    """`[groups * s, out_h, out_w, kh * kw * channels]`, in kernel order.

    Args:
        inputs: `[groups, s, h, w, channels]`.
    """
    inputs = tf.reshape(inputs, [-1, *inputs.shape[2:]])
    kh, kw = layer.kernel_size
    if (kh, kw) == (1, 1) and tuple(layer.strides) == (1, 1):
        return inputs
    return tf.image.extract_patches(
        inputs, sizes=[1, kh, kw, 1], strides=[1, *layer.strides, 1],
        rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())


def _in_xla_context():
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def _reads_kernel_gradient(kind, layer):
    """Whether the kernel's gradient is summed from per-group pieces.

    Undilated convolutions outside XLA: the pieces are the library's own
    filter-gradient ops, on contiguous slices of the batch. The CPU kernels
    of dilated filter gradients support float32 only (Keras reaches them
    through space-to-batch instead), and XLA lowers many small convolutions
    slowly: there the tape builds the kernel's gradient and the norms come
    from einsums over image patches.
    """
    return (kind in ("conv", "depthwise") and layer.kernel.trainable
            and tuple(layer.dilation_rate) == (1, 1)
            and not _in_xla_context())


def _filter_gradient(kind, layer, inputs, output_gradients):
    """The kernel gradient over these examples, as the tape builds it.

    In the layer's compute dtype (float16 under mixed_float16, as the
    backward pass of the convolution computes it), cast to the kernel's.
    """
    options = dict(strides=[1, *layer.strides, 1],
                   padding=layer.padding.upper(),
                   dilations=[1, *layer.dilation_rate, 1])
    backprop = (tf.raw_ops.DepthwiseConv2dNativeBackpropFilter
                if kind == "depthwise" else tf.raw_ops.Conv2DBackpropFilter)
    gradient = backprop(input=inputs, filter_sizes=layer.kernel.shape,
                        out_backprop=output_gradients, **options)
    return tf.cast(gradient, layer.kernel.dtype)


def _kernel_gradient_from_pieces(kind, layer, micro_batches, rest):
    """The kernel gradient and the micro-batches' squared norms of theirs.

    Args:
        micro_batches: `(inputs, output_gradients)` of the layer (output
            gradients of the pass's loss) for each micro-batch.
        rest: the same for the examples in no micro-batch, or None.

    Returns:
        `(gradient, squares)`: the sum of the pieces' gradients (the tape's
        gradient up to rounding) and the `[groups]` squared norms of the
        micro-batches' ones, in the pass's loss scale.
    """
    groups = [_filter_gradient(kind, layer, inputs, output_gradients)
              for inputs, output_gradients in micro_batches]
    squares = tf.reduce_sum(tf.square(tf.stack(groups)), axis=[1, 2, 3, 4])
    if rest is not None:
        groups.append(_filter_gradient(kind, layer, *rest))
    return tf.add_n(groups), squares


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
    `clars_tf.compute_loss_gradients_and_norms`, which records the layers
    during the main forward pass and differentiates the loss with respect to
    their outputs along with the variables. Called directly (as `model.fit`
    with `attach_gradient_norm_estimator` does), it runs one extra forward
    and backward pass over the replica's batch.

    Without batch norm the result equals the loop estimator's up to
    rounding. With batch norm the groups are normalized with the main
    pass's batch statistics instead of their own; see the module docstring.

    Args:
        micro_batch_size: `s`, examples per group (>= 1).
        num_micro_batches: `J`, groups per global step (>= 1).
    """

    records_main_pass = True

    def __init__(self, micro_batch_size=8, num_micro_batches=64):
        super().__init__(micro_batch_size, num_micro_batches)
        self._reported_fallback = False

    @staticmethod
    def recording(model):
        """Context manager recording the model's layers in a forward pass."""
        return recording_layers(model)

    # Plain Python over the layers, no tensor-dependent control flow:
    # autograph has nothing to convert, and converting the helpers from
    # concurrently tracing replica threads has failed (MirroredStrategy).
    @tf.autograph.experimental.do_not_convert
    def __call__(self, model, per_example_loss, x, y, sample_weight=None,
                 loss_scale=None):
        """Estimates from a separate forward and backward pass (no update).

        `loss_scale` as in `GradientNormEstimator.__call__`: the pass's loss
        is multiplied by it, so float16 output gradients underflow only where
        the main pass's would, and the norms are unscaled in float32.
        """
        _, batch = gradient_norms._batch_size(x)
        with tf.GradientTape() as tape:
            with recording_layers(model) as recording:
                with keras.StatelessScope():
                    predictions = model(x, training=True)
            losses = tf.cast(per_example_loss(y, predictions), "float32")
            if sample_weight is not None:
                losses *= tf.cast(sample_weight, "float32")
            loss = tf.reduce_mean(losses)
            if loss_scale is not None:
                loss *= tf.cast(loss_scale, "float32")
        output_gradients = tape.gradient(loss, recording.outputs)
        norms, _ = self.norms_from_pass(
            model, recording, output_gradients, batch, loss_scale,
            per_example_loss, x, y, sample_weight)
        return norms

    @staticmethod
    def _readable_calls(model, recording):
        """`(layer, kind, (inputs, outputs, moments))` of the layers read."""
        for layer in model._flatten_layers(include_self=False):
            calls = recording.calls.get(id(layer), [])
            kind = _kind(layer)
            if kind is None or len(calls) != 1:
                continue
            inputs, _, moments = calls[0]
            if kind == "batch_norm" and (
                    moments is None or layer.axis not in (
                        -1, len(inputs.shape) - 1)):
                continue
            yield layer, kind, calls[0]

    def variables_differentiated(self, model, recording):
        """The variables whose gradients `norms_from_pass` returns.

        Their gradients are sums of the per-group pieces it computes anyway,
        so the caller need not ask the tape for them (inside a
        `tf.function`, the tape's unused filter-gradient ops are pruned).

        Args:
            model: the model whose forward pass was recorded.
            recording: what `recording(model)` recorded.

        Returns:
            The kernels, a list of variables.
        """
        return [layer.kernel
                for layer, kind, _ in self._readable_calls(model, recording)
                if _reads_kernel_gradient(kind, layer)]

    def _cutter(self, static_batch, batch, num_replicas):
        """`cut(tensor) -> (micro_batches, rest)` over the replica's batch.

        The micro-batches (starting where `micro_batch_starts` says) are
        contiguous slices (`tf.split`, no copies); `rest` gathers the
        examples in no micro-batch into one tensor (one filter-gradient op
        over them costs less than one per run between two micro-batches),
        or is None when the static batch size shows there are none.
        """
        count = self.micro_batches_per_replica(num_replicas)
        size = self.micro_batch_size
        if static_batch is None:
            starts = self.micro_batch_starts(batch, num_replicas)
            ends = tf.concat([starts[1:], [batch]], 0)
            sizes = tf.reshape(tf.stack(
                [tf.fill([count], size), ends - starts - size], axis=1), [-1])
            is_group = [True, False] * count
            offsets = tf.range(batch)[:, None] - starts
            in_group = tf.reduce_any((offsets >= 0) & (offsets < size), 1)
            rest = tf.where(tf.logical_not(in_group))[:, 0]
        else:
            sizes, is_group, rest = [], [], []
            for j in range(count):
                start = j * static_batch // count
                end = (j + 1) * static_batch // count
                sizes.append(size)
                is_group.append(True)
                if end > start + size:
                    sizes.append(end - start - size)
                    is_group.append(False)
                    rest.extend(range(start + size, end))
            rest = rest or None

        def cut(tensor):
            parts = tf.split(tensor, sizes, num=len(is_group))
            return ([part for part, group in zip(parts, is_group) if group],
                    None if rest is None else tf.gather(tensor, rest))

        return cut

    @tf.autograph.experimental.do_not_convert
    def norms_from_pass(self, model, recording, output_gradients,
                        global_batch_size, loss_scale, per_example_loss, x,
                        y, sample_weight=None):
        """Norms for every variable, gradients for those it differentiates.

        Args:
            model: the model whose forward pass was recorded.
            recording: what `recording(model)` recorded.
            output_gradients: gradients of the pass's loss with respect to
                `recording.outputs`, in that order.
            global_batch_size: the loss was `sum(losses) / global_batch_size`.
            loss_scale: the factor the loss was multiplied by before
                differentiating (float16 loss scaling), or None.
            per_example_loss: `fn(y_true, y_pred) -> [batch]`, for the loop
                estimator if some variables need it.
            x: the replica's inputs, for the loop estimator.
            y: the replica's targets, for the loop estimator.
            sample_weight: the replica's example weights, or None.

        Returns:
            `(norms, gradients)`: one float32 scalar per
            `model.trainable_variables`, and `{id(variable): gradient of the
            pass's loss}` for `variables_differentiated(model, recording)`
            (None where the loss does not depend on the layer).
        """
        context = tf.distribute.get_replica_context()
        num_replicas = context.num_replicas_in_sync if context else 1
        static_batch, batch = gradient_norms._batch_size(x)
        if static_batch is not None:
            self.check_fits(static_batch, num_replicas)
        starts = self.micro_batch_starts(batch, num_replicas)
        indices = starts[:, None] + tf.range(self.micro_batch_size)
        cut = self._cutter(static_batch, batch, num_replicas)
        # d(group mean loss) = d(main loss) * global_batch / (s * scale).
        factor = tf.cast(global_batch_size, "float32") / float(
            self.micro_batch_size)
        if loss_scale is not None:
            factor /= tf.cast(loss_scale, "float32")

        def groups_of(tensor):
            return tf.gather(tf.cast(tensor, "float32"), indices)

        gradients_of = dict(zip(map(id, recording.outputs), output_gradients))
        squares = {}  # id(variable) -> [groups] squared norms
        gradients = {}
        for layer, kind, (inputs, outputs, moments) in self._readable_calls(
                model, recording):
            dz = gradients_of[id(outputs)]
            connected = dz is not None
            if not connected:
                dz = tf.zeros_like(outputs)
            if _reads_kernel_gradient(kind, layer):
                group_inputs, rest_inputs = cut(inputs)
                group_gradients, rest_gradients = cut(dz)
                gradient, kernel = _kernel_gradient_from_pieces(
                    kind, layer, list(zip(group_inputs, group_gradients)),
                    None if rest_inputs is None
                    else (rest_inputs, rest_gradients))
                gradients[id(layer.kernel)] = gradient if connected else None
                per_name = {"kernel": kernel * tf.square(factor)}
                if layer.bias is not None:
                    per_name["bias"] = _bias_squares(tf.stack([
                        tf.cast(part, "float32") * factor
                        for part in group_gradients]))
            elif kind == "batch_norm":
                per_name = {
                    name: value * tf.square(factor)
                    for name, value in _batch_norm_squares(
                        layer, inputs, dz, moments, indices).items()}
            else:
                group_gradients = groups_of(dz) * factor
                per_name = {"kernel": _kernel_squares_from_patches(
                    kind, layer, groups_of(inputs), group_gradients)}
                if layer.bias is not None:
                    per_name["bias"] = _bias_squares(group_gradients)
            for name, value in per_name.items():
                variable = getattr(layer, name)
                if variable.trainable:
                    squares[id(variable)] = value

        variables = model.trainable_variables
        missing = [i for i, v in enumerate(variables) if id(v) not in squares]
        looped = None
        if missing:
            self._report_fallback([variables[i] for i in missing])
            looped = super().__call__(model, per_example_loss, x, y,
                                      sample_weight, loss_scale=loss_scale)
        norms = []
        for index, variable in enumerate(variables):
            if id(variable) in squares:
                norms.append(tf.reduce_mean(tf.sqrt(squares[id(variable)])))
            else:
                norms.append(looped[index])
        return norms, gradients

    def _report_fallback(self, variables):
        if self._reported_fallback:
            return
        self._reported_fallback = True
        _LOG.warning(
            "One-pass gradient-norm estimator: %d variable(s) of layers it "
            "cannot read (unsupported type, an activation inside the layer, "
            "or called more than once) take their estimate from the loop "
            "estimator: %s", len(variables),
            ", ".join(getattr(v, "path", v.name) for v in variables))
