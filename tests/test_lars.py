import keras
import numpy as np
import pytest

import clars_tf
import reference


def test_one_step_matches_hand_computed_values():
    w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    optimizer = clars_tf.LARS(1.0, momentum=0.9, weight_decay_rate=0.01)
    # d = [0.63, 0.84]; trust = 0.001 * 5 / (1 + 0.01 * 5) = 0.005 / 1.05.
    optimizer.apply([np.array([[0.6, 0.8]])], [w])
    np.testing.assert_allclose(w.numpy(), [[2.997, 3.996]], rtol=1e-6)


@pytest.mark.parametrize("trust_clip, expected", [
    # Unclipped trust = 0.01 * ||w|| / ||g|| = 0.01 * 5 / 1 = 0.05.
    (0.004, [[3.0 - 0.004 * 0.6, 4.0 - 0.004 * 0.8]]),   # the clip binds
    (0.1, [[3.0 - 0.05 * 0.6, 4.0 - 0.05 * 0.8]]),       # it does not
    (float("inf"), [[3.0 - 0.05 * 0.6, 4.0 - 0.05 * 0.8]]),  # no clip
])
def test_trust_clip_bounds_the_trust_ratio(trust_clip, expected):
    w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    optimizer = clars_tf.LARS(1.0, momentum=0.9, trust_coefficient=0.01,
                              trust_clip=trust_clip)
    optimizer.apply([np.array([[0.6, 0.8]])], [w])
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_trust_clip_also_bounds_the_zero_gradient_fallback():
    w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    bias = keras.Variable(np.array([1.0, 2.0]), dtype="float32")
    optimizer = clars_tf.LARS(1.0, momentum=0.9, weight_decay_rate=0.5,
                              trust_clip=0.25)
    # ||g|| = 0: trust min(0.25, 1) on d = 0.5 * w; the bias (rank 1,
    # excluded, not decayed) takes the plain step, unclipped.
    optimizer.apply([np.zeros((1, 2)), np.array([0.5, 0.5])], [w, bias])
    np.testing.assert_allclose(w.numpy(), [[3.0 - 0.25 * 1.5,
                                            4.0 - 0.25 * 2.0]], rtol=1e-6)
    np.testing.assert_allclose(bias.numpy(), [0.5, 1.5], rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_several_steps_match_numpy_reference(nesterov):
    rng = np.random.default_rng(2)
    with keras.name_scope("body"):
        kernel = keras.Variable(rng.normal(size=(3, 2)), name="kernel",
                                dtype="float32")
        bias = keras.Variable(rng.normal(size=(2,)), name="bias",
                              dtype="float32")
        zero = keras.Variable(np.zeros((2, 2)), name="zero", dtype="float32")
    with keras.name_scope("head"):
        head = keras.Variable(rng.normal(size=(2, 2)), name="kernel",
                              dtype="float32")
    variables = [kernel, bias, zero, head]
    initial = [v.numpy() for v in variables]
    steps = 4
    gradients = [[rng.normal(size=v.shape).astype("float32")
                  for v in variables] for _ in range(steps)]
    gradients[2][0] = np.zeros((3, 2), "float32")  # zero gradient: trust 1
    schedule = clars_tf.schedules.LinearWarmup(
        clars_tf.schedules.polynomial_decay(2.0, steps), warmup_steps=2)
    optimizer = clars_tf.LARS(
        schedule, momentum=0.9, nesterov=nesterov, weight_decay_rate=0.05,
        trust_coefficient=0.01, epsilon=1e-9,
        exclude_from_layer_adaptation=["^head/"])
    for step_gradients in gradients:
        optimizer.apply(step_gradients, variables)
    rates = [float(schedule(t)) for t in range(steps)]
    expected = reference.lars_steps(
        initial, gradients, rates, momentum=0.9, decay=0.05, eta=0.01,
        epsilon=1e-9, adapted=[True, False, True, False], nesterov=nesterov)
    for variable, want in zip(variables, expected):
        np.testing.assert_allclose(variable.numpy(), want, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"learning_rate": -1.0}, "learning_rate"), ({"momentum": 1.5},
                                                   "momentum"),
     ({"trust_coefficient": -1.0}, "trust_coefficient"),
     ({"trust_clip": 0.0}, "trust_clip"), ({"trust_clip": "0.1"}, "trust_clip")],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        clars_tf.LARS(**{"learning_rate": 0.1, **kwargs})


def test_config_round_trip():
    optimizer = clars_tf.LARS(0.3, momentum=0.94, weight_decay_rate=5e-5,
                              exclude_from_layer_adaptation=["bn"])
    restored = clars_tf.LARS.from_config(optimizer.get_config())
    assert restored.get_config() == optimizer.get_config()
    assert restored.decay_excluded_variables is False
    assert restored.trust_clip is None


def test_config_round_trip_keeps_the_clip():
    optimizer = clars_tf.LARS(0.3, trust_coefficient=0.01, trust_clip=0.1)
    restored = clars_tf.LARS.from_config(optimizer.get_config())
    assert restored.get_config() == optimizer.get_config()
    assert restored.trust_clip == 0.1
