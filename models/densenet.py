"""DenseNet-121 (DenseNet-BC).

Reference:
    Huang et al., "Densely Connected Convolutional Networks", CVPR 2017.
"""

import keras

from clars_tf.models.layers import BatchNormConfig
from clars_tf.models.layers import batch_norm
from clars_tf.models.layers import classifier_head
from clars_tf.models.layers import conv2d
from clars_tf.models.layers import is_small_input
from clars_tf.models.layers import model_input

_DENSENET121_BLOCKS = (6, 12, 24, 16)
_GROWTH_RATE = 32
_COMPRESSION = 0.5
# Bottleneck 1x1 convs produce this many multiples of the growth rate.
_BOTTLENECK_WIDTH = 4
_STEM_FILTERS = 2 * _GROWTH_RATE


def _bn_relu(x, bn, name):
    x = batch_norm(x, bn, f"{name}_bn")
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def _dense_layer(x, bn, name):
    # Pre-activation (BN-ReLU-conv) so each layer normalises the whole
    # concatenation it receives.
    y = _bn_relu(x, bn, f"{name}_0")
    y = conv2d(y, _BOTTLENECK_WIDTH * _GROWTH_RATE, 1, f"{name}_1_conv")
    y = _bn_relu(y, bn, f"{name}_1")
    y = conv2d(y, _GROWTH_RATE, 3, f"{name}_2_conv")
    return keras.layers.Concatenate(name=f"{name}_concat")([x, y])


def _transition(x, bn, name):
    x = _bn_relu(x, bn, name)
    x = conv2d(x, int(x.shape[-1] * _COMPRESSION), 1, f"{name}_conv")
    return keras.layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def densenet121(input_shape, num_classes, bn=BatchNormConfig(), dropout_rate=0.0):
    """DenseNet-121: growth rate 32, blocks 6/12/24/16, compression 0.5.

    Inputs of at most 64 pixels per side use a 3x3 stride-1 stem without
    max-pooling; larger inputs use the ImageNet 7x7/2 stem and 3x3/2 max-pool.

    Args:
        input_shape: `(height, width, channels)` of one normalised image.
        num_classes: Number of output logits.
        bn: A `BatchNormConfig` for every batch norm.
        dropout_rate: Dropout rate before the classifier.

    Returns:
        A `keras.Model` named "densenet121" that outputs float32 logits.
    """
    inputs = model_input(input_shape)
    if is_small_input(input_shape):
        x = conv2d(inputs, _STEM_FILTERS, 3, "conv1_conv")
        x = _bn_relu(x, bn, "conv1")
    else:
        x = conv2d(inputs, _STEM_FILTERS, 7, "conv1_conv", strides=2)
        x = _bn_relu(x, bn, "conv1")
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    for stage, num_layers in enumerate(_DENSENET121_BLOCKS):
        for layer in range(num_layers):
            x = _dense_layer(x, bn, f"conv{stage + 2}_block{layer + 1}")
        if stage < len(_DENSENET121_BLOCKS) - 1:
            x = _transition(x, bn, f"pool{stage + 2}")
    # The dense layers are pre-activated, so the last concatenation has not
    # been normalised yet.
    x = _bn_relu(x, bn, "final")
    outputs = classifier_head(x, num_classes, dropout_rate)
    return keras.Model(inputs, outputs, name="densenet121")
