import keras
import pytest

from clars_tf import schedules


def test_linear_scaling_rule():
    assert schedules.linear_scaling(0.1, 4096, 128) == pytest.approx(3.2)
    assert schedules.linear_scaling(0.128, 32768) == pytest.approx(16.384)
    with pytest.raises(ValueError, match="base_learning_rate"):
        schedules.linear_scaling(-0.1, 256)


def test_polynomial_decay_power_two_to_end_rate():
    schedule = schedules.polynomial_decay(1.0, 100)
    # (1 - 1e-4) * (1 - 50/100)^2 + 1e-4
    assert float(schedule(50)) == pytest.approx(0.9999 * 0.25 + 1e-4)
    assert float(schedule(100)) == pytest.approx(1e-4)


def _goyal_mlperf(step, peak, warmup, total, end=1e-4, power=2.0):
    """The spec's warmup then poly decay over the remaining steps."""
    if step < warmup:
        return peak * step / warmup
    remaining = (step - warmup) / (total - warmup)
    return (peak - end) * (1 - remaining) ** power + end


def test_warmup_reaches_the_peak_then_decays_over_the_remaining_steps():
    schedule = schedules.build_schedule(2.0, 100, warmup_steps=20)
    # Closed form at fixed steps: 2 * t / 20, then
    # (2 - 1e-4) * (1 - (t - 20) / 80)^2 + 1e-4.
    want = {0: 0.0, 5: 0.5, 19: 1.9, 20: 2.0, 60: 1.9999 * 0.25 + 1e-4,
            99: 1.9999 * (1 / 80) ** 2 + 1e-4, 100: 1e-4}
    for step, rate in want.items():
        assert float(schedule(step)) == pytest.approx(rate, rel=1e-5)
        assert rate == pytest.approx(_goyal_mlperf(step, 2.0, 20, 100))
    assert max(float(schedule(t)) for t in range(101)) == pytest.approx(2.0)


def test_warmup_wraps_any_schedule_on_its_own_clock():
    decay = schedules.polynomial_decay(1.0, 90)
    schedule = schedules.LinearWarmup(decay, warmup_steps=10)
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(float(decay(45)))


def test_cosine_decay_after_warmup_ends_with_the_run():
    schedule = schedules.build_schedule(2.0, 100, decay="cosine",
                                        warmup_steps=20)
    assert float(schedule(20)) == pytest.approx(2.0)
    assert float(schedule(60)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)


def test_warmup_of_a_constant_rate():
    schedule = schedules.LinearWarmup(2.0, warmup_steps=4)
    assert [float(schedule(t)) for t in range(6)] == pytest.approx(
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.0])


def test_cosine_decay_halfway_is_half():
    schedule = schedules.build_schedule(2.0, 100, decay="cosine")
    assert float(schedule(50)) == pytest.approx(1.0)


def test_schedules_serialize():
    schedule = schedules.build_schedule(3.0, 200, warmup_steps=20)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule))
    for step in (0, 7, 20, 150):
        assert float(restored(step)) == pytest.approx(float(schedule(step)))


def test_build_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        schedules.build_schedule(1.0, 10, decay="exp")
    with pytest.raises(ValueError, match="warmup_steps"):
        schedules.build_schedule(1.0, 10, warmup_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.build_schedule(1.0, 0)
