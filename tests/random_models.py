"""Random Keras models of the kinds users write, and the right-or-loud check.

A hypothesis strategy draws a plain-data spec (printable, so a failing
example can be rebuilt); `build` turns it into a model in one of four
styles (Sequential, functional, nested, subclassed) from blocks: Conv1D,
Conv2D, DepthwiseConv2D, Dense on rank 2-4, with random strides, padding,
dilation, bias, activation and regularizers; a shared Dense; custom layers
(a residual wrapper, one adding a loss, one convolving with another layer's
kernel, one applying a Dense to [batch * time, features] rows, one with its
own variable); and the families of issue 25: Dense layers inside
`ops.cond` (one branch, both, stochastic depth), `ops.fori_loop` around a
Dense or Conv2D, an RNN with a custom cell of Dense sublayers, a Dense per
example through `ops.map`, `ops.scan` over time and `ops.vectorized_map`,
a Dense on the time-major transpose with T == B, batch-centering `Lambda`,
BatchNormalization, Dropout; losses masked (`ignore_class=0`) and
near-cancelling (pairs of nearly equal examples with opposite losses). `check`
runs one step with the one-pass estimator (`compute_loss_gradients_and_norms`
compiled or eager, or `model.fit`'s step) and compares it with independent
references: the tape's gradients of the whole loss (the invariant: the
step's gradients are those whatever the estimator), and the estimate by
definition, each micro-batch in its own forward and backward pass (what the
loop estimator computes).

Used by `tests/test_one_pass_property.py` (a seeded subset) and
`scripts/one_pass_property.py` (1,000 models and the figure).
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


# Blocks whose layers run inside a control-flow body, or whose outputs
# depend on other examples or on chance (issue 25).
_CONTROL_FLOW = ["cond_one_branch", "cond_both_branches", "stochastic_depth",
                 "fori_dense", "center", "batch_norm", "dropout"]
_SEQUENCE = ["rnn_cell", "map_dense", "scan_dense", "vectorized_dense",
             "time_major_dense"]


def _hard(rank):
    names = list(_CONTROL_FLOW)
    if rank == 3:
        names += _SEQUENCE
    if rank == 4:
        names += ["fori_conv"]
    return st.sampled_from(names).map(lambda name: {"block": name})


# Blocks drawing random numbers: their reference reruns the step's draws.
RANDOM_BLOCKS = ("stochastic_depth", "dropout")


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
        options = [_dense(), _custom(rank), _hard(rank)]
        if rank == 4:
            options += [_conv2d(size), _conv2d(size), _depthwise(size)]
        elif rank == 3:
            options += [_conv1d(size), _conv1d(size)]
        block = draw(st.one_of(options))
        if "strides" in block:
            size = _output_size(size, block)
        blocks.append(block)
    has_custom = any(block["block"] not in (
        "conv2d", "conv1d", "depthwise", "dense", "batch_norm", "dropout")
                     for block in blocks)
    styles = ["functional", "nested", "subclassed"]
    if not has_custom:
        styles.append("sequential")
    batch = draw(st.integers(4, 20))
    micro_batch_size = draw(st.integers(1, 4))
    if any(block["block"] == "batch_norm" for block in blocks):
        micro_batch_size = max(2, micro_batch_size)
    if any(block["block"] == "time_major_dense" for block in blocks):
        batch = input_size  # T == B: a time axis as long as the batch.
        micro_batch_size = min(micro_batch_size, batch // 2)
    num_micro_batches = draw(st.integers(
        1, min(4, batch // micro_batch_size)))
    loss = draw(st.sampled_from(["crossentropy", "crossentropy", "masked",
                                 "cancelling"]))
    if loss == "cancelling":
        # Pairs of nearly equal examples with opposite losses, each pair in
        # one micro-batch of two: their gradients nearly cancel.
        micro_batch_size = 2
        batch = 2 * num_micro_batches * draw(st.integers(1, 3))
    return {
        "rank": rank,
        "input_shape": {2: [channels * 2 + 1], 3: [input_size, channels],
                        4: [input_size, input_size, channels]}[rank],
        "blocks": blocks, "style": draw(st.sampled_from(styles)),
        "batch": batch, "micro_batch_size": micro_batch_size,
        "num_micro_batches": num_micro_batches,
        "loss_scale": draw(st.sampled_from([None, "factor", "optimizer"])),
        # With a random draw the reference reruns the step's draws, which
        # it can for the custom step only.
        "loss": loss, "via": "step" if any(
            block["block"] in RANDOM_BLOCKS for block in blocks) else draw(
            st.sampled_from(["step", "step", "fit"])),
        "eager": draw(st.booleans()),
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


class CondDense(keras.layers.Layer):
    """A Dense inside `ops.cond` on a non-trainable flag (or two Denses,
    one per branch)."""

    def __init__(self, units, both, **kwargs):
        super().__init__(**kwargs)
        self.both = both
        self.first = keras.layers.Dense(units, name=f"{self.name}_first")
        self.second = keras.layers.Dense(units, name=f"{self.name}_second")

    def build(self, input_shape):
        self.flag = self.add_weight(shape=(), initializer="ones",
                                    trainable=False, name="flag")
        # Both branches' layers, though the first call takes one.
        self.first.build(input_shape)
        self.second.build(input_shape)

    def call(self, inputs):
        return keras.ops.cond(
            self.flag > 0.5, lambda: self.first(inputs),
            (lambda: self.second(inputs)) if self.both
            else (lambda: inputs))


class StochasticDepth(keras.layers.Layer):
    """`x + inner(x)`, the residual dropped at random in training."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(units, name=f"{self.name}_inner")
        self.seed = keras.random.SeedGenerator(1)

    def build(self, input_shape):
        self.inner.build(input_shape)

    def call(self, inputs, training=False):
        if not training:
            return inputs + self.inner(inputs)
        keep = keras.random.uniform((), seed=self.seed) < 0.7
        return keras.ops.cond(keep, lambda: inputs + self.inner(inputs),
                              lambda: inputs)


class LoopDense(keras.layers.Layer):
    """`h <- h + 0.5 * inner(h)` twice, in `ops.fori_loop`."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def build(self, input_shape):
        self.inner.build(input_shape)

    def call(self, inputs):
        return keras.ops.fori_loop(
            0, 2, lambda i, h: h + 0.5 * self.inner(h), inputs)


class DenseCell(keras.layers.Layer):
    """An RNN cell holding Dense sublayers."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units
        self.input_dense = keras.layers.Dense(units, name="cell_input")
        self.state_dense = keras.layers.Dense(units, use_bias=False,
                                              name="cell_state")

    def build(self, input_shape):
        self.input_dense.build(input_shape)
        self.state_dense.build((None, self.units))

    def call(self, inputs, states):
        h = keras.ops.tanh(self.input_dense(inputs)
                           + self.state_dense(states[0]))
        return h, [h]


class MapDense(keras.layers.Layer):
    """A Dense applied to each example alone, by `ops.map`, `ops.scan`
    over time, or `ops.vectorized_map`."""

    def __init__(self, units, how, **kwargs):
        super().__init__(**kwargs)
        self.how = how
        self.dense = keras.layers.Dense(units, name=f"{self.name}_inner")

    def build(self, input_shape):
        self.dense.build(input_shape[1:])

    def call(self, inputs):
        if self.how == "map":
            return keras.ops.map(self.dense, inputs)
        if self.how == "vectorized":
            return keras.ops.vectorized_map(self.dense, inputs)
        time_major = keras.ops.transpose(inputs, (1, 0, 2))

        def step(carry, x):
            carry = carry + self.dense(x)
            return carry, carry

        _, outputs = keras.ops.scan(
            step, keras.ops.zeros_like(self.dense(time_major[0])),
            time_major)
        return keras.ops.transpose(outputs, (1, 0, 2))


class TimeMajorDense(keras.layers.Layer):
    """A Dense on the [time, batch, features] transpose of its input."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, name=f"{self.name}_inner")

    def call(self, inputs):
        outputs = self.dense(keras.ops.transpose(inputs, (1, 0, 2)))
        return keras.ops.transpose(outputs, (1, 0, 2))


def _centered(inputs):
    return inputs - keras.ops.mean(inputs, axis=0, keepdims=True)


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
    if kind in ("cond_one_branch", "cond_both_branches"):
        return CondDense(channels, kind == "cond_both_branches",
                         name=name), channels
    if kind == "stochastic_depth":
        return StochasticDepth(channels, name=name), channels
    if kind == "fori_dense":
        return LoopDense(keras.layers.Dense(channels, name=f"{name}_in"),
                         name=name), channels
    if kind == "fori_conv":
        return LoopDense(keras.layers.Conv2D(channels, 3, padding="same",
                                             name=f"{name}_in"),
                         name=name), channels
    if kind == "center":
        return [keras.layers.Dense(channels, name=f"{name}_dense"),
                keras.layers.Lambda(_centered, name=name)], channels
    if kind == "batch_norm":
        return [keras.layers.Dense(channels, name=f"{name}_dense"),
                keras.layers.BatchNormalization(name=name)], channels
    if kind == "dropout":
        return keras.layers.Dropout(0.3, name=name), channels
    if kind == "rnn_cell":
        return keras.layers.RNN(DenseCell(channels + 1), return_sequences=True,
                                name=name), channels + 1
    if kind in ("map_dense", "scan_dense", "vectorized_dense"):
        return MapDense(channels + 1, kind.split("_")[0], name=name), (
            channels + 1)
    if kind == "time_major_dense":
        return TimeMajorDense(channels + 1, name=name), channels + 1
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

    def call(self, inputs, training=None):
        # `training` passed on: without it Keras's fit, run eagerly, calls
        # the model without a training flag, and batch norm normalizes
        # with its moving statistics.
        h = inputs
        for layer in self.ordered:
            h = layer(h, training=training)
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
    if spec.get("loss") == "cancelling":
        x[1::2] = x[0::2] * (1 + 1e-2 * rng.normal(size=x[0::2].shape))
        return x.astype("float32"), np.tile([1.0, -1.0], len(x) // 2).astype(
            "float32")
    return x.astype("float32"), y.astype("int32")


def _signed_logit_sum(y_true, y_pred):
    """`y * sum(logits)`: with y = +-1 on two nearly equal examples, their
    gradients nearly cancel."""
    return y_true * keras.ops.sum(y_pred, axis=-1)


def keras_loss(spec):
    """The spec's loss as given to `compile`."""
    kind = spec.get("loss", "crossentropy")
    if kind == "cancelling":
        return _signed_logit_sum
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=0 if kind == "masked" else None)


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


def _close(actual, expected, rtol, floor=0.0):
    """Equal to float32 rounding: relative to the tensor's largest entry,
    or within `floor` (the rounding of terms that cancel)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return bool(np.all(np.abs(actual - expected)
                       <= rtol * (np.abs(expected) + scale * 1e-2) + floor))


def loop_estimate(model, x, y, micro_batch_size, num_micro_batches,
                  per_example_loss=loss_fn):
    """`a_l` by definition: micro-batch j (from example `j * B // J`) in its
    own forward and backward pass, in a plain Python loop."""
    totals = [0.0] * len(model.trainable_variables)
    for j in range(num_micro_batches):
        start = j * len(x) // num_micro_batches
        xs = x[start:start + micro_batch_size]
        ys = y[start:start + micro_batch_size]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(ys,
                                                   model(xs, training=True)))
        for index, gradient in enumerate(
                tape.gradient(loss, model.trainable_variables)):
            if gradient is not None:
                totals[index] += np.linalg.norm(
                    np.asarray(gradient, "float64"))
    return [total / num_micro_batches for total in totals]


def _random(spec):
    return any(block["block"] in RANDOM_BLOCKS for block in spec["blocks"])


def _state(model):
    return [v.numpy() for v in model.non_trainable_variables]


def _restore(model, state):
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)


def _references(spec, model, x, y, per_example, scale):
    """The tape's gradients of the whole loss and the estimate by
    definition, from the model's current state (random draws included)."""
    groups = (spec["micro_batch_size"], spec["num_micro_batches"])
    with tf.GradientTape() as tape:
        predictions = model(x, training=True)
        loss = tf.reduce_mean(keras_loss(spec)(y, predictions)) if (
            spec.get("via") == "fit") else tf.reduce_mean(
            per_example(y, predictions))
        if model.losses:
            loss += tf.add_n(model.losses)
        loss *= scale
    gradients = tape.gradient(loss, model.trainable_variables)
    if _random(spec):
        # The step's draws: the estimator's loop runs after the step's
        # forward pass, from the state that pass left.
        norms = clars_tf.GradientNormEstimator(*groups)(model, per_example,
                                                        x, y)
    else:
        norms = loop_estimate(model, x, y, *groups, per_example)
    return gradients, norms


def _run_step(spec, model, x, y, optimizer, estimator, per_example):
    """`(gradients or None, norms)` of one step with the estimator."""
    if spec.get("via") != "fit":
        def step(x, y):
            return clars_tf.compute_loss_gradients_and_norms(
                model, per_example, x, y, global_batch_size=len(x),
                optimizer=optimizer, estimator=estimator)

        if not spec.get("eager"):
            step = tf.function(step)
        out = step(tf.constant(x), tf.constant(y))
        return out.gradients, out.gradient_norms
    model.compile(optimizer=optimizer, loss=keras_loss(spec),
                  jit_compile=False, run_eagerly=bool(spec.get("eager")))
    clars_tf.attach_gradient_norm_estimator(model, estimator)
    applied = []
    if spec.get("eager"):
        apply_gradients = optimizer.apply_gradients

        def recording(grads_and_vars):
            grads_and_vars = list(grads_and_vars)
            applied.extend(g for g, _ in grads_and_vars)
            return apply_gradients(grads_and_vars)

        optimizer.apply_gradients = recording
    model.train_on_batch(x, y)
    return (applied or None), list(optimizer.gradient_norm_estimates.numpy())


def check(spec, rtol=1e-4):
    """One one-pass step on the spec's model against references.

    The step is `compute_loss_gradients_and_norms` (compiled or eager) or
    `model.fit`'s step; the references the tape's gradients of the whole
    loss and the estimate by definition.

    Returns:
        `(outcome, details)`: "right" (every gradient the tape's, every
        estimate the loop's, no warning), "loud" (the same, and a warning
        names the variables taken from the loop) or "wrong" (some number
        differs; details says which).
    """
    model = build(spec)
    x, y = data(spec)
    per_example = clars_tf.per_example_loss_of(keras_loss(spec))
    if spec.get("via") == "fit":
        optimizer = clars_tf.CLARS(0.1)
        optimizer.build(model.trainable_variables)
    else:
        optimizer = _optimizer(spec, model)
    groups = (spec["micro_batch_size"], spec["num_micro_batches"])
    estimator = clars_tf.OnePassGradientNormEstimator(*groups)
    scale = 1.0 if optimizer is None else float(optimizer.scale_loss(1.0))
    state = _state(model)
    weights = {id(v): v.numpy() for v in model.trainable_variables}
    expected_gradients, expected_norms = _references(spec, model, x, y,
                                                     per_example, scale)
    _restore(model, state)
    logger = logging.getLogger(one_pass_norms.__name__)
    handler = _Warnings()
    logger.addHandler(handler)
    try:
        gradients, norms = _run_step(spec, model, x, y, optimizer, estimator,
                                     per_example)
    finally:
        logger.removeHandler(handler)
    for variable in model.trainable_variables:
        variable.assign(weights[id(variable)])
    # Rounding floors. A gradient that is zero but for rounding (a bias
    # before batch norm or centering) is compared to 1e-6 of the model's
    # largest; where pairs of examples cancel, to 1e-5 of the gradients and
    # norms without the cancellation (every sign +1).
    uncancelled_gradients, uncancelled_norms = expected_gradients, [
        float(n) for n in expected_norms]
    if spec.get("loss") == "cancelling":
        _restore(model, state)
        uncancelled_gradients, uncancelled_norms = _references(
            spec, model, x, np.abs(y), per_example, scale)
    largest = max([float(np.max(np.abs(g))) for g in uncancelled_gradients
                   if g is not None] + [0.0])
    wrong = []
    for variable, actual, expected, uncancelled in zip(
            model.trainable_variables, gradients or expected_gradients,
            expected_gradients, uncancelled_gradients):
        # A compiled tf.cond gives zeros where eager gives None (the
        # branch not taken): the same gradient.
        actual, expected, uncancelled = (
            np.zeros(variable.shape) if g is None else np.asarray(g)
            for g in (actual, expected, uncancelled))
        floor = max(1e-6 * largest, 1e-5 * float(np.max(np.abs(uncancelled)))
                    if spec.get("loss") == "cancelling" else 0.0)
        if not _close(actual, expected, rtol, floor):
            wrong.append(f"gradient of {variable.path}")
    largest_norm = max(uncancelled_norms + [0.0])
    for variable, actual, expected, uncancelled in zip(
            model.trainable_variables, norms, expected_norms,
            uncancelled_norms):
        floor = max(1e-6 * largest_norm, 1e-5 * uncancelled
                    if spec.get("loss") == "cancelling" else 0.0)
        if not _close(actual, expected, rtol, floor):
            wrong.append(f"estimate of {variable.path}: {float(actual)!r} "
                         f"vs the loop's {float(expected)!r}")
    static = [m for m in handler.messages if "take their estimate" in m]
    checked = [m for m in handler.messages if "are not the sums" in m]
    if len(static) > 1 or len(checked) > 1:
        wrong.append(f"{len(handler.messages)} warnings, not one of each "
                     "kind")
    if wrong:
        return "wrong", "; ".join(wrong)
    if handler.messages:
        return "loud", "\n".join(handler.messages)
    return "right", ""
