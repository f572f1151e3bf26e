"""ResNets: ImageNet ResNet-50 (v1.5) and CIFAR-style ResNet-8/20/56.

References:
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    Goyal et al., "Accurate, Large Minibatch SGD", 2017 (zero-init residual).
"""

import keras

from clars_tf.models.layers import BatchNormConfig
from clars_tf.models.layers import classifier_head
from clars_tf.models.layers import conv_bn
from clars_tf.models.layers import is_small_input
from clars_tf.models.layers import model_input

# (bottleneck width, number of blocks) of the four ResNet-50 stages.
_RESNET50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))
_BOTTLENECK_EXPANSION = 4
# Channel widths of the three CIFAR ResNet stages.
_CIFAR_WIDTHS = (16, 32, 64)


def _residual_output(shortcut, residual, name):
    x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def _shortcut(x, filters, strides, bn, name):
    # Projection (1x1 conv + BN) only where the identity cannot be added.
    if strides == 1 and x.shape[-1] == filters:
        return x
    return conv_bn(x, filters, 1, bn, f"{name}_0", strides=strides, activation=None)


def _basic_block(x, filters, strides, bn, zero_init_residual, name):
    shortcut = _shortcut(x, filters, strides, bn, name)
    y = conv_bn(x, filters, 3, bn, f"{name}_1", strides=strides)
    y = conv_bn(
        y, filters, 3, bn, f"{name}_2", activation=None, zero_gamma=zero_init_residual
    )
    return _residual_output(shortcut, y, name)


def _bottleneck_block(x, width, strides, bn, zero_init_residual, name):
    filters = width * _BOTTLENECK_EXPANSION
    shortcut = _shortcut(x, filters, strides, bn, name)
    y = conv_bn(x, width, 1, bn, f"{name}_1")
    # v1.5: downsample in the 3x3 conv rather than the first 1x1, which would
    # discard three quarters of the activations without looking at them.
    y = conv_bn(y, width, 3, bn, f"{name}_2", strides=strides)
    y = conv_bn(
        y, filters, 1, bn, f"{name}_3", activation=None, zero_gamma=zero_init_residual
    )
    return _residual_output(shortcut, y, name)


def resnet50(
    input_shape,
    num_classes,
    zero_init_residual=True,
    bn=BatchNormConfig(),
    dropout_rate=0.0,
):
    """ResNet-50 v1.5.

    Inputs of at most 64 pixels per side use a 3x3 stride-1 stem without
    max-pooling; larger inputs use the ImageNet 7x7/2 stem and 3x3/2 max-pool.

    Args:
        input_shape: `(height, width, channels)` of one normalised image.
        num_classes: Number of output logits.
        zero_init_residual: Initialise the gamma of the last batch norm of
            each residual block to zeros so every block starts as identity.
        bn: A `BatchNormConfig` for every batch norm.
        dropout_rate: Dropout rate before the classifier.

    Returns:
        A `keras.Model` named "resnet50" that outputs float32 logits.
    """
    inputs = model_input(input_shape)
    if is_small_input(input_shape):
        x = conv_bn(inputs, 64, 3, bn, "conv1")
    else:
        x = conv_bn(inputs, 64, 7, bn, "conv1", strides=2)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    for stage, (width, num_blocks) in enumerate(_RESNET50_STAGES):
        for block in range(num_blocks):
            x = _bottleneck_block(
                x,
                width,
                strides=2 if stage > 0 and block == 0 else 1,
                bn=bn,
                zero_init_residual=zero_init_residual,
                name=f"conv{stage + 2}_block{block + 1}",
            )
    outputs = classifier_head(x, num_classes, dropout_rate)
    return keras.Model(inputs, outputs, name="resnet50")


def _cifar_resnet(depth, input_shape, num_classes, zero_init_residual, bn, dropout_rate):
    blocks_per_stage = (depth - 2) // 6
    inputs = model_input(input_shape)
    x = conv_bn(inputs, _CIFAR_WIDTHS[0], 3, bn, "conv1")
    for stage, filters in enumerate(_CIFAR_WIDTHS):
        for block in range(blocks_per_stage):
            x = _basic_block(
                x,
                filters,
                strides=2 if stage > 0 and block == 0 else 1,
                bn=bn,
                zero_init_residual=zero_init_residual,
                name=f"conv{stage + 2}_block{block + 1}",
            )
    outputs = classifier_head(x, num_classes, dropout_rate)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


_CIFAR_DOC = """CIFAR-style ResNet-{depth}: 3 stages of {n} basic blocks, 16/32/64 channels.

    Depth counts the stem, the 6n block convolutions and the classifier
    (6n + 2 with n = {n}). The first block of stages 2 and 3 downsamples with
    stride 2 and uses a 1x1 conv + BN projection shortcut.

    Args:
        input_shape: `(height, width, channels)` of one normalised image.
        num_classes: Number of output logits.
        zero_init_residual: Initialise the gamma of the last batch norm of
            each residual block to zeros so every block starts as identity.
        bn: A `BatchNormConfig` for every batch norm.
        dropout_rate: Dropout rate before the classifier.

    Returns:
        A `keras.Model` named "resnet{depth}" that outputs float32 logits.
    """


def resnet8(
    input_shape, num_classes, zero_init_residual=True, bn=BatchNormConfig(), dropout_rate=0.0
):
    return _cifar_resnet(8, input_shape, num_classes, zero_init_residual, bn, dropout_rate)


resnet8.__doc__ = _CIFAR_DOC.format(depth=8, n=1)


def resnet20(
    input_shape, num_classes, zero_init_residual=True, bn=BatchNormConfig(), dropout_rate=0.0
):
    return _cifar_resnet(20, input_shape, num_classes, zero_init_residual, bn, dropout_rate)


resnet20.__doc__ = _CIFAR_DOC.format(depth=20, n=3)


def resnet56(
    input_shape, num_classes, zero_init_residual=True, bn=BatchNormConfig(), dropout_rate=0.0
):
    return _cifar_resnet(56, input_shape, num_classes, zero_init_residual, bn, dropout_rate)


resnet56.__doc__ = _CIFAR_DOC.format(depth=56, n=9)
