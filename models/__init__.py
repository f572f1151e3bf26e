"""Image classification models built with the Keras functional API.

Every model takes normalised float images of any size of at least 32x32 and
any channel count, and outputs float32 logits (no softmax). Layer names are
deterministic, so two builds with the same arguments have identical variable
paths and checkpoints are interchangeable.

Example:

    model = build_model("resnet20", (32, 32, 3), 10, use_sync_bn=True)
"""

import difflib
import inspect

from clars_tf.models import densenet
from clars_tf.models import mobilenet
from clars_tf.models import resnet
from clars_tf.models import small_cnn
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
}
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
            image; height and width must be at least 32. Inputs of at most
            64 pixels per side get a stride-1 stem without max-pooling.
        num_classes: Number of output logits.
        **options: Model options (see `model_options(name)`). Every model
            accepts `use_sync_bn` (default False), `bn_momentum` (0.9),
            `bn_epsilon` (1e-5) and `dropout_rate` (0.0, dropout before the
            classifier). ResNets accept `zero_init_residual` (True) and
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
