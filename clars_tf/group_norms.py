"""Per-group gradient norms of a layer, from its inputs and output gradients.

For a layer `z = op(x, W) + b` the weight gradient over a set of examples is
a sum over them of terms built from the layer's input `x_i` and output
gradient `dz_i`, so the gradient of a group of s examples is the same sum
restricted to the group:

    kernel:  sum_{i in group} patches(x_i)^T dz_i. For an (undilated)
             convolution, the library's own filter-gradient op on each
             group. Elsewhere (Dense, dilated convolutions, steps compiled
             with XLA) one batched einsum over the inputs (image patches for
             convolutions), or without forming the gradient from the Gram
             matrices of inputs and output gradients ("ghost norm",
             Goodfellow 2015), whichever costs fewer multiplications; the
             Gram form is used only where it is exact to float32 rounding
             (see `_squared_norms_of_products`);
    bias:    sum_{i in group} dz_i.

`decomposes` is the step's check that a variable's gradient is the sum of
these per-example terms over the whole batch (it is not where the variable
is also used outside the recorded call).
"""

import collections

import numpy as np
import tensorflow as tf

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

    def formed():
        gradients = tf.einsum("gnp,gnk->gpk", inputs, output_gradients)
        return tf.reduce_sum(tf.square(gradients), axis=[1, 2])

    if None in (n, p, k) or n * (p + k) >= p * k:
        return formed()
    input_gram = tf.einsum("gnp,gmp->gnm", inputs, inputs)
    gradient_gram = tf.einsum("gnk,gmk->gnm", output_gradients,
                              output_gradients)
    ghost = tf.reduce_sum(input_gram * gradient_gram, axis=[1, 2])
    # The Gram sum's rounding error is up to about n * eps times
    # (sum_n |x_n| |dz_n|)^2, the value the terms reach before they cancel.
    # Where a group's gradient cancels below 1e4 times that (its norm
    # would be off by more than about 1e-4 relative), the step forms the
    # gradients instead, which is exact as the loop's own sums are.
    reach = tf.square(tf.reduce_sum(
        tf.norm(inputs, axis=2) * tf.norm(output_gradients, axis=2), axis=1))
    cancels = ghost < 1e4 * n * np.finfo(np.float32).eps * reach
    return tf.cond(tf.reduce_any(cancels), formed, lambda: ghost)


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


def squares_by_filter_gradients(kind, layer, jit_compile):
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




def layer_squares(kind, layer, inputs, output_gradients, indices, factor,
                  jit_compile):
    """Squared norms of each group's kernel and bias gradients.

    Args:
        kind: `"conv"`, `"depthwise"` or `"dense"`.
        layer: the layer.
        inputs: the layer's input over the replica's batch.
        output_gradients: the gradient of the step's scaled data loss with
            respect to the layer's pre-activation.
        indices: `[groups, s]` examples of each group.
        factor: float32 scalar turning `output_gradients` into the output
            gradients of the groups' mean losses.
        jit_compile: whether the step is compiled with XLA.

    Returns:
        `{"kernel": [groups], "bias": [groups]}` float32 squared norms (no
        "bias" without one).
    """

    def groups_of(tensor):
        """`[groups, s, ...]`: the one way examples are grouped."""
        return tf.gather(tensor, indices)

    group_gradients = tf.cast(groups_of(output_gradients), "float32") * factor
    if kind != "dense":
        inputs, output_gradients = _as_images(layer, inputs, output_gradients)
    if squares_by_filter_gradients(kind, layer, jit_compile):
        kernel = _kernel_squares_from_filter_gradients(
            kind, layer, groups_of(inputs), groups_of(output_gradients)
        ) * tf.square(factor)
    else:
        kernel = _kernel_squares_from_patches(
            kind, layer, tf.cast(groups_of(inputs), "float32"),
            group_gradients)
    squares = {"kernel": kernel}
    if layer.bias is not None:
        squares["bias"] = _bias_squares(group_gradients)
    return squares


def _signs(shape):
    """Fixed +-1 entries of `shape`, the same in every run."""
    size = int(np.prod(shape))
    return tf.constant(np.random.default_rng(size).choice([-1.0, 1.0], size
                                                          ).reshape(shape),
                       "float32")


def check_tolerance(dtype):
    """How far a sum may be off, relative to the bound on its terms, in a
    pass computing in `dtype`."""
    return max(1e-3, 16 * float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype
                                         ).eps))


def _tap(layer, x, output_shape):
    """The inputs the kernel's centre tap meets at each output position,
    `[batch, out_h, out_w, channels]`: a padded, strided slice of `x`."""
    geometry = _geometry(layer)
    begin, strides = [0], [1]
    paddings = [[0, 0]]
    for axis in range(2):
        size, stride = x.shape[1 + axis], geometry.strides[axis]
        kernel, dilation = geometry.kernel_size[axis], geometry.dilations[axis]
        outputs = output_shape[1 + axis]
        before = 0
        if geometry.padding == "SAME":
            total = max((outputs - 1) * stride + (kernel - 1) * dilation + 1
                        - size, 0)
            before = total // 2
            paddings.append([before, total - before])
        else:
            paddings.append([0, 0])
        begin.append((kernel // 2) * dilation)
        strides.append(stride)
    x = tf.pad(x, paddings + [[0, 0]])
    end = [0, *(b + (o - 1) * s + 1 for b, o, s in zip(
        begin[1:], output_shape[1:3], strides[1:])), 0]
    return tf.strided_slice(x, begin + [0], end, strides + [1],
                            begin_mask=0b1001, end_mask=0b1001)


def _kernel_projection(kind, layer, x, dz, kernel_gradient):
    """`(u^T G v, sum over rows of (x_n . u)(dz_n . v), bound)` for fixed
    signs u (over the kernel's inputs) and v (its outputs).

    For a convolution, u is the kernel's centre tap only, so `x_n . u` is
    a strided slice of the input: about one elementwise pass over the
    layer's input and output gradient.
    """
    if kind == "dense":
        rows_x = tf.reshape(x, [-1, x.shape[-1]])
        rows_dz = tf.reshape(dz, [-1, dz.shape[-1]])
        u, v = _signs([x.shape[-1], 1]), _signs([dz.shape[-1], 1])
        projected_x, projected_dz = rows_x @ u, rows_dz @ v
        actual = tf.reduce_sum(kernel_gradient * (u * tf.transpose(v)))
    else:
        x, dz = _as_images(layer, x, dz)
        geometry = _geometry(layer)
        kernel_gradient = tf.reshape(kernel_gradient, geometry.kernel_shape)
        centre = kernel_gradient[geometry.kernel_size[0] // 2,
                                 geometry.kernel_size[1] // 2]
        channels, outputs = geometry.kernel_shape[2], geometry.kernel_shape[3]
        u, v = _signs([channels]), _signs([outputs])
        tap = _tap(layer, x, dz.shape)
        if kind == "depthwise":
            # Per channel: its own outputs, contracted with v.
            projected_x = tap * u
            projected_dz = tf.reduce_sum(tf.reshape(
                dz, tf.concat([tf.shape(dz)[:3], [channels, outputs]], 0))
                * v, axis=-1)
        else:
            projected_x = tf.reduce_sum(tap * u, axis=-1)
            projected_dz = tf.reduce_sum(dz * v, axis=-1)
        actual = tf.reduce_sum(centre * (u[:, None] * v))
    expected = tf.reduce_sum(projected_x * projected_dz)
    return actual, expected, tf.norm(projected_x) * tf.norm(projected_dz)


def decomposes(kind, layer, inputs, output_gradients, kernel_gradient,
               bias_gradient, tolerance):
    """Whether the gradients are the sums of the per-example terms.

    The per-example terms the group norms are read from, summed over the
    batch, must give the variable's gradient (of the data loss). They do not
    when the variable is also used outside the recorded call (weight tying,
    another layer's op on it). Checked on the bias itself and on one
    projection of the kernel gradient onto fixed signs (for convolutions,
    of its centre tap).

    Args:
        kind, layer: as in `layer_squares`.
        inputs, output_gradients: the layer's input and the data loss's
            gradient with respect to its pre-activation.
        kernel_gradient, bias_gradient: the data loss's gradients of the
            layer's kernel and bias (None where not checked).
        tolerance: relative to the bound on the terms (Cauchy-Schwarz), as
            `check_tolerance` gives it.

    Returns:
        A boolean scalar.
    """
    x = tf.cast(inputs, "float32")
    dz = tf.cast(output_gradients, "float32")
    checks = []
    if bias_gradient is not None:
        rows = tf.reshape(dz, [-1, dz.shape[-1]])
        difference = tf.abs(tf.cast(bias_gradient, "float32")
                            - tf.reduce_sum(rows, axis=0))
        checks.append(tf.reduce_all(
            difference <= tolerance * tf.reduce_sum(tf.abs(rows), axis=0)))
    if kernel_gradient is not None:
        actual, expected, bound = _kernel_projection(
            kind, layer, x, dz, tf.cast(kernel_gradient, "float32"))
        checks.append(tf.abs(actual - expected) <= tolerance * bound)
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)
