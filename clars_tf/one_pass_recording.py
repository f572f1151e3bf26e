"""What the one-pass estimator records of a forward pass, and nothing more.

A recorded layer's call runs unchanged: the hooks only keep the tensors the
estimate is read from (the layer's input and the input of its activation,
the pre-activation) and where the call ran. Nothing the tape differentiates
is replaced, so the step's gradients are the tape's whatever is recorded.
"""

import collections
import contextlib
import threading

import keras
import tensorflow as tf

from clars_tf import layer_patches

_THREAD = threading.local()


def _plain(layer):
    return (not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None)


def kind_of(layer):
    """`"conv"`, `"depthwise"` or `"dense"` for a layer whose weight
    gradients are read off its input and output gradient, else None."""
    kind = type(layer)
    if kind in (keras.layers.Conv1D, keras.layers.Conv2D,
                keras.layers.DepthwiseConv2D):
        if (layer.data_format == "channels_last" and _plain(layer)
                and getattr(layer, "groups", 1) == 1):
            return "depthwise" if kind is keras.layers.DepthwiseConv2D else (
                "conv")
    elif kind is keras.layers.Dense:
        if _plain(layer):
            return "dense"
    return None


Call = collections.namedtuple("Call", ["inputs", "pre_activation"])
Call.__doc__ = """One call of a recorded layer in the pass's own graph.

`pre_activation` is the input of the layer's activation: its gradient is
the bias's, and the kernel's per example."""


def _current_graph():
    """The graph ops are being added to, or None when executing eagerly."""
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


class Recording:
    """One forward pass's layer calls, kept per tracing thread.

    Attributes:
        calls: `{id(layer): [Call]}`, the calls made in the pass's graph.
        nested_calls: `{id(layer): count}` of calls made inside a body
            the pass's graph calls (a `tf.cond` branch, a loop body,
            `vectorized_map`'s function, an RNN's step): their tensors
            belong to that body, not to the pass.
    """

    def __init__(self):
        self.graph = _current_graph()
        self.calls = {}
        self.nested_calls = collections.Counter()
        self._pre_activations = {}

    @property
    def sources(self):
        """The pre-activations, whose gradients the estimate is read from."""
        return [call.pre_activation for calls in self.calls.values()
                for call in calls]

    def calls_of(self, layer):
        """`(calls in the pass's graph, calls inside a nested body)`."""
        return self.calls.get(id(layer), []), self.nested_calls[id(layer)]


def _recording_call(layer, call):
    def recorded(inputs, *args, **kwargs):
        recording = getattr(_THREAD, "recording", None)
        outputs = call(inputs, *args, **kwargs)
        if recording is not None:
            pre_activation = recording._pre_activations.pop(id(layer),
                                                            outputs)
            if _current_graph() is recording.graph:
                recording.calls.setdefault(id(layer), []).append(
                    Call(inputs, pre_activation))
            else:
                recording.nested_calls[id(layer)] += 1
        return outputs

    return recorded


def _recording_activation(layer, activation):
    def recorded(pre_activation):
        recording = getattr(_THREAD, "recording", None)
        if recording is not None:
            recording._pre_activations[id(layer)] = pre_activation
        return activation(pre_activation)

    return recorded


def _recording_hooks(layer):
    hooks = {"call": _recording_call(layer, layer.call)}
    if layer.activation is not None:
        hooks["activation"] = _recording_activation(layer, layer.activation)
    return hooks


@contextlib.contextmanager
def recording_layers(model):
    """Records the calls of the model's readable layers.

    The hooks are instance attributes shared by every thread (replica threads
    of MirroredStrategy trace the same layers concurrently); what they record
    goes to the calling thread's recording only.

    Args:
        model: the Keras model about to be called.

    Yields:
        The `Recording` the forward pass fills in.
    """
    layers = [layer for layer in model._flatten_layers(include_self=False)
              if kind_of(layer)]
    recording = Recording()
    outer = getattr(_THREAD, "recording", None)
    with layer_patches.patched(layers, "one_pass_recording",
                               _recording_hooks):
        _THREAD.recording = recording
        try:
            yield recording
        finally:
            _THREAD.recording = outer
