"""The one place an estimator is built from a configuration."""

import pytest

import clars_tf
from clars_tf import estimators


def test_the_loop_is_the_default_method_and_takes_no_check():
    estimator = clars_tf.estimator_from_config(
        {"micro_batch_size": 4, "num_micro_batches": 8, "check_every": 5})
    assert type(estimator) is clars_tf.GradientNormEstimator
    assert (estimator.micro_batch_size, estimator.num_micro_batches,
            estimator.refresh_every) == (4, 8, 1)


@pytest.mark.parametrize("given, expected", [
    ({}, 100), ({"check_every": 5}, 5), ({"check_every": 0}, None)])
def test_one_pass_takes_check_every_with_zero_for_never(given, expected):
    estimator = clars_tf.estimator_from_config(
        {"method": "one_pass", "micro_batch_size": 2,
         "num_micro_batches": 4, "refresh_every": 3, **given},
        jit_compile=True)
    assert type(estimator) is clars_tf.OnePassGradientNormEstimator
    assert estimator.check_every == expected
    assert estimator.refresh_every == 3 and estimator.jit_compile


def test_an_unknown_method_is_named_with_the_choices():
    with pytest.raises(ValueError, match="'ghost'.*loop, one_pass"):
        estimators.estimator_from_config(
            {"method": "ghost", "micro_batch_size": 2,
             "num_micro_batches": 4})
