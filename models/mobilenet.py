"""MobileNet v1 and v2.

References:
    Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
    Mobile Vision Applications", 2017.
    Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    CVPR 2018.
"""

import keras

from clars_tf.models.layers import BatchNormConfig
from clars_tf.models.layers import classifier_head
from clars_tf.models.layers import conv_bn
from clars_tf.models.layers import depthwise_conv_bn
from clars_tf.models.layers import is_small_input
from clars_tf.models.layers import model_input

# (pointwise filters, depthwise stride) of the 13 separable blocks of v1.
_V1_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
# (expansion t, output channels c, repeats n, first stride s) of v2.
_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_V2_LAST_FILTERS = 1280


def _check_alpha(alpha):
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}.")


def _stem_strides(input_shape):
    return 1 if is_small_input(input_shape) else 2


def _make_divisible(value, divisor=8):
    """Rounds `value` to a multiple of `divisor`, losing at most 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def mobilenet_v1(input_shape, num_classes, alpha=1.0, bn=BatchNormConfig(), dropout_rate=0.0):
    """MobileNet v1 with ReLU6 activations.

    Inputs of at most 64 pixels per side use a stride-1 stem; larger inputs
    use the ImageNet stride-2 stem.

    Args:
        input_shape: `(height, width, channels)` of one normalised image.
        num_classes: Number of output logits.
        alpha: Width multiplier applied to every convolution's filters.
        bn: A `BatchNormConfig` for every batch norm.
        dropout_rate: Dropout rate before the classifier.

    Returns:
        A `keras.Model` named "mobilenet_v1" that outputs float32 logits.
    """
    _check_alpha(alpha)

    def width(filters):
        return max(1, int(filters * alpha))

    inputs = model_input(input_shape)
    x = conv_bn(
        inputs,
        width(32),
        3,
        bn,
        "conv1",
        strides=_stem_strides(input_shape),
        activation="relu6",
    )
    for block, (filters, strides) in enumerate(_V1_BLOCKS, start=1):
        x = depthwise_conv_bn(x, 3, bn, f"block{block}_depthwise", strides=strides)
        x = conv_bn(x, width(filters), 1, bn, f"block{block}_pointwise", activation="relu6")
    outputs = classifier_head(x, num_classes, dropout_rate)
    return keras.Model(inputs, outputs, name="mobilenet_v1")


def _inverted_residual(x, expansion, filters, strides, bn, name):
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = conv_bn(y, expansion * in_channels, 1, bn, f"{name}_expand", activation="relu6")
    y = depthwise_conv_bn(y, 3, bn, f"{name}_depthwise", strides=strides)
    # Linear bottleneck: a ReLU on the narrow projection would destroy
    # information the next block cannot recover.
    y = conv_bn(y, filters, 1, bn, f"{name}_project", activation=None)
    if strides == 1 and in_channels == filters:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilenet_v2(input_shape, num_classes, alpha=1.0, bn=BatchNormConfig(), dropout_rate=0.0):
    """MobileNet v2 with inverted residuals and linear bottlenecks.

    Inputs of at most 64 pixels per side use a stride-1 stem; larger inputs
    use the ImageNet stride-2 stem.

    Args:
        input_shape: `(height, width, channels)` of one normalised image.
        num_classes: Number of output logits.
        alpha: Width multiplier; channel counts are rounded to multiples of
            8, and the last 1280-channel conv only grows for `alpha > 1`.
        bn: A `BatchNormConfig` for every batch norm.
        dropout_rate: Dropout rate before the classifier.

    Returns:
        A `keras.Model` named "mobilenet_v2" that outputs float32 logits.
    """
    _check_alpha(alpha)
    inputs = model_input(input_shape)
    x = conv_bn(
        inputs,
        _make_divisible(32 * alpha),
        3,
        bn,
        "conv1",
        strides=_stem_strides(input_shape),
        activation="relu6",
    )
    block = 0
    for expansion, channels, repeats, first_strides in _V2_STAGES:
        for repeat in range(repeats):
            block += 1
            x = _inverted_residual(
                x,
                expansion,
                _make_divisible(channels * alpha),
                strides=first_strides if repeat == 0 else 1,
                bn=bn,
                name=f"block{block}",
            )
    last_filters = _V2_LAST_FILTERS
    if alpha > 1.0:
        last_filters = _make_divisible(_V2_LAST_FILTERS * alpha)
    x = conv_bn(x, last_filters, 1, bn, "conv_last", activation="relu6")
    outputs = classifier_head(x, num_classes, dropout_rate)
    return keras.Model(inputs, outputs, name="mobilenet_v2")
