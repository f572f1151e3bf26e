"""Layer helpers shared by every model.

All convolutions, batch norms, inputs and classifier heads go through these
functions so that options such as `use_sync_bn` behave identically in every
architecture and every layer gets an explicit, deterministic name.
"""

import dataclasses
import numbers

import keras

# Inputs up to this many pixels on each side (CIFAR-sized) get a stride-1
# stem without max-pooling; an ImageNet stem would shrink them to almost
# nothing before the first stage.
SMALL_INPUT_MAX_SIZE = 64
MIN_INPUT_SIZE = 32


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
    """Batch-norm settings applied to every BatchNormalization of a model.

    Args:
        use_sync_bn: Whether to synchronise batch statistics across replicas
            (`keras.layers.BatchNormalization(synchronized=True)`), which
            matters when the per-replica batch is small.
        momentum: Momentum of the moving mean and variance.
        epsilon: Small float added to the variance to avoid dividing by zero.
    """

    use_sync_bn: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5

    def __post_init__(self):
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1), got {self.momentum}.")
        if self.epsilon <= 0.0:
            raise ValueError(f"bn_epsilon must be positive, got {self.epsilon}.")


def model_input(input_shape):
    """Validates `input_shape` and returns the model's `keras.Input`.

    Args:
        input_shape: `(height, width, channels)` of one float image, already
            normalised; height and width must be at least `MIN_INPUT_SIZE`.

    Returns:
        A symbolic `keras.Input` tensor named "input".
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, numbers.Integral) and d > 0 for d in shape):
        raise ValueError(
            "input_shape must be (height, width, channels) with positive "
            f"integers, got {input_shape!r}."
        )
    if min(shape[:2]) < MIN_INPUT_SIZE:
        raise ValueError(
            f"Height and width must be at least {MIN_INPUT_SIZE} pixels, got "
            f"{shape[:2]}; pad or resize smaller images."
        )
    return keras.Input(shape=tuple(int(d) for d in shape), name="input")


def is_small_input(input_shape):
    """Returns whether `input_shape` should use the stride-1 CIFAR-style stem.

    Args:
        input_shape: `(height, width, channels)` of one image.
    """
    return max(input_shape[:2]) <= SMALL_INPUT_MAX_SIZE


def batch_norm(x, bn, name, zero_gamma=False):
    """Applies a BatchNormalization configured by `bn`.

    Args:
        x: Input tensor.
        bn: A `BatchNormConfig`.
        name: Layer name.
        zero_gamma: Initialise gamma to zeros so the layer starts as a
            constant (used to start residual branches at identity).

    Returns:
        The normalised tensor.
    """
    return keras.layers.BatchNormalization(
        momentum=bn.momentum,
        epsilon=bn.epsilon,
        synchronized=bn.use_sync_bn,
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=name,
    )(x)


def conv2d(x, filters, kernel_size, name, strides=1):
    """Applies a bias-free, he_normal-initialised "same" Conv2D.

    The bias is dropped because the BatchNormalization that follows every
    convolution subtracts it again; its beta plays the same role.

    Args:
        x: Input tensor.
        filters: Number of output channels.
        kernel_size: Size of the square kernel.
        name: Layer name.
        strides: Stride in both spatial dimensions.

    Returns:
        The convolved tensor.
    """
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )(x)


def depthwise_conv2d(x, kernel_size, name, strides=1):
    """Applies a bias-free "same" DepthwiseConv2D with He initialisation.

    Args:
        x: Input tensor.
        kernel_size: Size of the square kernel.
        name: Layer name.
        strides: Stride in both spatial dimensions.

    Returns:
        The convolved tensor.
    """
    # The depthwise kernel has shape (k, k, channels, 1); "fan_in" would count
    # every channel, but each output only sees k * k inputs, which is exactly
    # what "fan_out" counts for this shape.
    initializer = keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="truncated_normal"
    )
    return keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        depthwise_initializer=initializer,
        name=name,
    )(x)


def _bn_activation(x, bn, name, activation, zero_gamma):
    x = batch_norm(x, bn, f"{name}_bn", zero_gamma=zero_gamma)
    if activation is None:
        return x
    return keras.layers.Activation(activation, name=f"{name}_{activation}")(x)


def conv_bn(
    x, filters, kernel_size, bn, name, strides=1, activation="relu", zero_gamma=False
):
    """Applies Conv2D -> BatchNormalization -> optional activation.

    Layers are named `{name}_conv`, `{name}_bn` and `{name}_{activation}`.

    Args:
        x: Input tensor.
        filters: Number of output channels.
        kernel_size: Size of the square kernel.
        bn: A `BatchNormConfig`.
        name: Prefix of the layer names.
        strides: Stride of the convolution.
        activation: Name of a Keras activation, or None for none.
        zero_gamma: Initialise the batch-norm gamma to zeros.

    Returns:
        The output tensor.
    """
    x = conv2d(x, filters, kernel_size, f"{name}_conv", strides=strides)
    return _bn_activation(x, bn, name, activation, zero_gamma)


def depthwise_conv_bn(x, kernel_size, bn, name, strides=1, activation="relu6"):
    """Applies DepthwiseConv2D -> BatchNormalization -> optional activation.

    Layers are named `{name}_conv`, `{name}_bn` and `{name}_{activation}`.

    Args:
        x: Input tensor.
        kernel_size: Size of the square kernel.
        bn: A `BatchNormConfig`.
        name: Prefix of the layer names.
        strides: Stride of the convolution.
        activation: Name of a Keras activation, or None for none.

    Returns:
        The output tensor.
    """
    x = depthwise_conv2d(x, kernel_size, f"{name}_conv", strides=strides)
    return _bn_activation(x, bn, name, activation, zero_gamma=False)


def classifier_head(x, num_classes, dropout_rate):
    """Global average pool, optional dropout and a float32 logits layer.

    The Dense layer is at least float32 so that logits (and hence the loss)
    stay in full precision under a mixed-precision policy (float64 under a
    float64 policy, whose gradients all keep one dtype). No softmax is
    applied: losses are expected to use `from_logits=True`.

    Args:
        x: 4D feature map.
        num_classes: Number of output logits.
        dropout_rate: Dropout rate before the classifier; 0 disables it.

    Returns:
        A `(batch, num_classes)` float32 (or float64) tensor of logits.
    """
    if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout_rate > 0:
        x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    full = "float64" if keras.config.dtype_policy().name == "float64" else (
        "float32")
    return keras.layers.Dense(num_classes, dtype=full, name="logits")(x)
