"""Image classification models built with the Keras functional API.

Every model takes normalised float images of any channel count and of any
size of at least 32x32 (`min_input_size`: smaller for the models without
batch norm, made for 28x28 Fashion-MNIST; `sigmoid_cnn` takes 28x28 only),
and outputs float32 logits (no softmax). Layer names are deterministic, so
two builds with the same arguments have identical variable paths and
checkpoints are interchangeable.

Example:

    model = build_model("resnet20", (32, 32, 3), 10, use_sync_bn=True)
"""

import difflib
import inspect

from clars_tf.models import densenet
from clars_tf.models import mobilenet
from clars_tf.models import no_norm
from clars_tf.models import resnet
from clars_tf.models import small_cnn
from clars_tf.models.layers import MIN_INPUT_SIZE
from clars_tf.models.layers import BatchNormConfig

_BUILDERS = {
    "resnet8": resnet.resnet8,
    "resnet20": resnet.resnet20,
    "resnet56": resnet.resnet56,
    "resnet50": resnet.resnet50,
    "densenet121": densenet.densenet121,
    "mobilenet_v1": mobilenet.mobilenet_v1,
    "mobilenet_v2": mobilenet.mobilenet_v2,
    "small_cnn": small_cnn.small_cnn,
    "sigmoid_mlp": no_norm.sigmoid_mlp,
    "sigmoid_cnn": no_norm.sigmoid_cnn,
    "plain_cnn": no_norm.plain_cnn,
}
# Smallest input side per model (default 32); the models without batch
# norm are made for 28-pixel Fashion-MNIST.
_MIN_INPUT_SIZES = {"sigmoid_mlp": 1, "sigmoid_cnn": 28, "plain_cnn": 8}
# Models without batch normalization: one-example micro-batches are fine.
WITHOUT_BATCH_NORM = ("sigmoid_mlp", "sigmoid_cnn", "plain_cnn")
MODEL_NAMES = tuple(_BUILDERS)

# Options accepted by every model, mapped to `BatchNormConfig` fields.
_BN_OPTIONS = {
    "use_sync_bn": "use_sync_bn",
    "bn_momentum": "momentum",
    "bn_epsilon": "epsilon",
}
# Builder parameters that are not user options: positional arguments, and
# `bn`, which is assembled from `_BN_OPTIONS`.
_NOT_OPTIONS = ("input_shape", "num_classes", "bn")


def min_input_size(name):
    """Returns the smallest image side `name` accepts (32 unless smaller).

    Args:
        name: One of `MODEL_NAMES`.
    """
    _get_builder(name)
    return _MIN_INPUT_SIZES.get(name, MIN_INPUT_SIZE)


def model_options(name):
    """Returns the sorted option names that `build_model` accepts for `name`.

    Args:
        name: One of `MODEL_NAMES`.
    """
    parameters = inspect.signature(_get_builder(name)).parameters
    specific = [p for p in parameters if p not in _NOT_OPTIONS]
    return tuple(sorted([*_BN_OPTIONS, *specific]))


def build_model(name, input_shape, num_classes, **options):
    """Builds a fresh, randomly initialised model.

    Args:
        name: One of `MODEL_NAMES`.
        input_shape: `(height, width, channels)` of one normalised float
            image; height and width must be at least
            `min_input_size(name)` (32 for the models with batch norm).
            Inputs of at most 64 pixels per side get a stride-1 stem
            without max-pooling.
        num_classes: Number of output logits.
        **options: Model options (see `model_options(name)`). Every model
            accepts `use_sync_bn` (default False), `bn_momentum` (0.9) and
            `bn_epsilon` (1e-5), which the models without batch norm
            (`WITHOUT_BATCH_NORM`) refuse to change; those with batch norm
            accept `dropout_rate` (0.0, dropout before the classifier). ResNets accept `zero_init_residual` (True) and
            MobileNets accept the width multiplier `alpha` (1.0).

    Returns:
        A `keras.Model` mapping `(batch, *input_shape)` images to
        `(batch, num_classes)` float32 logits.

    Raises:
        ValueError: If `name` or an option is unknown, or an argument is
            out of range.
    """
    builder = _get_builder(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} for model "
            f"{name!r}. Valid options: {', '.join(valid)}."
        )
    bn = BatchNormConfig(
        **{field: options.pop(key) for key, field in _BN_OPTIONS.items() if key in options}
    )
    return builder(input_shape, num_classes, bn=bn, **options)


def _get_builder(name):
    if name in _BUILDERS:
        return _BUILDERS[name]
    message = f"Unknown model {name!r}. Valid models: {', '.join(MODEL_NAMES)}."
    # Lower-case first so that e.g. "ResNet50" still finds its match.
    close = difflib.get_close_matches(str(name).lower(), MODEL_NAMES, n=1)
    if close:
        message += f" Did you mean {close[0]!r}?"
    raise ValueError(message)
