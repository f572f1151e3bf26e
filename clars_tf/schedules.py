"""Learning-rate schedules for large-batch training, as Keras schedules.

Linear scaling sets the peak rate from the batch size; `LinearWarmup` puts a
linear ramp to that peak in front of any schedule, which then runs over the
remaining steps (the SGD and LARS baselines use it, CLARS does not); the
decay schedules are Keras's own with the reference defaults (polynomial
power 2 down to 1e-4).
"""

from keras import ops
from keras import optimizers
from keras import saving


__all__ = ["linear_scaling", "polynomial_decay", "cosine_decay",
           "LinearWarmup", "build_schedule"]


def linear_scaling(base_learning_rate, global_batch_size,
                   reference_batch_size=256):
    """`base_learning_rate * global_batch_size / reference_batch_size`.

    Args:
        base_learning_rate: rate at the reference batch size (> 0).
        global_batch_size: examples per step over all replicas (>= 1).
        reference_batch_size: 256 for ImageNet, 128 for CIFAR in the paper.

    Returns:
        The peak learning rate, a float.

    Example:

    >>> linear_scaling(0.128, global_batch_size=32768)
    16.384
    """
    if base_learning_rate <= 0:
        raise ValueError(
            f"`base_learning_rate` must be > 0, got {base_learning_rate}.")
    if global_batch_size < 1 or reference_batch_size < 1:
        raise ValueError(
            "`global_batch_size` and `reference_batch_size` must be >= 1, got "
            f"{global_batch_size} and {reference_batch_size}.")
    return base_learning_rate * global_batch_size / reference_batch_size


def polynomial_decay(initial_learning_rate, decay_steps,
                     end_learning_rate=1e-4, power=2.0):
    """Keras's `PolynomialDecay` with the reference defaults.

    Args:
        initial_learning_rate: the rate at step 0.
        decay_steps: steps over which the rate decays (>= 1).
        end_learning_rate: the rate from `decay_steps` on.
        power: the polynomial's power; 2 as in the reference code.

    Returns:
        A `keras.optimizers.schedules.PolynomialDecay`.
    """
    return optimizers.schedules.PolynomialDecay(
        initial_learning_rate, decay_steps,
        end_learning_rate=end_learning_rate, power=power)


def cosine_decay(initial_learning_rate, decay_steps, alpha=0.0):
    """Keras's `CosineDecay` (to `alpha * initial_learning_rate`).

    Args:
        initial_learning_rate: the rate at step 0.
        decay_steps: steps over which the rate decays (>= 1).
        alpha: the final rate as a fraction of `initial_learning_rate`.

    Returns:
        A `keras.optimizers.schedules.CosineDecay`.
    """
    return optimizers.schedules.CosineDecay(
        initial_learning_rate, decay_steps, alpha=alpha)


@saving.register_keras_serializable(package="clars_tf")
class LinearWarmup(optimizers.schedules.LearningRateSchedule):
    """Linear warmup to the peak rate, then any schedule (Goyal et al., 2017).

    For `step < warmup_steps` the rate rises linearly from
    `initial_learning_rate` to the peak `schedule(0)`, reached at
    `warmup_steps`; from then on it is `schedule(step - warmup_steps)`: the
    wrapped schedule starts its own clock when the warmup ends, so a decay
    over `total_steps - warmup_steps` ends with the run (as MLPerf's LARS and
    the reference code do).

    Args:
        schedule: a `LearningRateSchedule` or a float.
        warmup_steps: number of warmup steps (>= 0; 0 disables warmup).
        initial_learning_rate: rate at step 0. Defaults to 0.
    """

    def __init__(self, schedule, warmup_steps, initial_learning_rate=0.0):
        if warmup_steps < 0:
            raise ValueError(
                f"`warmup_steps` must be >= 0, got {warmup_steps}.")
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.initial_learning_rate = float(initial_learning_rate)

    def _schedule_at(self, step):
        if isinstance(self.schedule, optimizers.schedules.LearningRateSchedule):
            return ops.cast(self.schedule(step), "float32")
        return ops.cast(self.schedule, "float32")

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.warmup_steps == 0:
            return self._schedule_at(step)
        warmup_steps = float(self.warmup_steps)
        peak = self._schedule_at(0.0)
        warming = self.initial_learning_rate + step / warmup_steps * (
            peak - self.initial_learning_rate)
        after = self._schedule_at(ops.maximum(step - warmup_steps, 0.0))
        return ops.where(step < warmup_steps, warming, after)

    def get_config(self):
        schedule = self.schedule
        if isinstance(schedule, optimizers.schedules.LearningRateSchedule):
            schedule = saving.serialize_keras_object(schedule)
        return {
            "schedule": schedule,
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["schedule"], dict):
            config["schedule"] = saving.deserialize_keras_object(
                config["schedule"])
        return cls(**config)


def build_schedule(peak_learning_rate, total_steps, decay="polynomial",
                   warmup_steps=0, end_learning_rate=1e-4, power=2.0):
    """Peak rate, optional linear warmup, then a decay to the end of the run.

    The warmup rises from 0 to `peak_learning_rate` over `warmup_steps`; the
    decay starts from the peak there and runs over the remaining
    `total_steps - warmup_steps` steps.

    Args:
        peak_learning_rate: rate after linear scaling (> 0).
        total_steps: steps of the whole run (>= 1), warmup included.
        decay: 'polynomial', 'cosine' or 'constant'.
        warmup_steps: linear warmup steps (0 for CLARS).
        end_learning_rate: final rate of the polynomial decay.
        power: power of the polynomial decay.

    Returns:
        A Keras `LearningRateSchedule` (`LinearWarmup` around the decay when
        `warmup_steps` > 0), or the float `peak_learning_rate` for a
        constant rate without warmup.

    Example:

    >>> schedule = build_schedule(16.384, total_steps=3510, warmup_steps=195)
    >>> round(float(schedule(195)), 3)
    16.384
    """
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1, got {total_steps}.")
    if warmup_steps >= total_steps and warmup_steps > 0:
        raise ValueError(
            f"`warmup_steps` ({warmup_steps}) must be smaller than "
            f"`total_steps` ({total_steps}).")
    decay_steps = total_steps - warmup_steps
    if decay == "polynomial":
        schedule = polynomial_decay(peak_learning_rate, decay_steps,
                                    end_learning_rate, power)
    elif decay == "cosine":
        schedule = cosine_decay(peak_learning_rate, decay_steps)
    elif decay == "constant":
        schedule = float(peak_learning_rate)
    else:
        raise ValueError(
            f"`decay` must be 'polynomial', 'cosine' or 'constant', got "
            f"{decay!r}.")
    if warmup_steps:
        return LinearWarmup(schedule, warmup_steps)
    return schedule
