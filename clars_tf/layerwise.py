"""What LARS and CLARS share: per-variable settings and the trust ratio.

Both optimizers scale each variable's step by a trust ratio
`eta * ||w|| / denominator`; they differ only in the denominator and in where
the ratio enters the momentum update. This module holds the common part so the
two update rules stay short and checkable against the spec.
"""

import re

import keras
import tensorflow as tf
from keras import ops
from keras import optimizers


def trust_ratio(weight_norm, gradient_norm, denominator, trust_coefficient,
                clip=None):
    """Layer-wise trust ratio, `eta * ||w|| / denominator`.

    The ratio is 1 where `weight_norm` or `gradient_norm` is zero: a freshly
    zero-initialised variable, or one that received no signal, then takes a
    plain step instead of none at all (or an infinite one). A NaN or infinite
    `gradient_norm` gives a NaN ratio: a broken norm must reach the update,
    where NaN checks see it, never turn into the fallback's finite step.

    Args:
        weight_norm: float32 scalar, `||w||`.
        gradient_norm: float32 scalar whose zeroness disables adaptation
            (`||g||` for LARS, the estimate `a_l` for CLARS).
        denominator: float32 scalar dividing `eta * ||w||`.
        trust_coefficient: `eta`.
        clip: optional upper bound applied to the ratio (and to the fallback 1).

    Returns:
        float32 scalar.

    Example:

    >>> round(float(trust_ratio(5.0, 2.0, 2.0, trust_coefficient=0.01)), 6)
    0.025
    >>> round(float(trust_ratio(5.0, 2.0, 2.0, 0.01, clip=0.02)), 6)
    0.02
    >>> float(trust_ratio(5.0, 0.0, 0.0, 0.01))  # no gradient: a plain step
    1.0
    """
    both_positive = ops.logical_and(
        ops.greater(weight_norm, 0.0), ops.greater(gradient_norm, 0.0)
    )
    # Dividing by a safe denominator keeps the unused branch of `where`
    # finite, so its gradient and value never carry NaN.
    safe_denominator = ops.where(both_positive, denominator, 1.0)
    ratio = ops.where(
        both_positive, trust_coefficient * weight_norm / safe_denominator, 1.0
    )
    if clip is not None:
        ratio = ops.minimum(ratio, clip)
    return ops.where(ops.isfinite(gradient_norm), ratio, float("nan"))


def on_tensorflow():
    """Whether Keras runs on TensorFlow, where the fused kernels are used.

    On JAX and PyTorch the same rules are written with `keras.ops`; the
    TensorFlow kernels stay because `benchmarks/optimizer_step.py` measured
    the difference there: LARS 1.29x and CLARS 1.08x SGD's step with them,
    1.98x and 1.59x with element-wise ops (`benchmarks/README.md`).
    """
    return keras.backend.backend() == "tensorflow"


def float32_norm(tensor):
    """L2 norm computed in float32, whatever the tensor's dtype."""
    tensor = ops.cast(tensor, "float32")
    if on_tensorflow():
        # One fused reduction (sum of squares / 2) instead of square + sum.
        return tf.sqrt(2.0 * tf.nn.l2_loss(tensor))
    return ops.sqrt(ops.sum(ops.square(tensor)))


def resource_handle(variable):
    """The resource handle of a Keras or TensorFlow variable (or replica)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def _check_float(name, value, low, high=None, low_inclusive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    below = value < low if low_inclusive else value <= low
    above = high is not None and value >= high
    if below or above:
        bound = f"{'>=' if low_inclusive else '>'} {low}"
        if high is not None:
            bound += f" and < {high}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")


class LayerwiseAdaptiveOptimizer(optimizers.Optimizer):
    """Base class for momentum optimizers with a per-variable trust ratio.

    It validates the shared hyperparameters, decides in `build()` which
    variables are adapted and decayed (the per-replica variables that reach
    `update_step` under `tf.distribute` carry no `.path`, so the decision has
    to be made here and looked up by index), creates the momentum buffers and
    serializes the shared config. Subclasses implement `update_step`.

    Args:
        learning_rate: float >= 0, a `LearningRateSchedule` or a callable.
        momentum: momentum coefficient `mu` in [0, 1).
        nesterov: whether to use Nesterov momentum.
        weight_decay_rate: coupled L2 coefficient `lambda` added to the
            gradient (`d = g + lambda * w`). Keras's own `weight_decay`
            keeps its decoupled meaning and is applied separately.
        trust_coefficient: `eta` > 0.
        epsilon: >= 0, added to the trust-ratio denominator.
        exclude_from_layer_adaptation: optional list of regexes; variables
            whose path matches any of them get trust ratio 1.
        decay_excluded_variables: whether variables excluded from layer
            adaptation still get the coupled `weight_decay_rate` term.
        exclude_rank_one_variables: whether variables of rank <= 1
            (biases, batch-norm scale and offset) are excluded from layer
            adaptation, as the reference code and MLPerf do (the default);
            False adapts them too (an ablation).
        **kwargs: Keras's base optimizer arguments.
    """

    def __init__(
        self,
        learning_rate,
        momentum,
        nesterov,
        weight_decay_rate,
        trust_coefficient,
        epsilon,
        exclude_from_layer_adaptation,
        decay_excluded_variables,
        exclude_rank_one_variables=True,
        **kwargs,
    ):
        if isinstance(learning_rate, (int, float)) and not isinstance(
            learning_rate, bool
        ):
            _check_float("learning_rate", learning_rate, 0.0)
        _check_float("momentum", momentum, 0.0, 1.0)
        _check_float("weight_decay_rate", weight_decay_rate, 0.0)
        _check_float(
            "trust_coefficient", trust_coefficient, 0.0, low_inclusive=False
        )
        _check_float("epsilon", epsilon, 0.0)
        if isinstance(exclude_from_layer_adaptation, str):
            exclude_from_layer_adaptation = [exclude_from_layer_adaptation]
        patterns = list(exclude_from_layer_adaptation or [])
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(
                    "`exclude_from_layer_adaptation` must be a list of regular "
                    f"expressions; {pattern!r} is not one ({error})."
                ) from None
        if kwargs.get("gradient_accumulation_steps"):
            raise ValueError(
                "`gradient_accumulation_steps` is not supported by "
                f"{type(self).__name__}: the trust ratio needs the norms of the "
                "whole accumulated step. Use a larger global batch instead."
            )
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay_rate = float(weight_decay_rate)
        self.trust_coefficient = float(trust_coefficient)
        self.epsilon = float(epsilon)
        self.exclude_from_layer_adaptation = patterns
        self.decay_excluded_variables = bool(decay_excluded_variables)
        self.exclude_rank_one_variables = bool(exclude_rank_one_variables)

    def is_adapted(self, variable):
        """Whether `variable` gets a trust ratio (decided from rank and path)."""
        if self.exclude_rank_one_variables and len(variable.shape) <= 1:
            return False
        path = getattr(variable, "path", None) or variable.name
        return not any(
            re.search(pattern, path)
            for pattern in self.exclude_from_layer_adaptation
        )

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._adapted = [self.is_adapted(v) for v in variables]
        self._decay_rates = [
            self.weight_decay_rate
            if adapted or self.decay_excluded_variables
            else 0.0
            for adapted in self._adapted
        ]
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def layer_trust_ratio(self, weight_norm, gradient_norm, decay_rate):
        """The trust ratio of an adapted variable; subclasses define it.

        Args:
            weight_norm: float32 `||w||`.
            gradient_norm: float32 norm the ratio divides by (`||g||` for
                LARS, the estimate `a` for CLARS).
            decay_rate: the variable's coupled decay coefficient.

        Returns:
            The float32 scalar that scales the variable's step.
        """
        raise NotImplementedError

    def trust_ratios(self, variables, gradient_norms):
        """Per-variable trust ratios, 1 for excluded variables (diagnostics).

        Args:
            variables: variables the optimizer was built with.
            gradient_norms: one norm per variable, as `layer_trust_ratio`
                takes it.

        Returns:
            One float32 scalar per variable.
        """
        ratios = []
        for variable, norm in zip(variables, gradient_norms):
            _, adapted, decay_rate = self._variable_settings(variable)
            ratios.append(
                self.layer_trust_ratio(float32_norm(variable), norm,
                                       decay_rate)
                if adapted else ops.ones((), "float32"))
        return ratios

    def _decayed_gradient(self, gradient, variable, decay_rate):
        """`d = g + decay_rate * w`, skipping the product when the rate is 0."""
        gradient = ops.cast(gradient, variable.dtype)
        if not decay_rate:
            return gradient
        return ops.add(gradient, ops.multiply(decay_rate, variable))

    def _momentum_step(self, variable, momentum_buffer, update, scaled_rate):
        """`m = mu * m + d; w -= rate * m` (nesterov: `rate * (mu * m + d)`).

        CLARS's spec steps 4-5 in `keras.ops`, for backends other than
        TensorFlow (which uses the fused `ResourceApplyMomentum`, the same
        arithmetic).
        """
        accumulated = ops.add(ops.multiply(momentum_buffer, self.momentum),
                              update)
        self.assign(momentum_buffer, accumulated)
        if self.nesterov:
            accumulated = ops.add(ops.multiply(accumulated, self.momentum),
                                  update)
        self.assign_sub(variable, ops.multiply(accumulated, scaled_rate))

    def _velocity_step(self, variable, momentum_buffer, update, scaled_rate):
        """`v = mu * v + rate * d; w -= v` (nesterov: `mu * v + rate * d`).

        LARS's update in `keras.ops`, for backends other than TensorFlow. The
        buffer holds `-v`, as TensorFlow's fused `ResourceApplyKerasMomentum`
        keeps it, so a saved optimizer means the same on every backend.
        """
        scaled_update = ops.multiply(update, scaled_rate)
        negated_velocity = ops.subtract(
            ops.multiply(momentum_buffer, self.momentum), scaled_update)
        self.assign(momentum_buffer, negated_velocity)
        if self.nesterov:
            negated_velocity = ops.subtract(
                ops.multiply(negated_velocity, self.momentum), scaled_update)
        self.assign_add(variable, negated_velocity)

    def _variable_settings(self, variable):
        """(index, adapted, decay_rate) of a variable seen by `update_step`."""
        index = self._get_variable_index(variable)
        return index, self._adapted[index], self._decay_rates[index]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "weight_decay_rate": self.weight_decay_rate,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "exclude_from_layer_adaptation": list(
                    self.exclude_from_layer_adaptation
                ),
                "decay_excluded_variables": self.decay_excluded_variables,
                "exclude_rank_one_variables": self.exclude_rank_one_variables,
            }
        )
        return config
