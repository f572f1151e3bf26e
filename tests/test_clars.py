import keras
import numpy as np
import pytest
import tensorflow as tf

import clars_tf
import reference


def _variables():
    """Adapted kernel, rank-1 bias, all-zero kernel, regex-excluded kernel."""
    rng = np.random.default_rng(0)
    with keras.name_scope("body"):
        kernel = keras.Variable(rng.normal(size=(3, 2)), name="kernel",
                                dtype="float32")
        bias = keras.Variable(rng.normal(size=(2,)), name="bias",
                              dtype="float32")
        zero = keras.Variable(np.zeros((2, 2)), name="zero", dtype="float32")
    with keras.name_scope("head"):
        head = keras.Variable(rng.normal(size=(2, 2)), name="kernel",
                              dtype="float32")
    return [kernel, bias, zero, head]


def test_two_steps_match_hand_computed_values():
    w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    optimizer = clars_tf.CLARS(learning_rate=1.0, momentum=0.9,
                               trust_coefficient=0.01, trust_clip=0.1,
                               epsilon=0.0)
    g = np.array([[0.6, 0.8]], dtype="float32")
    # Step 1: trust = 0.01 * 5 / 2 = 0.025, m = g, w = w - 0.025 * g.
    optimizer.apply([g], [w], gradient_norms=[2.0])
    np.testing.assert_allclose(w.numpy(), [[2.985, 3.98]], rtol=1e-6)
    # Step 2: ||w|| = 4.975, trust = 0.024875, m = 1.9 g.
    optimizer.apply([g], [w], gradient_norms=[2.0])
    np.testing.assert_allclose(w.numpy(), [[2.9566425, 3.94219]], rtol=1e-6)


def test_trust_is_clipped():
    w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    optimizer = clars_tf.CLARS(learning_rate=1.0, trust_clip=0.1, epsilon=0.0)
    # 0.01 * 5 / 0.1 = 0.5 is clipped to 0.1.
    optimizer.apply([np.array([[1.0, 0.0]])], [w], gradient_norms=[0.1])
    np.testing.assert_allclose(w.numpy(), [[2.9, 4.0]], rtol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("decay_excluded", [True, False])
def test_several_steps_match_numpy_reference(nesterov, decay_excluded):
    variables = _variables()
    initial = [v.numpy() for v in variables]
    rng = np.random.default_rng(1)
    steps = 4
    gradients = [[rng.normal(size=v.shape).astype("float32")
                  for v in variables] for _ in range(steps)]
    norms = [[float(x) for x in rng.uniform(0.5, 3.0, size=len(variables))]
             for _ in range(steps)]
    norms[1][0] = 0.0  # a zero estimate falls back to min(clip, 1)
    schedule = keras.optimizers.schedules.PolynomialDecay(
        0.5, decay_steps=steps, end_learning_rate=1e-4, power=2.0)
    optimizer = clars_tf.CLARS(
        schedule, momentum=0.9, nesterov=nesterov, weight_decay_rate=0.01,
        trust_coefficient=0.05, trust_clip=0.2, epsilon=1e-6,
        exclude_from_layer_adaptation=["^head/"],
        decay_excluded_variables=decay_excluded)
    for step_gradients, step_norms in zip(gradients, norms):
        optimizer.apply(step_gradients, variables, gradient_norms=step_norms)
    rates = [float(schedule(t)) for t in range(steps)]
    expected = reference.clars_steps(
        initial, gradients, norms, rates, momentum=0.9, decay=0.01, eta=0.05,
        clip=0.2, epsilon=1e-6, adapted=[True, False, True, False],
        decayed=[True, decay_excluded, True, decay_excluded],
        nesterov=nesterov)
    for variable, want in zip(variables, expected):
        np.testing.assert_allclose(variable.numpy(), want, atol=1e-6)


def test_adaptation_decisions_follow_rank_and_regex():
    variables = _variables()
    optimizer = clars_tf.CLARS(1.0, exclude_from_layer_adaptation="^head/")
    assert [optimizer.is_adapted(v) for v in variables] == [
        True, False, True, False]


def test_apply_without_norms_explains_the_fix():
    w = keras.Variable(np.ones((2, 2)), dtype="float32")
    optimizer = clars_tf.CLARS(0.1)
    with pytest.raises(ValueError, match="attach_gradient_norm_estimator"):
        optimizer.apply([np.ones((2, 2))], [w])
    with pytest.raises(ValueError, match="attach_gradient_norm_estimator"):
        optimizer.apply_gradients([(np.ones((2, 2)), w)])


def test_norms_of_wrong_length_are_rejected():
    w = keras.Variable(np.ones((2, 2)), dtype="float32")
    optimizer = clars_tf.CLARS(0.1)
    with pytest.raises(ValueError, match="gradient_norms"):
        optimizer.apply([np.ones((2, 2))], [w], gradient_norms=[1.0, 2.0])


def test_norms_follow_the_order_of_the_given_variables():
    a = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32", name="a")
    b = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32", name="b")
    optimizer = clars_tf.CLARS(1.0, epsilon=0.0)
    optimizer.build([a, b])
    g = np.array([[0.6, 0.8]], dtype="float32")
    optimizer.apply([g, g], [b, a], gradient_norms=[2.0, 1.0])
    # a got a = 1.0 -> trust 0.05; b got a = 2.0 -> trust 0.025.
    np.testing.assert_allclose(a.numpy(), [[2.97, 3.96]], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), [[2.985, 3.98]], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_variables_take_a_float32_trust_ratio(dtype):
    w = keras.Variable(np.full((1, 400), 100.0), dtype=dtype)
    optimizer = clars_tf.CLARS(1000.0, trust_clip=1.0, epsilon=0.0)
    optimizer.build([w])
    # ||w|| = 2000: its squares sum to 4e6, past float16's 65504.
    # trust = 0.01 * 2000 / 4000 = 0.005, not the clip an overflow gives.
    ratio = float(optimizer.trust_ratios([w], [4000.0])[0])
    assert ratio == pytest.approx(0.005, rel=1e-3)
    optimizer.apply([np.full((1, 400), 0.01)], [w], gradient_norms=[4000.0])
    # A step of 1000 * 0.005 * 0.01 = 0.05, well above the dtype's
    # resolution at 100 (0.0625 in float16, 0.5 in bfloat16 rounds it off).
    np.testing.assert_allclose(
        w.numpy().astype("float32"),
        np.full((1, 400), 100.0 - 0.05).astype(dtype).astype("float32"))


def test_excluded_variables_are_decayed_by_default():
    # The reference code decays every variable (MLPerf's LARS does not).
    bias = keras.Variable(np.array([2.0, -4.0]), dtype="float32")
    optimizer = clars_tf.CLARS(0.5, weight_decay_rate=0.1)
    optimizer.apply([np.zeros(2)], [bias], gradient_norms=[1.0])
    # Trust 1 for a rank-1 variable: w -= 0.5 * 0.1 * w.
    np.testing.assert_allclose(bias.numpy(), [1.9, -3.8], rtol=1e-6)
    assert clars_tf.CLARS(0.5).get_config()["decay_excluded_variables"]


def test_apply_needs_the_estimates_of_this_very_step():
    w = keras.Variable(np.ones((2, 2)), dtype="float32")
    optimizer = clars_tf.CLARS(0.1)
    optimizer.apply([np.ones((2, 2))], [w], gradient_norms=[1.0])
    # Estimates of the previous step are not this step's, eager or traced.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="attach_gradient_norm_estimator"):
        optimizer.apply([np.ones((2, 2))], [w])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="attach_gradient_norm_estimator"):
        tf.function(lambda g: optimizer.apply([g], [w]))(tf.ones((2, 2)))
    step = tf.function(lambda g, a: optimizer.apply([g], [w],
                                                    gradient_norms=[a]))
    step(tf.ones((2, 2)), tf.constant(1.0))
    assert int(optimizer.gradient_norms_step.numpy()) == 1
    assert int(optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("estimate", [float("nan"), float("inf")])
def test_a_nonfinite_estimate_reaches_the_update(estimate):
    # A custom loop, traced: the estimate never becomes a finite step.
    w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    optimizer = clars_tf.CLARS(1.0)

    @tf.function
    def step(gradient, norm):
        optimizer.apply([gradient], [w], gradient_norms=[norm])

    step(tf.constant([[0.6, 0.8]]), tf.constant(estimate))
    assert np.isnan(w.numpy()).all()
    assert np.isnan(float(optimizer.trust_ratios([w], [estimate])[0]))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"trust_clip": 0.0}, "trust_clip"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"weight_decay_rate": -1e-4}, "weight_decay_rate"),
        ({"exclude_from_layer_adaptation": ["("]}, "exclude_from_layer"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    kwargs = {"learning_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        clars_tf.CLARS(**kwargs)


def test_config_round_trip():
    schedule = clars_tf.schedules.LinearWarmup(
        clars_tf.schedules.polynomial_decay(2.0, 100), warmup_steps=10)
    optimizer = clars_tf.CLARS(
        schedule, momentum=0.8, nesterov=True, weight_decay_rate=2e-4,
        trust_coefficient=0.02, trust_clip=0.5, epsilon=1e-5,
        exclude_from_layer_adaptation=["head"], decay_excluded_variables=False)
    restored = keras.optimizers.deserialize(
        keras.optimizers.serialize(optimizer))
    assert isinstance(restored, clars_tf.CLARS)
    config = restored.get_config()
    for key, value in {"momentum": 0.8, "nesterov": True,
                       "weight_decay_rate": 2e-4, "trust_coefficient": 0.02,
                       "trust_clip": 0.5, "epsilon": 1e-5,
                       "exclude_from_layer_adaptation": ["head"],
                       "decay_excluded_variables": False}.items():
        assert config[key] == value
    assert float(restored.learning_rate) == pytest.approx(float(schedule(0)))
    assert float(restored._learning_rate(50)) == pytest.approx(
        float(schedule(50)))


def test_trust_ratios_for_diagnostics():
    variables = _variables()
    optimizer = clars_tf.CLARS(1.0, trust_clip=1.0, epsilon=0.0,
                               exclude_from_layer_adaptation="^head/")
    optimizer.build(variables)
    norms = [2.0, 2.0, 2.0, 2.0]
    ratios = [float(r) for r in optimizer.trust_ratios(variables, norms)]
    kernel_norm = np.linalg.norm(variables[0].numpy())
    # Zero weights fall back to min(clip, 1) = 1; excluded variables use 1.
    assert ratios == pytest.approx([0.01 * kernel_norm / 2.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("estimate, trust", [
    (1e30, 0.01 * 5 / 1e30),  # huge estimate: a vanishing, finite step
    (1e-30, 0.1),             # tiny estimate: epsilon keeps it finite, clip
])
def test_huge_and_tiny_estimates_give_finite_steps(estimate, trust):
    w = keras.Variable(np.array([[3.0, 4.0]]), dtype="float32")
    optimizer = clars_tf.CLARS(1.0)
    optimizer.apply([np.array([[0.6, 0.8]])], [w], gradient_norms=[estimate])
    np.testing.assert_allclose(w.numpy(), [[3.0 - trust * 0.6,
                                            4.0 - trust * 0.8]], rtol=1e-6)


def test_huge_weights_and_gradients_keep_a_finite_trust_ratio():
    # Squares of 1e15 overflow float16 and bfloat16 keeps 3 digits; the
    # norms are taken in float32.
    w = keras.Variable(np.full((1, 100), 1e15), dtype="float32")
    optimizer = clars_tf.CLARS(1e-20, trust_clip=1.0)
    optimizer.apply([np.full((1, 100), 1e15)], [w], gradient_norms=[1e17])
    ratio = float(optimizer.trust_ratios([w], [1e17])[0])
    # ||w|| = 1e16, so the ratio is 0.01 * 1e16 / 1e17.
    assert ratio == pytest.approx(1e-3, rel=1e-3)
    assert np.all(np.isfinite(w.numpy()))


def test_rank_one_variables_adapted_when_asked():
    """The ablation: biases get a trust ratio too; the regex still holds."""
    variables = _variables()
    initial = [v.numpy() for v in variables]
    rng = np.random.default_rng(2)
    gradients = [[rng.normal(size=v.shape).astype("float32")
                  for v in variables] for _ in range(2)]
    norms = [[float(x) for x in rng.uniform(0.5, 3.0, size=len(variables))]
             for _ in range(2)]
    optimizer = clars_tf.CLARS(
        0.5, momentum=0.9, weight_decay_rate=0.01, trust_coefficient=0.05,
        trust_clip=0.2, epsilon=1e-6, exclude_from_layer_adaptation=["^head/"],
        exclude_rank_one_variables=False)
    assert [optimizer.is_adapted(v) for v in variables] == [
        True, True, True, False]
    for step_gradients, step_norms in zip(gradients, norms):
        optimizer.apply(step_gradients, variables, gradient_norms=step_norms)
    expected = reference.clars_steps(
        initial, gradients, norms, [0.5, 0.5], momentum=0.9, decay=0.01,
        eta=0.05, clip=0.2, epsilon=1e-6, adapted=[True, True, True, False],
        decayed=[True, True, True, True], nesterov=False)
    for variable, want in zip(variables, expected):
        np.testing.assert_allclose(variable.numpy(), want, atol=1e-6)
    restored = clars_tf.CLARS.from_config(optimizer.get_config())
    assert restored.exclude_rank_one_variables is False
