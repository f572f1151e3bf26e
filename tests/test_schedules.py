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


def test_warmup_rises_linearly_then_follows_the_schedule():
    decay = schedules.polynomial_decay(1.0, 100)
    schedule = schedules.LinearWarmup(decay, warmup_steps=10)
    peak = 0.9999 * 0.9 ** 2 + 1e-4  # decay(10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5 * peak)
    assert float(schedule(10)) == pytest.approx(peak)
    assert float(schedule(60)) == pytest.approx(0.9999 * 0.4 ** 2 + 1e-4)


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
