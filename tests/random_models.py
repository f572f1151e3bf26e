"""Random Keras models of the kinds users write, and the right-or-loud check.

A hypothesis strategy draws a plain-data spec (printable, so a failing
example can be rebuilt); `build` turns it into a model in one of four
styles (Sequential, functional, nested, subclassed) from blocks: Conv1D,
Conv2D, DepthwiseConv2D, Dense on rank 2-4, with random strides, padding,
dilation, bias, activation and regularizers; a shared Dense; custom layers
(a residual wrapper, one adding a loss, one convolving with another layer's
kernel, one applying a Dense to [batch * time, features] rows, one with its
own variable). `check` runs one compiled step with the one-pass estimator
and compares it with independent references: the tape's gradients of the
whole loss, and the estimate by definition, each micro-batch in its own
forward and backward pass (what the loop estimator computes).

Used by `tests/test_one_pass_property.py` (a seeded subset) and
`scripts/one_pass_property.py` (500 models and the figure).
"""

import logging

import hypothesis.strategies as st
import keras
import numpy as np
import tensorflow as tf

import clars_tf
from clars_tf import one_pass_norms

CLASSES = 3


def loss_fn(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)


# Specs -------------------------------------------------------------------

_ACTIVATIONS = [None, "relu", "tanh"]


def _regularizer(draw):
    kind = draw(st.sampled_from([None, None, "l1", "l2"]))
    return None if kind is None else (kind, draw(st.sampled_from(
        [1e-3, 0.05, 0.5])))


@st.composite
def _conv2d(draw, size):
    kernel = draw(st.integers(1, 3))
    strides = draw(st.integers(1, 2))
    dilation = 1 if strides > 1 else draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["same", "valid"]))
    if padding == "valid" and size - dilation * (kernel - 1) < 2:
        padding = "same"
    return {"block": "conv2d", "filters": draw(st.integers(1, 4)),
            "kernel": kernel, "strides": strides, "dilation": dilation,
            "padding": padding, "bias": draw(st.booleans()),
            "activation": draw(st.sampled_from(_ACTIVATIONS)),
            "kernel_regularizer": _regularizer(draw),
            "activity_regularizer": _regularizer(draw)}


@st.composite
def _depthwise(draw, size):
    kernel = draw(st.integers(1, 3))
    strides = draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["same", "valid"]))
    if padding == "valid" and size - (kernel - 1) < 2:
        padding = "same"
    return {"block": "depthwise", "kernel": kernel, "strides": strides,
            "padding": padding, "multiplier": draw(st.integers(1, 2)),
            "bias": draw(st.booleans()),
            "activation": draw(st.sampled_from(_ACTIVATIONS)),
            "kernel_regularizer": _regularizer(draw)}


@st.composite
def _conv1d(draw, size):
    kernel = draw(st.integers(1, 3))
    strides = draw(st.integers(1, 2))
    dilation = 1 if strides > 1 else draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["same", "valid", "causal"]))
    if padding == "valid" and size - dilation * (kernel - 1) < 2:
        padding = "same"
    return {"block": "conv1d", "filters": draw(st.integers(1, 4)),
            "kernel": kernel, "strides": strides, "dilation": dilation,
            "padding": padding, "bias": draw(st.booleans()),
            "activation": draw(st.sampled_from(_ACTIVATIONS))}


@st.composite
def _dense(draw):
    return {"block": "dense", "units": draw(st.integers(1, 5)),
            "bias": draw(st.booleans()),
            "activation": draw(st.sampled_from(_ACTIVATIONS)),
            "kernel_regularizer": _regularizer(draw),
            "bias_regularizer": _regularizer(draw),
            "activity_regularizer": _regularizer(draw)}


def _custom(rank):
    """Custom blocks that keep the shape, for inputs of this rank."""
    names = ["residual_dense", "adds_loss", "scale", "shared_dense"]
    if rank == 4:
        names += ["residual_conv", "tied_conv"]
    if rank >= 3:
        names += ["per_row_dense"]
    return st.sampled_from(names).map(lambda name: {"block": name})


def _output_size(size, block):
    if block["padding"] == "valid":
        size -= block.get("dilation", 1) * (block["kernel"] - 1)
    return -(-size // block["strides"])


@st.composite
def model_specs(draw):
    """A random model, its batch and the estimator's micro-batches."""
    rank = draw(st.sampled_from([2, 3, 4, 4]))
    input_size = size = draw(st.integers(4, 8))
    channels = draw(st.integers(1, 3))
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        options = [_dense(), _custom(rank)]
        if rank == 4:
            options += [_conv2d(size), _conv2d(size), _depthwise(size)]
        elif rank == 3:
            options += [_conv1d(size), _conv1d(size)]
        block = draw(st.one_of(options))
        if "strides" in block:
            size = _output_size(size, block)
        blocks.append(block)
    has_custom = any(block["block"] in ("shared_dense", "tied_conv",
                                        "adds_loss", "scale", "residual_dense",
                                        "residual_conv", "per_row_dense")
                     for block in blocks)
    styles = ["functional", "nested", "subclassed"]
    if not has_custom:
        styles.append("sequential")
    batch = draw(st.integers(4, 20))
    micro_batch_size = draw(st.integers(1, 4))
    num_micro_batches = draw(st.integers(
        1, min(4, batch // micro_batch_size)))
    return {
        "rank": rank,
        "input_shape": {2: [channels * 2 + 1], 3: [input_size, channels],
                        4: [input_size, input_size, channels]}[rank],
        "blocks": blocks, "style": draw(st.sampled_from(styles)),
        "batch": batch, "micro_batch_size": micro_batch_size,
        "num_micro_batches": num_micro_batches,
        "loss_scale": draw(st.sampled_from([None, "factor", "optimizer"])),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


# Models ------------------------------------------------------------------

def _regularizer_object(spec):
    if spec is None:
        return None
    kind, value = spec
    return (keras.regularizers.L1 if kind == "l1" else
            keras.regularizers.L2)(value)


class ResidualWrapper(keras.layers.Layer):
    """`x + inner(x)`: a custom layer holding a Dense or a Conv2D."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs):
        return inputs + self.inner(inputs)


class AddsLoss(keras.layers.Layer):
    """Adds a loss on its activations inside `call`."""

    def call(self, inputs):
        self.add_loss(0.05 * keras.ops.mean(keras.ops.square(inputs)))
        return keras.ops.tanh(inputs)


class Scale(keras.layers.Layer):
    """A layer with its own trainable variable (a type the estimator
    does not read)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],),
                                     initializer="ones", name="scale")

    def call(self, inputs):
        return inputs * self.scale


class TiedConv(keras.layers.Layer):
    """Convolves with another Conv2D's kernel (weight tying)."""

    def __init__(self, source, **kwargs):
        super().__init__(**kwargs)
        self.source = source

    def call(self, inputs):
        return keras.ops.conv(inputs, self.source.kernel, padding="same")


class PerRowDense(keras.layers.Layer):
    """A Dense applied to `[batch * positions, features]` rows."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, name=f"{self.name}_rows")

    def call(self, inputs):
        rows = keras.ops.reshape(inputs, (-1, inputs.shape[-1]))
        return keras.ops.reshape(self.dense(rows),
                                 (-1, *inputs.shape[1:-1], self.units))


def _block_function(block, channels, index):
    """`(apply(h) -> h, channels out)` for a block; its layers made once."""
    name = f"b{index}_{block['block']}"
    kind = block["block"]
    if kind == "conv2d":
        layer = keras.layers.Conv2D(
            block["filters"], block["kernel"], strides=block["strides"],
            padding=block["padding"], dilation_rate=block["dilation"],
            use_bias=block["bias"], activation=block["activation"],
            kernel_regularizer=_regularizer_object(
                block["kernel_regularizer"]),
            activity_regularizer=_regularizer_object(
                block["activity_regularizer"]), name=name)
        return layer, block["filters"]
    if kind == "conv1d":
        layer = keras.layers.Conv1D(
            block["filters"], block["kernel"], strides=block["strides"],
            padding=block["padding"], dilation_rate=block["dilation"],
            use_bias=block["bias"], activation=block["activation"],
            name=name)
        return layer, block["filters"]
    if kind == "depthwise":
        layer = keras.layers.DepthwiseConv2D(
            block["kernel"], strides=block["strides"],
            padding=block["padding"], depth_multiplier=block["multiplier"],
            use_bias=block["bias"], activation=block["activation"],
            depthwise_regularizer=_regularizer_object(
                block["kernel_regularizer"]), name=name)
        return layer, channels * block["multiplier"]
    if kind == "dense":
        layer = keras.layers.Dense(
            block["units"], use_bias=block["bias"],
            activation=block["activation"],
            kernel_regularizer=_regularizer_object(
                block["kernel_regularizer"]),
            bias_regularizer=_regularizer_object(block["bias_regularizer"]),
            activity_regularizer=_regularizer_object(
                block["activity_regularizer"]), name=name)
        return layer, block["units"]
    if kind == "residual_dense":
        return ResidualWrapper(keras.layers.Dense(channels, name=f"{name}_in"),
                               name=name), channels
    if kind == "residual_conv":
        return ResidualWrapper(keras.layers.Conv2D(
            channels, 3, padding="same", name=f"{name}_in"),
            name=name), channels
    if kind == "adds_loss":
        return AddsLoss(name=name), channels
    if kind == "scale":
        return Scale(name=name), channels
    if kind == "per_row_dense":
        return PerRowDense(channels + 1, name=name), channels + 1
    if kind == "shared_dense":
        shared = keras.layers.Dense(channels, activation="tanh", name=name)
        return [shared, shared], channels
    if kind == "tied_conv":
        source = keras.layers.Conv2D(channels, 3, padding="same",
                                     name=f"{name}_source")
        return [source, keras.layers.ReLU(), TiedConv(source,
                                                       name=name)], channels
    raise ValueError(kind)


def _layers(spec):
    """The model's layers in call order (a layer twice where shared)."""
    channels = spec["input_shape"][-1]
    ordered = []
    for index, block in enumerate(spec["blocks"]):
        made, channels = _block_function(block, channels, index)
        ordered.extend(made if isinstance(made, list) else [made])
    return ordered + [keras.layers.Flatten(),
                      keras.layers.Dense(CLASSES, name="logits")]


class Subclassed(keras.Model):
    """A subclassed model applying its layers in order."""

    def __init__(self, layers, **kwargs):
        super().__init__(**kwargs)
        self.ordered = layers

    def call(self, inputs):
        h = inputs
        for layer in self.ordered:
            h = layer(h)
        return h


def build(spec):
    """The spec's model, built, with the seed's initial weights."""
    keras.utils.set_random_seed(spec["seed"])
    layers = _layers(spec)
    shape = tuple(spec["input_shape"])
    style = spec["style"]
    if style == "sequential":
        return keras.Sequential([keras.Input(shape), *layers])
    if style == "subclassed":
        model = Subclassed(layers)
        model(np.zeros((1, *shape), "float32"))
        return model
    inputs = keras.Input(shape)
    if style == "nested":
        # The body is a functional model called inside the outer one.
        body_inputs = keras.Input(shape)
        h = body_inputs
        for layer in layers[:-2]:
            h = layer(h)
        body = keras.Model(body_inputs, h, name="body")
        outputs = layers[-1](layers[-2](body(inputs)))
        return keras.Model(inputs, outputs)
    h = inputs
    for layer in layers:
        h = layer(h)
    return keras.Model(inputs, h)


def data(spec):
    rng = np.random.default_rng(spec["seed"])
    x = rng.normal(size=(spec["batch"], *spec["input_shape"]))
    y = rng.integers(0, CLASSES, size=spec["batch"])
    return x.astype("float32"), y.astype("int32")


def _optimizer(spec, model):
    if spec["loss_scale"] is None:
        return None
    if spec["loss_scale"] == "factor":
        optimizer = clars_tf.CLARS(0.1, loss_scale_factor=64.0)
    else:
        optimizer = keras.optimizers.LossScaleOptimizer(
            clars_tf.CLARS(0.1), initial_scale=32.0)
    optimizer.build(model.trainable_variables)
    return optimizer


# The check ---------------------------------------------------------------

class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _close(actual, expected, rtol):
    """Equal to float32 rounding: relative to the tensor's largest entry."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return bool(np.all(np.abs(actual - expected)
                       <= rtol * (np.abs(expected) + scale * 1e-2)))


def loop_estimate(model, x, y, micro_batch_size, num_micro_batches):
    """`a_l` by definition: micro-batch j (from example `j * B // J`) in its
    own forward and backward pass, in a plain Python loop."""
    totals = [0.0] * len(model.trainable_variables)
    for j in range(num_micro_batches):
        start = j * len(x) // num_micro_batches
        xs = x[start:start + micro_batch_size]
        ys = y[start:start + micro_batch_size]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(ys, model(xs, training=True)))
        for index, gradient in enumerate(
                tape.gradient(loss, model.trainable_variables)):
            if gradient is not None:
                totals[index] += np.linalg.norm(
                    np.asarray(gradient, "float64"))
    return [total / num_micro_batches for total in totals]


def check(spec, rtol=1e-4):
    """One compiled one-pass step on the spec's model against references.

    Returns:
        `(outcome, details)`: "right" (every gradient the tape's, every
        estimate the loop's, no warning), "loud" (the same, and a warning
        names the variables taken from the loop) or "wrong" (some number
        differs; details says which).
    """
    model = build(spec)
    x, y = data(spec)
    optimizer = _optimizer(spec, model)
    groups = (spec["micro_batch_size"], spec["num_micro_batches"])
    estimator = clars_tf.OnePassGradientNormEstimator(*groups)
    step = tf.function(lambda x, y: clars_tf.compute_loss_gradients_and_norms(
        model, loss_fn, x, y, global_batch_size=len(x), optimizer=optimizer,
        estimator=estimator))
    logger = logging.getLogger(one_pass_norms.__name__)
    handler = _Warnings()
    logger.addHandler(handler)
    try:
        out = step(tf.constant(x), tf.constant(y))
    finally:
        logger.removeHandler(handler)
    scale = 1.0 if optimizer is None else float(optimizer.scale_loss(1.0))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
        if model.losses:
            loss += tf.add_n(model.losses)
        loss *= scale
    expected_gradients = tape.gradient(loss, model.trainable_variables)
    expected_norms = loop_estimate(model, x, y, *groups)
    wrong = []
    for variable, actual, expected in zip(model.trainable_variables,
                                          out.gradients, expected_gradients):
        if (actual is None) != (expected is None) or (
                expected is not None and not _close(actual, expected, rtol)):
            wrong.append(f"gradient of {variable.path}")
    for variable, actual, expected in zip(model.trainable_variables,
                                          out.gradient_norms, expected_norms):
        if not _close(actual, expected, rtol):
            wrong.append(f"estimate of {variable.path}: {float(actual)!r} "
                         f"vs the loop's {float(expected)!r}")
    if len(handler.messages) > 1:
        wrong.append(f"{len(handler.messages)} warnings, not one")
    if wrong:
        return "wrong", "; ".join(wrong)
    if handler.messages:
        return "loud", handler.messages[0]
    return "right", ""
