"""Run-time patches of layer instances, shared by the two estimators.

Both estimators change how some layers behave while a step is traced: the
loop estimator makes synchronized batch norm use each micro-batch's own
statistics, the one-pass estimator records the calls of the layers it reads.
A patch replaces instance attributes; it is installed once however many
threads (MirroredStrategy's replica threads trace concurrently) or nested
uses need it, and removed when the last of them is done. What a patched
attribute does for the thread calling it is up to the patch (thread-local
state), as the attributes are shared by every thread.
"""

import contextlib
import threading

_LOCK = threading.Lock()
# (id(layer), patch name) -> [users, previous instance attributes].
_ACTIVE = {}
_ABSENT = object()


@contextlib.contextmanager
def patched(layers, name, replacements_of):
    """Replaces instance attributes of each layer while the context lasts.

    Args:
        layers: the layers to patch.
        name: names the patch; a layer carries one patch of a name at a
            time, shared by every user until the last one leaves.
        replacements_of: `fn(layer) -> {attribute: value}`, called when a
            layer's patch is installed.

    Yields:
        None.

    Example:

    ```python
    with layer_patches.patched(model.layers, "recording",
                               lambda layer: {"call": recorded(layer)}):
        predictions = model(x, training=True)
    ```
    """
    layers = list(layers)
    with _LOCK:
        for layer in layers:
            entry = _ACTIVE.setdefault((id(layer), name), [0, None])
            if not entry[0]:
                replacements = replacements_of(layer)
                entry[1] = {attribute: layer.__dict__.get(attribute, _ABSENT)
                            for attribute in replacements}
                # Not through Keras's __setattr__: a patch is not state to
                # track.
                for attribute, value in replacements.items():
                    object.__setattr__(layer, attribute, value)
            entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            for layer in layers:
                entry = _ACTIVE[(id(layer), name)]
                entry[0] -= 1
                if not entry[0]:
                    for attribute, value in entry[1].items():
                        if value is _ABSENT:
                            object.__delattr__(layer, attribute)
                        else:
                            object.__setattr__(layer, attribute, value)
                    del _ACTIVE[(id(layer), name)]
