import keras
import numpy as np
import pytest

from clars_tf import layerwise


def test_trust_ratio_is_eta_times_weight_norm_over_denominator():
    ratio = layerwise.trust_ratio(5.0, 2.0, 2.0, 0.01)
    assert float(ratio) == pytest.approx(0.025)


def test_trust_ratio_is_one_when_either_norm_is_zero():
    assert float(layerwise.trust_ratio(0.0, 2.0, 2.0, 0.01)) == 1.0
    assert float(layerwise.trust_ratio(5.0, 0.0, 1e-6, 0.01)) == 1.0


def test_trust_ratio_clip_bounds_ratio_and_fallback():
    assert float(layerwise.trust_ratio(5.0, 0.1, 0.1, 0.01, clip=0.1)) == (
        pytest.approx(0.1))
    assert float(layerwise.trust_ratio(0.0, 0.1, 0.1, 0.01, clip=0.1)) == (
        pytest.approx(0.1))


def test_float32_norm_of_bfloat16_does_not_overflow_or_round():
    values = np.full([1000], 3.0, dtype="float32")
    norm = layerwise.float32_norm(keras.ops.cast(values, "bfloat16"))
    assert norm.dtype == "float32"
    assert float(norm) == pytest.approx(3.0 * np.sqrt(1000), rel=1e-6)
