"""Small models without batch norm, where large-batch training needs warmup.

Nothing rescales the activations of these models, so the largest stable
learning rate is set by the curvature at initialisation; warmup lets the
rate rise while the curvature falls. The first two follow the small
warmup experiments of the CLARS authors (MNIST, their
`main_mnist_warmup.py`); the third is a plain ReLU CNN of VGG shape.

* `sigmoid_mlp`: flattened image -> four sigmoid layers of 200 units ->
  logits; weights drawn from N(0, 2 / fan_in) (Kaiming normal, untruncated)
  and biases from N(0, 1), as the authors draw them. The N(0, 1) biases
  push many sigmoids towards saturation from the first step.
* `sigmoid_cnn`: five sigmoid convolutions of 20 channels taking a 28-pixel
  image down to 1x1 (4x4 stride 2, 5x5, 5x5, 3x3, then a 3x3 convolution
  whose 10 channels are the logits), no dense layer; PyTorch's default
  initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
* `plain_cnn`: six 3x3 ReLU convolutions of 32, 32, 64, 64, 128 and 128
  channels, stride 2 in every second, a 256-unit ReLU dense layer and the
  logits; He-normal weights, zero biases.
"""

import math
import numbers

import keras

from clars_tf.models.layers import BatchNormConfig

MLP_WIDTH = 200
MLP_HIDDEN_LAYERS = 4
# (kernel size, stride, channels) of the sigmoid CNN: 28 -> 13 -> 9 -> 5 ->
# 3 -> 1 pixels.
SIGMOID_CNN_LAYERS = ((4, 2, 20), (5, 1, 20), (5, 1, 20), (3, 1, 20))
SIGMOID_CNN_INPUT_SIZE = 28
PLAIN_CNN_CHANNELS = (32, 32, 64, 64, 128, 128)
PLAIN_CNN_DENSE_UNITS = 256


def _check_no_batch_norm(name, bn):
    if bn != BatchNormConfig():
        raise ValueError(
            f"{name} has no batch normalization, so the batch-norm options "
            f"(use_sync_bn, bn_momentum, bn_epsilon) do not apply; got {bn}. "
            "Leave them at their defaults.")


def _input(input_shape, min_size):
    """The model's `keras.Input`, for images of at least `min_size` pixels.

    (`layers.model_input` requires 32 pixels, which these models, made for
    28-pixel images, do not need.)
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(
            isinstance(d, numbers.Integral) and d > 0 for d in shape):
        raise ValueError("input_shape must be (height, width, channels) with "
                         f"positive integers, got {input_shape!r}.")
    if min(shape[:2]) < min_size:
        raise ValueError(f"Height and width must be at least {min_size} "
                         f"pixels here, got {shape[:2]}.")
    return keras.Input(shape=tuple(int(d) for d in shape), name="input")


def _logits_dtype():
    """float32 logits under mixed precision (float64 under float64)."""
    return "float64" if keras.config.dtype_policy().name == "float64" else (
        "float32")


def _torch_default_uniform(fan_in):
    limit = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-limit, limit)


def sigmoid_mlp(input_shape, num_classes, hidden_layers=MLP_HIDDEN_LAYERS,
                bn=BatchNormConfig()):
    """Builds the 784-200-200-200-200-10 sigmoid MLP (for 28x28x1 inputs).

    Args:
        input_shape: `(height, width, channels)` of one normalised image; it
            is flattened, so 28x28x1 gives 784 inputs.
        num_classes: Number of output logits.
        hidden_layers: Sigmoid layers of 200 units (the authors' 4).
        bn: Must be the default `BatchNormConfig` (the model has none).

    Returns:
        A `keras.Model` named "sigmoid_mlp".
    """
    _check_no_batch_norm("sigmoid_mlp", bn)
    if (not isinstance(hidden_layers, int) or isinstance(hidden_layers, bool)
            or hidden_layers < 1):
        raise ValueError("hidden_layers must be a positive integer, got "
                         f"{hidden_layers!r}.")
    inputs = _input(input_shape, 1)
    x = keras.layers.Flatten(name="flatten")(inputs)
    for index in range(1, hidden_layers + 1):
        x = keras.layers.Dense(
            MLP_WIDTH, activation="sigmoid",
            kernel_initializer=keras.initializers.VarianceScaling(
                2.0, "fan_in", "untruncated_normal"),
            bias_initializer=keras.initializers.RandomNormal(0.0, 1.0),
            name=f"dense{index}")(x)
    outputs = keras.layers.Dense(
        num_classes, dtype=_logits_dtype(),
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, "fan_in", "untruncated_normal"),
        bias_initializer=keras.initializers.RandomNormal(0.0, 1.0),
        name="logits")(x)
    return keras.Model(inputs, outputs, name="sigmoid_mlp")


def sigmoid_cnn(input_shape, num_classes, bn=BatchNormConfig()):
    """Builds the five-convolution sigmoid CNN (28x28 inputs only).

    Args:
        input_shape: `(28, 28, channels)`.
        num_classes: Number of output logits (channels of the last
            convolution).
        bn: Must be the default `BatchNormConfig` (the model has none).

    Returns:
        A `keras.Model` named "sigmoid_cnn".
    """
    _check_no_batch_norm("sigmoid_cnn", bn)
    if tuple(input_shape)[:2] != (SIGMOID_CNN_INPUT_SIZE,) * 2:
        raise ValueError(
            "sigmoid_cnn takes 28x28 images (its convolutions reduce 28 "
            f"pixels to exactly 1), got {tuple(input_shape)[:2]}; set "
            "task.image_size=28.")
    inputs = _input(input_shape, SIGMOID_CNN_INPUT_SIZE)
    x, channels = inputs, input_shape[-1]
    layers = SIGMOID_CNN_LAYERS + ((3, 1, num_classes),)
    for index, (size, stride, filters) in enumerate(layers, start=1):
        initializer = _torch_default_uniform(size * size * channels)
        last = index == len(layers)
        x = keras.layers.Conv2D(
            filters, size, stride, activation=None if last else "sigmoid",
            kernel_initializer=initializer, bias_initializer=initializer,
            dtype=_logits_dtype() if last else None, name=f"conv{index}")(x)
        channels = filters
    outputs = keras.layers.Flatten(dtype=_logits_dtype(), name="logits")(x)
    return keras.Model(inputs, outputs, name="sigmoid_cnn")


def plain_cnn(input_shape, num_classes, bn=BatchNormConfig()):
    """Builds the plain ReLU CNN without batch norm.

    Args:
        input_shape: `(height, width, channels)`, at least 8 pixels a side
            (three stride-2 convolutions).
        num_classes: Number of output logits.
        bn: Must be the default `BatchNormConfig` (the model has none).

    Returns:
        A `keras.Model` named "plain_cnn".
    """
    _check_no_batch_norm("plain_cnn", bn)
    inputs = _input(input_shape, 8)
    x = inputs
    for index, filters in enumerate(PLAIN_CNN_CHANNELS, start=1):
        x = keras.layers.Conv2D(
            filters, 3, 2 if index % 2 == 0 else 1, padding="same",
            activation="relu", kernel_initializer="he_normal",
            name=f"conv{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(PLAIN_CNN_DENSE_UNITS, activation="relu",
                           kernel_initializer="he_normal", name="dense")(x)
    outputs = keras.layers.Dense(num_classes, dtype=_logits_dtype(),
                                 name="logits")(x)
    return keras.Model(inputs, outputs, name="plain_cnn")
