"""LARS with MLPerf semantics: the baseline CLARS is compared against."""

import math

import tensorflow as tf
from keras import ops
from keras import saving

from clars_tf import layerwise


@saving.register_keras_serializable(package="clars_tf")
class LARS(layerwise.LayerwiseAdaptiveOptimizer):
    """Layer-wise Adaptive Rate Scaling, as in the MLPerf ResNet-50 reference.

    For each variable `w` with gradient `g`:

    ```python
    d = g + weight_decay_rate * w
    trust = trust_coefficient * ||w|| / (
        ||g|| + weight_decay_rate * ||w|| + epsilon)   # 1 if a norm is 0
    trust = min(trust_clip, trust)                     # only with a clip
    v = momentum * v + learning_rate * trust * d
    w = w - v                 # nesterov: w - (momentum * v + lr * trust * d)
    ```

    Variables excluded from layer adaptation (rank <= 1 and regex matches)
    use `trust = 1` and, by default, no weight decay. Norms are computed in
    float32.

    Args:
        learning_rate: float >= 0, a `LearningRateSchedule` or a callable.
        momentum: `mu` in [0, 1). Defaults to 0.9.
        nesterov: whether to use Nesterov momentum. Defaults to False.
        weight_decay_rate: coupled L2 coefficient. Defaults to 0.
        trust_coefficient: `eta` > 0. Defaults to 0.001.
        epsilon: >= 0, added to the denominator. Defaults to 0.
        trust_clip: optional upper bound `c` > 0 of the trust ratio, as
            CLARS's `trust_clip` (with CLARS's `trust_coefficient`, LARS then
            differs from CLARS only in the denominator: `||g||` instead of
            the micro-batch estimate). None or `inf`: no clip (MLPerf).
            Defaults to None.
        exclude_from_layer_adaptation: optional regexes on variable paths.
        decay_excluded_variables: whether excluded variables are decayed.
            Defaults to False (MLPerf).
        name: the optimizer's name, the prefix of its variables' paths.
            Defaults to "lars".
        **kwargs: `exclude_rank_one_variables` (default True: variables
            of rank <= 1 use trust 1; False adapts them too, an ablation)
            and Keras's base optimizer arguments (`weight_decay`,
            `clipnorm`, `use_ema`, ...).

    Example:

    >>> import keras, numpy as np
    >>> w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    >>> optimizer = LARS(learning_rate=1.0)
    >>> optimizer.apply([np.array([[0.6, 0.8]])], [w])
    >>> w.numpy()  # trust = 0.001 * ||w|| / ||g|| = 0.001 * 5 / 1 = 0.005
    array([[2.997, 3.996]], dtype=float32)

    References:
        - [You et al., 2017](https://arxiv.org/abs/1708.03888)
        - MLPerf Training, ResNet-50 reference implementation.
    """

    def __init__(
        self,
        learning_rate,
        momentum=0.9,
        nesterov=False,
        weight_decay_rate=0.0,
        trust_coefficient=0.001,
        epsilon=0.0,
        exclude_from_layer_adaptation=None,
        decay_excluded_variables=False,
        trust_clip=None,
        name="lars",
        **kwargs,
    ):
        if trust_clip is not None:
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
        # A config file spells "no clip" as .inf; the graph then skips it.
        self.trust_clip = (None if trust_clip is None or math.isinf(trust_clip)
                           else float(trust_clip))

    def layer_trust_ratio(self, weight_norm, gradient_norm, decay_rate):
        return layerwise.trust_ratio(
            weight_norm,
            gradient_norm,
            gradient_norm + decay_rate * weight_norm + self.epsilon,
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
                layerwise.float32_norm(gradient), decay_rate)
            scaled_rate = ops.cast(learning_rate * trust, dtype)
        else:
            scaled_rate = ops.cast(learning_rate, dtype)
        if not layerwise.on_tensorflow():
            self._velocity_step(variable, self.momentums[index], update,
                                scaled_rate)
            return
        # One fused kernel for v = mu * v + rate * d, w -= v (nesterov:
        # w -= mu * v + rate * d). It keeps the velocity negated: -v.
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=layerwise.resource_handle(variable),
            accum=layerwise.resource_handle(self.momentums[index]),
            lr=scaled_rate, grad=update,
            momentum=ops.cast(self.momentum, dtype),
            use_nesterov=self.nesterov)

    def get_config(self):
        config = super().get_config()
        config["trust_clip"] = self.trust_clip
        return config
