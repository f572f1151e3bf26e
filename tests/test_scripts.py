"""The measurement scripts in scripts/ still run against today's trainer."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_pass_batch_norm_measures_one_for_a_group_spanning_the_batch(
        tmp_path, fashion_mnist_dir):
    # One micro-batch of the whole batch: the main pass's batch-norm
    # statistics are the group's own, so the one-pass estimate equals the
    # loop's and every ratio the script reports is 1.
    output = tmp_path / "ratios.json"
    result = subprocess.run(
        [sys.executable, "scripts/one_pass_batch_norm.py", "--models=resnet8",
         "--batch_size=32", "--micro_batch_size=32", "--num_micro_batches=1",
         "--train_steps=1", f"--data_dir={fashion_mnist_dir}",
         f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(output.read_text())["results"]["resnet8"]
    for moment in ("init", "after_1_steps"):
        low, high = measured[moment]["ratio_one_pass_to_loop_min_max"]
        assert low == pytest.approx(1.0, rel=1e-3)
        assert high == pytest.approx(1.0, rel=1e-3)


def _install(env_dir, **env):
    return subprocess.run(
        ["bash", "scripts/install.sh"], cwd=REPO, capture_output=True,
        text=True, timeout=600,
        env={**os.environ, "CLARS_VENV": str(env_dir), **env})


def _stub_environment(directory, exit_code):
    """An environment whose python answers every command with pip-like
    output and `exit_code`: the stages run without touching a real one
    (the suite's own may be in use by other test processes)."""
    (directory / "bin").mkdir()
    python = directory / "bin" / "python"
    python.write_text("#!/bin/sh\necho 'pip said: Successfully installed'\n"
                      f"exit {exit_code}\n")
    python.chmod(0o755)
    return directory


def test_install_prints_one_line_per_stage(tmp_path):
    result = _install(_stub_environment(tmp_path, 0))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "data", "environment", "packages"], result.stdout
    assert result.stderr == ""


def test_install_shows_a_failing_stages_output(tmp_path):
    result = _install(_stub_environment(tmp_path, 1))
    assert result.returncode == 1
    assert "pip said: Successfully installed" in result.stderr
    assert "install: failed while packages" in result.stderr
    assert "pip said" not in result.stdout


def test_install_names_a_missing_interpreter(tmp_path):
    result = _install(tmp_path / "venv", PYTHON=str(tmp_path / "python3"))
    assert result.returncode == 1
    assert "set PYTHON=/path/to/python3" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_install_refuses_a_folder_that_is_not_an_environment(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = _install(tmp_path)
    assert result.returncode == 1
    assert "is not a virtual environment" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
