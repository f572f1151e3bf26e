"""CLARS: Complete Layer-wise Adaptive Rate Scaling (Huo, Gu and Huang, 2021).

The whole update, for a variable `w` with all-reduced gradient `g` and
gradient-norm estimate `a` (the mean norm of micro-batch gradients, see
`clars_tf.gradient_norms`), is spec steps 2-5:

    d     = g + weight_decay_rate * w
    trust = min(trust_clip, trust_coefficient * ||w|| / (a + epsilon))
            (min(trust_clip, 1) when ||w|| or a is 0; 1 for excluded variables)
    m     = momentum * m + d
    w     = w - learning_rate * trust * m
"""

import tensorflow as tf
from keras import initializers
from keras import ops
from keras import saving

from clars_tf import layerwise

MISSING_NORMS_MESSAGE = (
    "CLARS needs this step's per-variable gradient-norm estimates and got "
    "none. With model.fit, add one line before fit: "
    "`clars_tf.attach_gradient_norm_estimator(model)`. In a custom loop, call "
    "`optimizer.apply(grads, variables, gradient_norms=norms)` with norms from "
    "`clars_tf.compute_loss_gradients_and_norms(...)`. CLARS never falls back "
    "to LARS silently."
)


@saving.register_keras_serializable(package="clars_tf")
class CLARS(layerwise.LayerwiseAdaptiveOptimizer):
    """Complete Layer-wise Adaptive Rate Scaling, trained without warmup.

    Like LARS, each variable's step is scaled by a trust ratio; unlike LARS,
    the ratio divides by the *average norm of micro-batch gradients* `a`
    rather than the norm of the mean gradient, so layers whose examples
    disagree take small steps early in training without a warmup schedule.

    `a` comes from outside the optimizer, one float per trainable variable in
    the order of the variables: `apply(grads, variables, gradient_norms=a)`,
    or `set_gradient_norms(a)` before Keras's own `apply_gradients` (which is
    what `clars_tf.attach_gradient_norm_estimator` arranges inside
    `model.fit`). The estimates are stored in the optimizer variable
    `gradient_norm_estimates`, averaged across replicas on assignment, so
    every replica applies the same update, and the step they were set for is
    stored in `gradient_norms_step`. Applying at a step whose estimates were
    not set is an error: raised while tracing when none were ever set, and
    on TensorFlow checked in the graph otherwise (so it holds whichever
    thread applies, as under `LossScaleOptimizer` and `MirroredStrategy`,
    where Keras applies through `merge_call`); on JAX and PyTorch, which set
    and apply a step in one thread, in order, every apply must follow its
    own `set_gradient_norms`, checked while tracing (JAX) or running
    (PyTorch).

    It runs on every Keras backend: TensorFlow's fused momentum kernel
    there, the same arithmetic in `keras.ops` on JAX and PyTorch.

    A NaN or infinite estimate is not replaced by a finite step: the trust
    ratio, and so the update, become NaN, as with a NaN gradient in any Keras
    optimizer, so `keras.callbacks.TerminateOnNaN` and the trainer's
    non-finite check see it.

    Args:
        learning_rate: float >= 0, a `LearningRateSchedule` or a callable.
        momentum: `mu` in [0, 1). Defaults to 0.9.
        nesterov: whether to use Nesterov momentum (`w -= lr * trust *
            (mu * m + d)`). Defaults to False.
        weight_decay_rate: coupled L2 coefficient `lambda`. Defaults to 0.
        trust_coefficient: `eta` > 0. Defaults to 0.01 (for micro-batches of
            8 examples; `eta` scales with the micro-batch size).
        trust_clip: upper bound `c` > 0 of the trust ratio. Defaults to 0.1.
        epsilon: >= 0, added to `a`. Defaults to 1e-6.
        exclude_from_layer_adaptation: optional regexes on variable paths;
            matching variables, and all of rank <= 1, use trust 1.
        decay_excluded_variables: whether excluded variables get the coupled
            decay. Defaults to True, as the reference code decays every
            variable (MLPerf's LARS does not).
        name: the optimizer's name, the prefix of its variables' paths.
            Defaults to "clars".
        **kwargs: `exclude_rank_one_variables` (default True: variables
            of rank <= 1 use trust 1; False adapts them too, an ablation)
            and Keras's base optimizer arguments (`weight_decay`,
            `clipnorm`, `use_ema`, ...).

    Example:

    >>> import keras, numpy as np
    >>> w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    >>> optimizer = CLARS(learning_rate=1.0, epsilon=0.0)
    >>> optimizer.apply([np.array([[0.6, 0.8]])], [w], gradient_norms=[2.0])
    >>> w.numpy()  # trust = 0.01 * ||w|| / a = 0.01 * 5 / 2 = 0.025
    array([[2.985, 3.98 ]], dtype=float32)

    In training, the estimates come from `compute_loss_gradients_and_norms`
    (a custom step) or `attach_gradient_norm_estimator` (`model.fit`).

    References:
        - [Huo et al., 2021](https://arxiv.org/abs/2002.01576)
    """

    def __init__(
        self,
        learning_rate,
        momentum=0.9,
        nesterov=False,
        weight_decay_rate=0.0,
        trust_coefficient=0.01,
        trust_clip=0.1,
        epsilon=1e-6,
        exclude_from_layer_adaptation=None,
        decay_excluded_variables=True,
        name="clars",
        **kwargs,
    ):
        layerwise._check_float("trust_clip", trust_clip, 0.0,
                               low_inclusive=False)
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay_rate=weight_decay_rate,
            trust_coefficient=trust_coefficient,
            epsilon=epsilon,
            exclude_from_layer_adaptation=exclude_from_layer_adaptation,
            decay_excluded_variables=decay_excluded_variables,
            name=name,
            **kwargs,
        )
        self.trust_clip = float(trust_clip)
        # Only a tracing-time hint for the common mistake (fit without the
        # estimator); the step stamp checked in the graph is what counts.
        self._norms_ever_set = False
        # Off TensorFlow: whether this step's estimates were set and not yet
        # applied.
        self._norms_pending = False

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # Mean aggregation: assigning per-replica estimates in replica
        # context averages them across replicas in one small all-reduce.
        self.gradient_norm_estimates = self.add_variable(
            shape=(len(variables),),
            dtype="float32",
            aggregation="mean",
            name="gradient_norm_estimates",
        )
        # The value of `iterations` the estimates were set for; -1: never.
        self.gradient_norms_step = self.add_variable(
            shape=(),
            dtype=self.iterations.dtype,
            initializer=initializers.Constant(-1),
            aggregation="only_first_replica",
            name="gradient_norms_step",
        )

    def set_gradient_norms(self, gradient_norms, variables=None):
        """Stores this step's estimates `a` for the next `apply`.

        Args:
            gradient_norms: one float per variable, in the order of
                `variables`.
            variables: the variables the norms belong to; defaults to all
                variables the optimizer was built with.
        """
        if not self.built:
            if variables is None:
                raise ValueError(
                    "Build the optimizer (`optimizer.build(variables)`) or "
                    "pass `variables` before setting gradient norms."
                )
            self.build(list(variables))
        built_count = len(self._trainable_variables)
        variables = self._trainable_variables if variables is None else list(
            variables)
        gradient_norms = list(gradient_norms)
        if len(gradient_norms) != len(variables):
            raise ValueError(
                f"`gradient_norms` has {len(gradient_norms)} entries but there "
                f"are {len(variables)} variables: pass one norm per variable, "
                "in the same order."
            )
        indices = [self._get_variable_index(v) for v in variables]
        norms = ops.stack([ops.cast(n, "float32") for n in gradient_norms])
        if indices != list(range(built_count)):
            norms = ops.scatter_update(
                self.gradient_norm_estimates.value,
                [[i] for i in indices],
                norms,
            )
        self.gradient_norm_estimates.assign(norms)
        self.gradient_norms_step.assign(self.iterations)
        self._norms_ever_set = True
        self._norms_pending = True

    def apply(self, grads, trainable_variables=None, gradient_norms=None):
        """Applies one CLARS step.

        Args:
            grads: gradients, one per variable.
            trainable_variables: the variables; optional once built.
            gradient_norms: the estimates `a`, one per variable in the same
                order. Required unless `set_gradient_norms` was called in
                this step.
        """
        if gradient_norms is not None:
            self.set_gradient_norms(gradient_norms, trainable_variables)
        elif not self._norms_ever_set:
            raise ValueError(MISSING_NORMS_MESSAGE)
        if not layerwise.on_tensorflow():
            # JAX traces, and PyTorch runs, the setting and the applying of
            # one step in one thread, in order: a flag checks it exactly.
            if not self._norms_pending:
                raise ValueError(MISSING_NORMS_MESSAGE)
            self._norms_pending = False
            super().apply(grads, trainable_variables)
            return
        set_for_this_step = tf.debugging.assert_equal(
            self.gradient_norms_step, self.iterations,
            message=MISSING_NORMS_MESSAGE)
        with tf.control_dependencies([set_for_this_step]):
            super().apply(grads, trainable_variables)

    def layer_trust_ratio(self, weight_norm, gradient_norm, decay_rate):
        del decay_rate  # the estimate carries no decay term (spec step 1)
        return layerwise.trust_ratio(
            weight_norm,
            gradient_norm,
            gradient_norm + self.epsilon,
            self.trust_coefficient,
            clip=self.trust_clip,
        )

    def update_step(self, gradient, variable, learning_rate):
        index, adapted, decay_rate = self._variable_settings(variable)
        dtype = variable.dtype
        update = self._decayed_gradient(gradient, variable, decay_rate)
        if adapted:
            trust = self.layer_trust_ratio(
                layerwise.float32_norm(variable),
                self.gradient_norm_estimates[index], decay_rate)
            scaled_rate = ops.cast(learning_rate * trust, dtype)
        else:
            scaled_rate = ops.cast(learning_rate, dtype)
        if not layerwise.on_tensorflow():
            self._momentum_step(variable, self.momentums[index], update,
                                scaled_rate)
            return
        # One fused kernel for spec steps 4-5: m = mu * m + d, then
        # w -= rate * m (nesterov: w -= rate * (d + mu * m)).
        tf.raw_ops.ResourceApplyMomentum(
            var=layerwise.resource_handle(variable),
            accum=layerwise.resource_handle(self.momentums[index]),
            lr=scaled_rate, grad=update,
            momentum=ops.cast(self.momentum, dtype),
            use_nesterov=self.nesterov)

    def load_own_variables(self, store):
        """Restores the optimizer's variables from a `.keras` file, by position.

        Files written by clars-tf 0.1.0 lack `gradient_norms_step`, the last
        variable; they load, and the step stamp keeps its "never set" value
        -1, which is right for a restored optimizer: the next step sets its
        estimates before applying. Keras's own rule (a warning, nothing
        loaded) holds for any other mismatch.

        Args:
            store: the saved variables, keyed by position ("0", "1", ...).
        """
        if self.built and len(store.keys()) == len(self.variables) - 1:
            for index, variable in enumerate(self.variables[:-1]):
                variable.assign(store[str(index)])
            return
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config["trust_clip"] = self.trust_clip
        return config
