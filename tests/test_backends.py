"""CLARS and LARS give the same numbers on every Keras backend.

Keras reads KERAS_BACKEND once, at import, so each backend runs
`tests/backend_runs.py` in a subprocess of its own; its fits are compared
with each other and with float64 NumPy references of the spec
(`reference.py`). JAX is part of the test extra; PyTorch is not (its wheel
from the package index brings GBs of CUDA libraries), so its run happens
only where `torch` is installed.
"""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import backend_runs
import clars_tf
import reference

_HERE = os.path.dirname(os.path.abspath(__file__))
FLOAT32 = {"rtol": 2e-5, "atol": 2e-6}
OTHER_BACKENDS = [backend for backend in ("jax", "torch")
                  if importlib.util.find_spec(backend) is not None]


def _readme_jax_example():
    """The code of the README's `KERAS_BACKEND=jax python3 -c "..."`."""
    with open(os.path.join(os.path.dirname(_HERE), "README.md"),
              encoding="utf-8") as f:
        return re.search(r'^KERAS_BACKEND=jax python3 -c "(.*?)"$', f.read(),
                         re.S | re.M).group(1)


def _start(backend, command):
    environment = dict(os.environ, KERAS_BACKEND=backend,
                       TF_CPP_MIN_LOG_LEVEL="2",
                       # Two host devices for the DataParallel check.
                       XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.Popen(
        [sys.executable, *command], env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs():
    """What `backend_runs.py` printed by backend, and the README example's
    output under "readme_jax" (all run in parallel)."""
    runner = [os.path.join(_HERE, "backend_runs.py")]
    processes = {backend: _start(backend, runner)
                 for backend in ["tensorflow"] + OTHER_BACKENDS}
    if "jax" in OTHER_BACKENDS:
        processes["readme_jax"] = _start("jax", ["-c", _readme_jax_example()])
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, (name, stderr[-3000:])
        results[name] = stdout if name == "readme_jax" else json.loads(stdout)
    return results


def _assert_weights_close(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        np.testing.assert_allclose(np.array(got), np.array(want), **FLOAT32)


def _linear_gradients(weights, x, y):
    """Float64 gradients of the batch-mean MSE of `x @ kernel + bias`."""
    kernel, bias = weights
    residual = x @ kernel + bias - y
    scale = 2.0 / residual.size
    return [scale * x.T @ residual, scale * residual.sum(axis=0)]


def _linear_estimate(weights, x, y):
    """Spec step 1 for the linear model, micro-batch j from floor(j B / J)."""
    count = backend_runs.ESTIMATOR["num_micro_batches"]
    size = backend_runs.ESTIMATOR["micro_batch_size"]
    norms = []
    for j in range(count):
        rows = slice(j * len(x) // count, j * len(x) // count + size)
        norms.append([np.linalg.norm(g) for g in
                      _linear_gradients(weights, x[rows], y[rows])])
    return np.mean(norms, axis=0)


def _batches():
    x, targets, _ = backend_runs.data()
    x, targets = x.astype(np.float64), targets.astype(np.float64)
    for start in range(0, len(x), backend_runs.BATCH):
        yield (x[start:start + backend_runs.BATCH],
               targets[start:start + backend_runs.BATCH])


def _initial_linear_weights():
    return [np.array(v, np.float64) for v in backend_runs.initial_values(
        backend_runs.linear_model())]


def _expected_linear_fit(step):
    """The linear fit in float64: `step(weights, buffers, x, y, t)` per
    batch t."""
    weights = _initial_linear_weights()
    buffers = [np.zeros_like(w) for w in weights]
    for t, (x, y) in enumerate(_batches()):
        weights = step(weights, buffers, x, y, t)
    return weights


def _clars_stepper(refresh_every):
    estimates = []

    def step(weights, buffers, x, y, t):
        if t % refresh_every == 0:
            estimates.append(_linear_estimate(weights, x, y))
        return _clars_step(weights, buffers, x, y, estimates[-1])

    return step


def _clars_step(weights, buffers, x, y, estimate):
    settings = backend_runs.CLARS_SETTINGS
    return reference.clars_step(
        weights, buffers, _linear_gradients(weights, x, y),
        estimate, settings["learning_rate"],
        momentum=settings["momentum"], decay=settings["weight_decay_rate"],
        eta=settings["trust_coefficient"], clip=settings["trust_clip"],
        epsilon=settings["epsilon"], adapted=[True, False],
        decayed=[True, True])


def _lars_step(weights, velocities, x, y, _):
    settings = backend_runs.LARS_SETTINGS
    return reference.lars_step(
        weights, velocities, _linear_gradients(weights, x, y),
        settings["learning_rate"], momentum=settings["momentum"],
        decay=settings["weight_decay_rate"],
        eta=settings["trust_coefficient"], epsilon=0.0, adapted=[True, False])


@pytest.mark.parametrize("backend", ["tensorflow"] + OTHER_BACKENDS)
def test_linear_fits_match_the_float64_reference(runs, backend):
    fits = runs[backend]["fits"]
    _assert_weights_close(fits["linear_clars"],
                          _expected_linear_fit(_clars_stepper(1)))
    _assert_weights_close(fits["linear_clars_refresh_every_2"],
                          _expected_linear_fit(_clars_stepper(2)))
    _assert_weights_close(fits["linear_lars"], _expected_linear_fit(_lars_step))


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("fit", ["batch_norm_clars", "recurrent_clars"])
def test_fits_match_tensorflow(runs, backend, fit):
    # Batch norm: micro-batch statistics in the estimate, full batch in
    # the step (and the moving statistics, compared too), as the loop does.
    _assert_weights_close(runs[backend]["fits"][fit],
                          runs["tensorflow"]["fits"][fit])


def test_the_fits_move_the_weights(runs):
    # Otherwise equal fits could be equal for want of training.
    fits = runs["tensorflow"]["fits"]
    start = _initial_linear_weights()
    for name in ("linear_clars", "linear_lars"):
        assert not np.allclose(fits[name][0], start[0], atol=1e-3), name


jax_only = pytest.mark.skipif("jax" not in OTHER_BACKENDS,
                              reason="jax is not installed")


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_vectorised_estimate_is_exact_and_chunking_keeps_it(runs, backend):
    x, y = next(_batches())
    expected = _linear_estimate(_initial_linear_weights(), x, y)
    np.testing.assert_allclose(runs[backend]["estimate"], expected, **FLOAT32)
    np.testing.assert_allclose(runs[backend]["estimate_chunked"], expected,
                               **FLOAT32)


@jax_only
def test_lars_matches_optax_without_weight_decay(runs):
    # optax divides by ||g + wd w||, MLPerf (ours) by ||g|| + wd ||w||:
    # the two agree when wd = 0.
    _assert_weights_close(runs["jax"]["lars_keras"], runs["jax"]["lars_optax"])


@jax_only
def test_data_parallel_estimate_equals_one_device(runs):
    assert runs["jax"]["data_parallel_devices"] == 2
    _assert_weights_close(runs["jax"]["data_parallel_batch_norm_clars"],
                          runs["jax"]["fits"]["batch_norm_clars"])


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_fit_without_the_estimator_names_the_missing_line(runs, backend):
    assert "attach_gradient_norm_estimator(model)" in (
        runs[backend]["missing_estimator_error"])


@jax_only
def test_readme_fit_example_trains_on_jax(runs):
    history = ast.literal_eval(runs["readme_jax"].strip().splitlines()[-1])
    assert len(history["loss"]) == 2 and np.all(np.isfinite(history["loss"]))


def test_chunk_follows_the_memory_budget():
    variables = [np.zeros((100, 10)), np.zeros((10,))]  # 4040 float32 bytes
    estimator = clars_tf.VmapGradientNormEstimator(
        8, 64, chunk_memory_bytes=4040 * 5)
    assert estimator.micro_batches_per_chunk(variables) == 5
    assert clars_tf.VmapGradientNormEstimator(
        8, 64).micro_batches_per_chunk(variables) == 64
    assert clars_tf.VmapGradientNormEstimator(
        8, 4, chunk_size=16).micro_batches_per_chunk(variables) == 4
    assert clars_tf.VmapGradientNormEstimator(
        8, 64, chunk_memory_bytes=1).micro_batches_per_chunk(variables) == 1


def test_micro_batches_are_the_loop_estimators():
    estimator = clars_tf.VmapGradientNormEstimator(micro_batch_size=2,
                                                   num_micro_batches=3)
    np.testing.assert_array_equal(estimator.micro_batch_indices(10),
                                  [[0, 1], [3, 4], [6, 7]])
    with pytest.raises(ValueError, match="needs 3 micro-batches of 2"):
        estimator.micro_batch_indices(5)


def test_only_the_loop_estimators_definition_carries_over():
    loop = clars_tf.GradientNormEstimator(4, 16, refresh_every=3)
    vectorised = clars_tf.VmapGradientNormEstimator.like(loop)
    assert (vectorised.micro_batch_size, vectorised.num_micro_batches,
            vectorised.refresh_every) == (4, 16, 3)
    with pytest.raises(ValueError, match="one-pass estimator exists on "
                       "TensorFlow only"):
        clars_tf.VmapGradientNormEstimator.like(
            clars_tf.OnePassGradientNormEstimator(4, 16))
