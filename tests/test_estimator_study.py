"""The estimator study: eta choice, grid extension and the plan's decision,
on hand-written archives (no trainer runs)."""

import json
import os

import pytest

from experiments import estimator_study
from experiments import runs as runs_lib

PLAN = {
    "title": "Estimator study", "config": "c.yaml", "overrides": [],
    "tuning_seed": 0, "grid": [0.005, 0.01, 0.02], "max_extensions": 2,
    "seeds": [1, 2, 3],
    "arms": {"loop": {"label": "loop", "overrides": []},
             "one_pass": {"label": "one-pass", "overrides": []}},
    "margin_points": 1.0, "cost_file": "cost.json",
}


def _archive(directory, arm, eta, seed, validation, test=None,
             status="done"):
    spec = estimator_study.run_spec(PLAN, arm, eta, seed, final=test is not None)
    path = os.path.join(directory, "runs", spec["run_id"])
    os.makedirs(path)
    runs_lib.write_json(os.path.join(path, "run.json"),
                        dict(spec, status=status))
    runs_lib.write_json(os.path.join(path, "results.json"), {"epochs": [
        {"validation_accuracy": validation, "eval_accuracy": test,
         "train_loss": 0.5}]})


def _outcomes(directory, arm):
    return [o for o in runs_lib.load_archived(
        os.path.join(directory, "runs")).values() if o.record["arm"] == arm]


def test_next_eta_steps_past_the_edge_only():
    assert estimator_study.next_eta([0.005, 0.01, 0.02], 0.02) == 0.04
    assert estimator_study.next_eta([0.005, 0.01, 0.02], 0.005) == 0.0025
    assert estimator_study.next_eta([0.005, 0.01, 0.02], 0.01) is None


def test_chosen_eta_runs_the_grid_then_extends_then_chooses(tmp_path):
    directory = str(tmp_path)
    assert estimator_study.chosen_eta(PLAN, []) == (None, 0.005)
    _archive(directory, "loop", 0.005, 0, 0.80)
    _archive(directory, "loop", 0.01, 0, 0.82)
    assert estimator_study.chosen_eta(
        PLAN, _outcomes(directory, "loop")) == (None, 0.02)
    _archive(directory, "loop", 0.02, 0, 0.85)
    # Best at the top edge: one step further.
    assert estimator_study.chosen_eta(
        PLAN, _outcomes(directory, "loop")) == (None, 0.04)
    _archive(directory, "loop", 0.04, 0, 0.84)
    assert estimator_study.chosen_eta(
        PLAN, _outcomes(directory, "loop")) == (0.02, None)


def test_chosen_eta_stops_after_max_extensions(tmp_path):
    directory = str(tmp_path)
    for eta, accuracy in [(0.005, 0.80), (0.01, 0.81), (0.02, 0.82),
                          (0.04, 0.83), (0.08, 0.84)]:
        _archive(directory, "loop", eta, 0, accuracy)
    assert estimator_study.chosen_eta(
        PLAN, _outcomes(directory, "loop")) == (0.08, None)


def _tuned_and_seeded(directory, loop_tests, one_pass_tests):
    for arm in ("loop", "one_pass"):
        for eta, accuracy in [(0.005, 0.80), (0.01, 0.85), (0.02, 0.82)]:
            _archive(directory, arm, eta, 0, accuracy)
    for seed, (loop, one_pass) in enumerate(zip(loop_tests, one_pass_tests),
                                            start=1):
        _archive(directory, "loop", 0.01, seed, 0.85, loop)
        _archive(directory, "one_pass", 0.01, seed, 0.85, one_pass)


def _write_cost(directory, loop_ratio, one_pass_ratio, monkeypatch):
    with open(os.path.join(directory, "cost.json"), "w") as f:
        # As benchmarks.train_step --output writes it (fields trimmed).
        json.dump({"timing": {
            "sgd": {"median_ratio": 1.0},
            "clars_s8_j16": {"median_ratio": loop_ratio},
            "one_pass_s8_j16": {"median_ratio": one_pass_ratio}}}, f)
    monkeypatch.setattr(runs_lib, "REPO_ROOT", directory)


def test_report_makes_one_pass_default_when_no_worse_and_cheaper(
        tmp_path, monkeypatch):
    directory = str(tmp_path)
    # Differences +0.2, -0.2, 0.0 points: mean 0, sd 0.2, t(0.975, 2) =
    # 4.303: half-width 4.303 * 0.2 / sqrt(3) = 0.497.
    _tuned_and_seeded(directory, [0.900, 0.910, 0.905],
                      [0.902, 0.908, 0.905])
    _write_cost(directory, 1.4, 1.1, monkeypatch)
    text = open(estimator_study.report(PLAN, directory)).read()
    assert "mean +0.00 points, 95 % interval [-0.50, +0.50]" in text
    assert "step cost one-pass / loop: 0.79" in text
    assert "one-pass becomes the trainer's default, eta 0.01" in text


@pytest.mark.parametrize("one_pass_tests, loop_ratio, reason", [
    # Differences -1, -3, -2: mean -2, interval -2 -/+ 2.48: (a) fails.
    ([0.89, 0.88, 0.885], 1.4, "(a) is not shown"),
    ([0.902, 0.908, 0.905], 1.0, "(b) is not shown"),
])
def test_report_keeps_the_loop_and_says_why(tmp_path, monkeypatch,
                                            one_pass_tests, loop_ratio,
                                            reason):
    directory = str(tmp_path)
    _tuned_and_seeded(directory, [0.900, 0.910, 0.905], one_pass_tests)
    _write_cost(directory, loop_ratio, 1.1, monkeypatch)
    text = open(estimator_study.report(PLAN, directory)).read()
    assert f"the loop stays the trainer's default**: {reason}" in text


def test_report_waits_for_every_seed(tmp_path, monkeypatch):
    directory = str(tmp_path)
    _tuned_and_seeded(directory, [0.90, 0.91], [0.90, 0.91])
    _write_cost(directory, 1.4, 1.1, monkeypatch)
    text = open(estimator_study.report(PLAN, directory)).read()
    assert "Not decided: 2 of 3 seeds paired so far." in text


def test_a_failed_run_stops_the_study_instead_of_retrying(tmp_path,
                                                          monkeypatch):
    executed = []

    class CrashingRun:
        def __init__(self, spec, work_dir, archive_dir, threads=0):
            self.run_id, self.command = spec["run_id"], "python3 -m trainers"
            self.model_dir = os.path.join(work_dir, spec["run_id"])

        def status(self):
            return "failed" if executed else "pending"

        def record(self):
            return {"error": "No module named 'absl'"}

        def execute(self):
            executed.append(self.run_id)
            assert len(executed) == 1, f"retried: {executed}"
            return "failed", 0.0

    monkeypatch.setattr(runs_lib, "Run", CrashingRun)
    args = estimator_study.parse_args(
        ["--results_dir", str(tmp_path), "--work_dir", str(tmp_path / "w")])
    with pytest.raises(SystemExit) as stopped:
        estimator_study.Study(PLAN, args).run_arm("loop")
    assert executed == ["loop/eta0.005_s0"]
    message = str(stopped.value.code)
    assert "loop/eta0.005_s0 failed: No module named 'absl'" in message
    assert "train.log" in message and "resumes" in message


class _RecordingRun:
    """Stands in for runs_lib.Run: archives a finished run when executed."""
    executed = []

    def __init__(self, spec, work_dir, archive_dir, threads=0):
        self.spec, self.archive_dir = spec, archive_dir
        self.run_id, self.command = spec["run_id"], "python3 -m trainers"

    def status(self):
        return "pending"

    def execute(self):
        _RecordingRun.executed.append(self.run_id)
        _archive(os.path.dirname(self.archive_dir), self.spec["arm"],
                 self.spec["eta"], self.spec["seed"], 0.8,
                 0.8 if self.spec["seed"] else None)
        return "done", 0.0


def _study(tmp_path, monkeypatch, *flags):
    _RecordingRun.executed = []
    monkeypatch.setattr(runs_lib, "Run", _RecordingRun)
    args = estimator_study.parse_args(
        ["--results_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"),
         *flags])
    return estimator_study.Study(PLAN, args)


def test_seeds_split_a_tuned_arm(tmp_path, monkeypatch):
    for eta, accuracy in [(0.005, 0.80), (0.01, 0.85), (0.02, 0.82)]:
        _archive(str(tmp_path), "one_pass", eta, 0, accuracy)
    _study(tmp_path, monkeypatch, "--seeds", "3,1").run_arm("one_pass")
    assert _RecordingRun.executed == ["one_pass/eta0.01_s3",
                                      "one_pass/eta0.01_s1"]


def test_seeds_refuse_an_untuned_arm(tmp_path, monkeypatch):
    _archive(str(tmp_path), "one_pass", 0.005, 0, 0.80)
    with pytest.raises(SystemExit, match="tuning finished"):
        _study(tmp_path, monkeypatch, "--seeds", "1").run_arm("one_pass")
    assert _RecordingRun.executed == []


def test_seeds_outside_the_plan_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(runs_lib.REPO_ROOT)  # main's chdir, undone after
    with pytest.raises(SystemExit, match=r"--seeds: \[7\] not in"):
        estimator_study.main(["--plan", "configs/estimator_study/plan.yaml",
                              "--seeds", "7", "--results_dir", str(tmp_path)])
