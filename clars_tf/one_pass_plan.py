"""Which of a model's layers the one-pass estimator may read, and why not.

Found before any number is read, from the model's forward pass traced once
with an unknown batch size (a "probe": traced, never run). The per-group
norms read off the step's pass equal the loop's only where each example's
pass is its own: a layer is read when it is called once, in the pass's own
graph (not inside a `tf.cond` branch, a loop body, `vectorized_map` or an
RNN's step), on rows that are the examples (its input's and output's
leading axis is the probe's unknown batch axis), with weights that no op
outside that call reads (a kernel tied to another layer adds terms its
call's tensors do not hold), and when nothing on the
way to the model's outputs makes an example's pass depend on the rest of
the batch or on a random draw: an op that takes the batch axis in and
gives none out (a batch statistic of batch normalization, a mean over the
batch, a transpose of the batch axis) or a random op (dropout, noise: the
loop draws new ones for each micro-batch). Either of those reaches every
example's loss, so every variable then takes its estimate from the loop.
"""

import collections

import keras
import tensorflow as tf

from clars_tf import one_pass_recording

# Ops giving metadata of their inputs, not values computed from them.
_SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank",
                        "BroadcastGradientArgs", "VariableShape"})
_RANDOM_OPS = frozenset({"TruncatedNormal", "Multinomial",
                         "StatelessMultinomial", "StatelessTruncatedNormal",
                         "StatelessTruncatedNormalV2", "RandomGamma",
                         "RandomPoisson", "RandomPoissonV2"})
_NOT_VALUES = (tf.resource, tf.variant)


def _batch_axis_first(tensor):
    shape = tensor.shape
    return shape.rank is not None and shape.rank >= 1 and shape[0] is None


def _why_op_couples(op, graph):
    """Why `op` makes an example's pass depend on others or on chance."""
    if "Random" in op.type or op.type in _RANDOM_OPS:
        return (f"`{op.name}` draws random numbers (dropout, noise), which "
                "the loop draws anew for each micro-batch")
    bodies = [graph._get_function(attribute.func.name).graph
              for attribute in op.node_def.attr.values()
              if attribute.HasField("func")]
    if bodies:
        # A call of functions (tf.cond, a loop): what they do is in them;
        # the op's own outputs (a loop counter) say nothing.
        for body in bodies:
            for inner in body.get_operations():
                reason = _why_op_couples(inner, body)
                if reason is not None:
                    return reason
        return None
    if op.type in _SHAPE_OPS:
        return None
    if any(_batch_axis_first(t) for t in op.inputs) and any(
            t.dtype not in _NOT_VALUES and not _batch_axis_first(t)
            for t in op.outputs):
        return (f"`{op.name}` ({op.type}) combines the examples of the "
                "batch (a batch statistic, a mean over the batch, a "
                "transpose of the batch axis), so each example's pass "
                "depends on the others")
    return None


def weights_of(layer):
    """`{name: variable}` of the weights a readable layer's norms are for."""
    return {name: getattr(layer, name) for name in ("kernel", "bias")
            if getattr(layer, name, None) is not None
            and getattr(layer, name).trainable}


def _ancestors(tensors):
    seen, stack = set(), [t.op for t in tensors]
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return seen


Plan = collections.namedtuple("Plan", ["coupling", "layer_reasons"])
Plan.__doc__ = """What the probe found.

`coupling`: why every example's pass depends on the rest of the batch or
on chance, or None. `layer_reasons`: `{id(layer): why it is not read}`."""


def layer_reason(calls, nested_calls, rows):
    """Why a readable layer's calls cannot be read, or None.

    Args:
        calls: the layer's calls in the pass's own graph.
        nested_calls: how many calls ran inside a body of that graph.
        rows: `fn(tensor) -> why its leading axis is not the examples, or
            None`.
    """
    if nested_calls:
        return ("called inside a control-flow body (tf.cond, a while or "
                "fori loop, scan, map, vectorized_map, an RNN's step), "
                "whose tensors the step cannot read")
    if len(calls) > 1:
        return f"called {len(calls)} times in one forward pass"
    for name, tensor in (("input", calls[0].inputs),
                         ("output", calls[0].pre_activation)):
        reason = rows(tensor)
        if reason is not None:
            return f"its {name}'s {reason}"
    return None


def _rows_of_probe(tensor):
    if _batch_axis_first(tensor):
        return None
    rows = tensor.shape[0] if tensor.shape.rank else None
    return (f"leading axis has {rows} rows, not the batch's examples (with "
            "an unknown batch size it is not the batch axis: e.g. a "
            "time-major [time, batch, features] input, or a layer applied "
            "to each example alone)")


def probe(model, x):
    """The `Plan` of the model's forward pass on inputs like `x`.

    Args:
        model: a built Keras model.
        x: inputs of the step (any structure; leading axis the batch).
    """
    specs = tf.nest.map_structure(
        lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), x)
    readable = [layer for layer in model._flatten_layers(include_self=False)
                if one_pass_recording.kind_of(layer)]
    seen = {}

    def forward(inputs):
        # Every read of a weight in the pass returns its one identity, so
        # the identity's consumers are all the ops that use the weight.
        reads = {id(variable): (variable, tf.identity(variable.value))
                 for layer in readable
                 for variable in weights_of(layer).values()}
        with one_pass_recording.recording_layers(model) as recording:
            with keras.StatelessScope(state_mapping=list(reads.values())):
                outputs = model(inputs, training=True)
        seen["recording"], seen["outputs"] = recording, outputs
        seen["reads"] = {key: read for key, (_, read) in reads.items()}
        return outputs

    try:
        graph = tf.function(forward).get_concrete_function(specs).graph
    except Exception as error:  # pylint: disable=broad-except
        reason = (f"its forward pass could not be traced with an unknown "
                  f"batch size ({type(error).__name__}: {error})")
        return Plan(reason, {})
    recording = seen["recording"]
    coupling = None
    ancestors = _ancestors(tf.nest.flatten(seen["outputs"]))
    for op in graph.get_operations():
        if op in ancestors:
            coupling = _why_op_couples(op, graph)
            if coupling is not None:
                break
    reasons = {}
    for layer in readable:
        calls, nested = recording.calls_of(layer)
        if calls or nested:
            reason = (layer_reason(calls, nested, _rows_of_probe)
                      or _read_outside_its_call(layer, calls[0],
                                                seen["reads"]))
            if reason is not None:
                reasons[id(layer)] = reason
    return Plan(coupling, reasons)


def _read_outside_its_call(layer, call, reads):
    """Why an op outside the layer's one call reads one of its weights."""
    inside = (_ancestors(tf.nest.flatten(call.pre_activation))
              - _ancestors(tf.nest.flatten(call.inputs)))
    for name, variable in weights_of(layer).items():
        outside = [op for op in reads[id(variable)].consumers()
                   if op not in inside]
        if outside:
            return (f"its {name} is also read outside its call (by "
                    f"`{outside[0].name}`: a weight tied to another layer "
                    "or used by the model itself), so the call's tensors do "
                    "not hold its whole gradient")
    return None
