"""The gradient-norm estimate CLARS divides by (spec step 1).

`a_l = (1/J) * sum_j ||grad_l of the mean loss over micro-batch S_j||`, with
J micro-batches of s examples taken from the step's own data, computed in
training mode (batch-norm statistics over the micro-batch) with the model's
state left untouched and no regularization term.
"""

import collections
import contextlib
import copy
import itertools
import threading

import keras
import tensorflow as tf

from clars_tf import layer_patches
from clars_tf import layerwise

MICRO_BATCH_OF_ONE_WITH_BATCH_NORM = (
    "`micro_batch_size=1` on a model with batch normalization: in training "
    "mode one example is normalized by its own statistics, so its "
    "gradients (and the estimate) collapse to about zero. Use "
    "micro_batch_size >= 2 (the reference uses 8).")


class _SynchronizedExceptWhileEstimating:
    """Stands in for `BatchNormalization.synchronized` while estimating.

    Truthy in every thread except those tracing the estimator: replica
    threads of MirroredStrategy trace concurrently, and one replica's
    estimator must not turn off synchronization in another's main pass.
    """

    def __init__(self):
        self._local = threading.local()

    def __bool__(self):
        return not getattr(self._local, "estimating", False)

    def set_estimating(self, value):
        self._local.estimating = value


_SWITCH = _SynchronizedExceptWhileEstimating()


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


@contextlib.contextmanager
def _local_batch_norm_statistics(model):
    """Makes synchronized batch norm use micro-batch statistics while tracing.

    A micro-batch lives on one replica; the spec takes batch-norm statistics
    over that micro-batch alone, so cross-replica synchronization would make
    the estimate depend on the number of replicas.
    """
    layers = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if getattr(layer, "synchronized", False) is not False
    ]
    with layer_patches.patched(layers, "local_batch_norm_statistics",
                               lambda layer: {"synchronized": _SWITCH}):
        _SWITCH.set_estimating(True)
        try:
            yield
        finally:
            _SWITCH.set_estimating(False)


def _has_batch_normalization(model):
    return any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in model._flatten_layers(include_self=False))


def _runs_a_while_loop(model, x):
    """Whether the model's forward pass on inputs like `x` runs a while
    loop (an RNN's step, `scan`, `map`, `fori_loop`), at any depth of
    nesting. pfor vectorizes such a loop when tracing but can fail when it
    runs, on the tensor lists the loop carries. Also True where the pass
    cannot be traced with an unknown batch size.
    """
    specs = tf.nest.map_structure(
        lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), x)

    def forward(inputs):
        with keras.StatelessScope():
            return model(inputs, training=True)

    try:
        definition = tf.function(forward).get_concrete_function(
            specs).graph.as_graph_def()
    except Exception:  # pylint: disable=broad-except
        return True
    nodes = itertools.chain(definition.node, *(
        function.node_def for function in definition.library.function))
    return any(node.op in ("While", "StatelessWhile") for node in nodes)


def batch_size(structure):
    """`(static, dynamic)` batch size of a structure of tensors: the
    leading axis of its first tensor (None / a scalar int32 tensor)."""
    first = tf.nest.flatten(structure)[0]
    static = first.shape[0]
    return static, tf.shape(first)[0]


class StepPass(collections.namedtuple(
        "StepPass",
        ["per_example_loss", "x", "y", "sample_weight", "loss_scale",
         "loss_weight", "variable_gradients", "source_gradients",
         "jit_compile"])):
    """What a training step hands an estimator after its backward pass.

    Attributes:
        per_example_loss: `fn(y_true, y_pred) -> [batch]`.
        x, y, sample_weight: this replica's part of the step's batch.
        loss_scale: the factor the step's loss was multiplied by (float16
            loss scaling, `loss_scale_factor`), a float32 scalar, or None.
        loss_weight: the step's data loss (unscaled) divided by the sum of
            this replica's weighted per-example losses: `1 / global batch`
            for the mean over the global batch, `1 / valid examples` for a
            masked mean (`ignore_class`), a float32 scalar.
        variable_gradients: the gradients of the step's scaled data loss
            (regularization losses left out), one per
            `model.trainable_variables` (None where it does not depend on
            the variable).
        source_gradients: the same loss's gradients with respect to the
            observation's `sources`.
        jit_compile: whether the step is compiled with XLA.
    """

    __slots__ = ()


class _NothingObserved:
    """The observation of an estimator that reads nothing off the pass."""

    sources = ()


class NormEstimator:
    """The interface of an estimator of `a_l` (spec step 1).

    Two implementations: `GradientNormEstimator` (the loop, the reference)
    and `clars_tf.OnePassGradientNormEstimator` (read off the training
    step's own pass). A training step uses either the same way: it runs
    the forward pass inside `observe(model)`, takes the gradients of its
    own loss with respect to the variables and the observation's `sources` in one
    backward pass, applies those gradients to the variables whatever the
    estimator, and asks `estimate` for the norms only. Called directly, an
    estimator runs passes of its own.

    Micro-batch j of a global batch of B examples starts at example
    `floor(j * B / J)`. Under a `tf.distribute` strategy each replica takes
    `J / replicas` micro-batches (at least one) from its own part of the
    global batch; as the global batch is split into contiguous per-replica
    parts (what `tf.distribute` does), the examples used are the same for
    any replica count that divides J, whether or not J divides B. The
    estimate returned is this replica's mean; CLARS averages it across
    replicas when it is assigned.

    Args:
        micro_batch_size: `s`, examples per micro-batch (>= 1).
        num_micro_batches: `J`, micro-batches per global step (>= 1).
        refresh_every: recompute the estimate every this many steps and
            reuse the stored one in between (>= 1; 1 is the reference).

    Attributes:
        jit_compile: whether the steps it estimates in are compiled with
            XLA, for an estimator whose work depends on it.
    """

    jit_compile = False

    def __init__(self, micro_batch_size=8, num_micro_batches=64,
                 refresh_every=1):
        _check_positive_int("micro_batch_size", micro_batch_size)
        _check_positive_int("num_micro_batches", num_micro_batches)
        _check_positive_int("refresh_every", refresh_every)
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = num_micro_batches
        self.refresh_every = refresh_every

    def every_step(self):
        """This estimator refreshing on every step (`refresh_every=1`).

        Returns:
            A shallow copy with `refresh_every=1`; this one is unchanged.
        """
        fresh = copy.copy(self)
        fresh.refresh_every = 1
        return fresh

    def observe(self, model):
        """Context manager around the step's forward pass.

        Args:
            model: the model about to be called.

        Returns:
            A context manager whose value, an observation, has `sources`:
            after the pass, the tensors of the pass whose gradients the
            estimator needs (the step asks the tape for them along with the
            variables', in the same backward pass); empty for an estimator
            that reads nothing off the pass.
        """
        del model
        return contextlib.nullcontext(_NothingObserved())

    def estimate(self, model, observation, step):
        """`a_l` of every trainable variable, for the observed step.

        Args:
            model: the model of the step.
            observation: what `observe` gave for the step's forward pass.
            step: a `StepPass`.

        Returns:
            One float32 scalar per `model.trainable_variables`.
        """
        raise NotImplementedError

    def __call__(self, model, per_example_loss, x, y, sample_weight=None,
                 loss_scale=None, variables=None):
        """`a_l` from passes of the estimator's own (no update).

        Args:
            model: a built Keras model.
            per_example_loss: `fn(y_true, y_pred) -> [batch]` losses.
            x, y, sample_weight: this replica's part of the step's batch.
            loss_scale: the factor the step's main loss is multiplied by
                (`LossScaleOptimizer.dynamic_scale` under `mixed_float16`),
                or None: the passes' losses are weighted as the step's, so
                their float16 gradients underflow or overflow only where
                the step's would, and the norms are unscaled in float32.
            variables: the variables to estimate, by default
                `model.trainable_variables`.

        Returns:
            A list of float32 scalars, `a_l` of each of `variables` on this
            replica.
        """
        raise NotImplementedError

    def micro_batches_per_replica(self, num_replicas):
        """J / replicas, or 1 when there are more replicas than J.

        Args:
            num_replicas: replicas in sync.

        Returns:
            The number of micro-batches each replica takes, an int.
        """
        if num_replicas >= self.num_micro_batches:
            return 1
        if self.num_micro_batches % num_replicas:
            raise ValueError(
                f"`num_micro_batches` ({self.num_micro_batches}) must be a "
                f"multiple of the number of replicas ({num_replicas}) so every "
                "replica does the same share; pick e.g. "
                f"{num_replicas * max(1, self.num_micro_batches // num_replicas)}."
            )
        return self.num_micro_batches // num_replicas

    def check_fits(self, per_replica_batch_size, num_replicas):
        """Raises ValueError if the micro-batches don't fit a replica's batch.

        Args:
            per_replica_batch_size: examples each replica gets per step.
            num_replicas: replicas in sync.
        """
        count = self.micro_batches_per_replica(num_replicas)
        needed = count * self.micro_batch_size
        if per_replica_batch_size < needed:
            raise ValueError(
                f"The estimator needs {count} micro-batches of "
                f"{self.micro_batch_size} examples per replica ({needed}), but "
                f"the per-replica batch is {per_replica_batch_size}. Lower "
                "`num_micro_batches` or `micro_batch_size`, or raise the "
                "global batch size."
            )

    def micro_batch_indices(self, batch, num_replicas):
        """The examples of each of this replica's micro-batches.

        Micro-batch j holds the s examples from `floor(j * B / J)` of the
        global batch, seen from this replica's contiguous part: the same
        examples for any replica count that divides J. The one grouping of
        examples both estimators use (the loop gathers each micro-batch,
        the one-pass estimator all groups at once).

        Args:
            batch: this replica's batch size, a scalar int tensor.
            num_replicas: replicas in sync.

        Returns:
            An int32 tensor of shape `[count, micro_batch_size]`.
        """
        count = self.micro_batches_per_replica(num_replicas)
        starts = tf.range(count) * batch // count
        return starts[:, None] + tf.range(self.micro_batch_size)

    def check_batch(self, x, num_replicas):
        """Checks that the micro-batches fit this replica's batch of `x`.

        At trace time when the batch size is static, else at run time (an
        out-of-range slice or gather would otherwise fail with a generic
        error, or on a GPU silently read zeros).

        Args:
            x: this replica's inputs (any structure; the first tensor's
                leading axis is the batch).
            num_replicas: replicas in sync.

        Returns:
            `(static_batch, batch)`: the static batch size or None, and the
            batch size as a scalar tensor that carries the run-time check.
        """
        static_batch, batch = batch_size(x)
        if static_batch is not None:
            self.check_fits(static_batch, num_replicas)
            return static_batch, batch
        count = self.micro_batches_per_replica(num_replicas)
        with tf.control_dependencies([tf.debugging.assert_greater_equal(
                batch, count * self.micro_batch_size,
                message=(
                    f"The estimator needs {count} micro-batches of "
                    f"{self.micro_batch_size} examples per replica "
                    f"({count * self.micro_batch_size}), more than the batch "
                    "on this replica: lower `num_micro_batches` or "
                    "`micro_batch_size`, or raise the global batch size "
                    "(a last partial batch: `drop_remainder=True`)."))]):
            return static_batch, tf.identity(batch)


class GradientNormEstimator(NormEstimator):
    """The loop estimator: each micro-batch in a forward and backward pass
    of its own (the reference).

    Args:
        micro_batch_size: `s`, examples per micro-batch (>= 1). With 1 the
            per-example gradients are computed with `tf.vectorized_map`
            (one example at a time on a model that runs a while loop: an
            RNN, `scan`, `map`, `fori_loop`);
            models with batch normalization need s >= 2 (the statistics of
            one example normalize it to zero, so the estimate collapses).
        num_micro_batches: `J`, micro-batches per global step (>= 1).
        refresh_every: recompute the estimate every this many steps and
            reuse the stored one in between (>= 1; 1 is the reference).
    """

    def estimate(self, model, observation, step):
        del observation
        return self(model, step.per_example_loss, step.x, step.y,
                    step.sample_weight, loss_scale=step.loss_scale)

    def __call__(self, model, per_example_loss, x, y, sample_weight=None,
                 loss_scale=None, variables=None, run=None):
        """`a_l` from one forward and backward pass per micro-batch.

        Args and returns as in `NormEstimator.__call__`. Each micro-batch
        loss is weighted per example as the main loss is
        (`loss_scale / global batch`); with fewer `variables`, each
        micro-batch's backward pass computes only their gradients (the
        forward pass is the whole model's either way). `run`, a boolean
        scalar tensor or None: where False, no micro-batch runs (the loop
        takes zero turns, at no cost) and the norms are zeros; a way to
        run the loop only on some steps without a `tf.cond` around it,
        which costs a compiled step about a tenth of its time even where
        the loop does not run.

        Example:

        ```python
        estimator = clars_tf.GradientNormEstimator(micro_batch_size=8,
                                                   num_micro_batches=4)
        norms = estimator(model, per_example_loss, x, y)
        ```
        """
        context = tf.distribute.get_replica_context()
        num_replicas = context.num_replicas_in_sync if context else 1
        count = self.micro_batches_per_replica(num_replicas)
        if self.micro_batch_size == 1 and _has_batch_normalization(model):
            raise ValueError(MICRO_BATCH_OF_ONE_WITH_BATCH_NORM)
        # NumPy inputs cannot be gathered by the tensor indices below.
        x, y = tf.nest.map_structure(tf.convert_to_tensor, (x, y))
        if sample_weight is not None:
            sample_weight = tf.convert_to_tensor(sample_weight)
        _, batch = self.check_batch(x, num_replicas)
        indices = self.micro_batch_indices(batch, num_replicas)
        if loss_scale is None:
            loss_weight = tf.constant(1.0)
        else:
            global_batch = tf.cast(batch * num_replicas, "float32")
            loss_weight = (tf.cast(loss_scale, "float32")
                           * self.micro_batch_size / global_batch)
        if variables is None:
            variables = model.trainable_variables
        variables = list(variables)

        def norms_of_micro_batch(examples):
            def take(tensor):
                return tf.gather(tensor, examples)

            xs, ys = tf.nest.map_structure(take, (x, y))
            with tf.GradientTape() as tape:
                # Every state write (batch-norm moving statistics, metrics,
                # seed generators) is collected by the scope and dropped.
                with keras.StatelessScope():
                    predictions = model(xs, training=True)
                losses = tf.cast(per_example_loss(ys, predictions), "float32")
                if sample_weight is not None:
                    losses *= tf.cast(take(sample_weight), "float32")
                loss = tf.reduce_mean(losses) * loss_weight
            gradients = tape.gradient(loss, variables)
            return tf.stack([
                layerwise.float32_norm(g) if g is not None
                else tf.constant(0.0)
                for g in gradients
            ]) / loss_weight

        turns = count if run is None else tf.where(run, count, 0)

        def one_after_another():
            _, total = tf.while_loop(
                lambda j, _: j < turns,
                lambda j, acc: (
                    j + 1, acc + norms_of_micro_batch(indices[j])),
                (tf.constant(0), tf.zeros([len(variables)])),
            )
            return total

        with _local_batch_norm_statistics(model):
            total = None
            if (self.micro_batch_size == 1 and run is None
                    and not _runs_a_while_loop(model, x)):
                try:
                    total = tf.reduce_sum(tf.vectorized_map(
                        norms_of_micro_batch, indices), axis=0)
                except (ValueError, TypeError):
                    # pfor cannot vectorize every model (a tf.cond carrying
                    # variants): one example at a time.
                    total = None
            if total is None:
                total = one_after_another()
        return tf.unstack(total / tf.cast(count, "float32"))
