"""rerun_check: where two runs part, the code a run recorded, and reruns."""

import json
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from experiments import rerun_check
from experiments import runs as runs_lib


def _record(step, loss, accuracy, rate=0.1, images_per_second=1000.0):
    return {"step": step, "epoch": step / 4, "loss": loss,
            "accuracy": accuracy, "learning_rate": rate,
            "skipped_steps": 0, "images_per_second": images_per_second}


def _write_steps(directory, records):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "steps.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_first_step_difference_names_step_field_and_both_values():
    archived = {s: _record(s, 2.0 / s, 0.25) for s in (1, 2, 3, 4)}
    rerun = {s: dict(r, images_per_second=5.0) for s, r in archived.items()}
    # The throughput alone differs: identical.
    assert rerun_check.first_step_difference(archived, rerun) is None
    # One example of 2048 at step 3, one ulp of the loss at step 4: step 3.
    rerun[3] = dict(rerun[3], accuracy=0.25 + 1 / 2048)
    rerun[4] = dict(rerun[4], loss=np.nextafter(0.5, 1.0))
    assert rerun_check.first_step_difference(archived, rerun) == {
        "step": 3, "field": "accuracy", "archived": 0.25,
        "rerun": 0.25048828125}
    del rerun[3]
    assert rerun_check.first_step_difference(archived, rerun) == {
        "step": 3, "field": "step", "archived": 3, "rerun": None}


def test_a_log_converted_record_is_compared_as_printed():
    # train.log printed loss and accuracy with 4 decimals, lr with 4
    # significant digits, and no skipped_steps.
    converted = {1: {"step": 1, "epoch": 0.04, "loss": 3.5843,
                     "accuracy": 0.0898, "learning_rate": 0.1393,
                     "images_per_second": 224.0},
                 2: {"step": 2, "epoch": 0.08, "loss": 2.8498,
                     "accuracy": 0.0947, "learning_rate": 0.1371,
                     "images_per_second": 17079.0}}
    exact = {1: _record(1, 3.58432126045227, 0.08984375,
                        rate=0.13928499817848206),
             2: _record(2, 2.849812984466553, 0.0947265625,
                        rate=0.13714100420475006)}
    exact[1]["epoch"], exact[2]["epoch"] = 1 / 26, 2 / 26
    assert rerun_check.is_printed(converted)
    assert not rerun_check.is_printed(exact)
    assert rerun_check.first_step_difference(converted, exact,
                                             printed=True) is None
    # 2.84986 prints as 2.8499, not 2.8498: a difference below 1e-4.
    exact[2]["loss"] = 2.84986
    assert rerun_check.first_step_difference(converted, exact,
                                             printed=True) == {
        "step": 2, "field": "loss", "archived": 2.8498, "rerun": 2.84986}
    # Exactly compared, the converted records differ at once.
    assert rerun_check.first_step_difference(converted, exact)["step"] == 1


def test_step_records_fall_back_to_the_log(tmp_path):
    (tmp_path / "train.log").write_text(
        "\n=== 2026-12-02T01:52:13 python3 -m trainers.train\n"
        "step 1/130 epoch 0.04 loss 3.5843 accuracy 0.0898 lr 0.1393 224 "
        "images/s ETA 19m38s\n"
        "step 2/130 epoch 0.08 loss 2.8498 accuracy 0.0947 lr 0.1371 17079 "
        "images/s ETA 15s\n")
    assert rerun_check.step_records(str(tmp_path)) == {
        1: {"step": 1, "epoch": 0.04, "loss": 3.5843, "accuracy": 0.0898,
            "learning_rate": 0.1393},
        2: {"step": 2, "epoch": 0.08, "loss": 2.8498, "accuracy": 0.0947,
            "learning_rate": 0.1371}}
    _write_steps(str(tmp_path), [_record(1, 1.5, 0.5)])
    assert rerun_check.step_records(str(tmp_path)) == {1: _record(1, 1.5, 0.5)}


def test_first_epoch_difference():
    archived = [{"epoch": 1, "step": 26, "train_accuracy": 0.1,
                 "images_per_second": 10.0},
                {"epoch": 2, "step": 52, "train_accuracy": 0.2759165,
                 "validation_loss": 2.254106}]
    rerun = [dict(archived[0], images_per_second=99.0),
             dict(archived[1], train_accuracy=0.2758977)]
    assert rerun_check.first_epoch_difference(archived, archived) is None
    assert rerun_check.first_epoch_difference(archived, rerun) == {
        "epoch": 2, "field": "train_accuracy", "archived": 0.2759165,
        "rerun": 0.2758977}
    assert rerun_check.first_epoch_difference(archived, rerun[:1]) == {
        "epoch": 2, "field": "epoch", "archived": 2, "rerun": None}


def _save_checkpoints(model_dir, kernels_by_step):
    kernel = tf.Variable(np.zeros([2, 2], "float32"), name="kernel")
    count = tf.Variable(0, dtype="int64", name="iterations")
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(kernel=kernel, iterations=count),
        os.path.join(model_dir, "checkpoints"), max_to_keep=None)
    for step, value in kernels_by_step.items():
        kernel.assign(value)
        count.assign(step)
        manager.save(checkpoint_number=step)


def test_first_checkpoint_difference_names_step_variable_and_size(tmp_path):
    base = np.arange(4, dtype="float32").reshape(2, 2)
    nudged = base.copy()
    nudged[1, 0] = np.nextafter(base[1, 0], np.float32(3.0))  # one ulp
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    _save_checkpoints(first, {5: base, 10: base, 15: base})
    _save_checkpoints(second, {5: base, 10: nudged, 15: nudged})
    assert sorted(rerun_check.checkpoint_steps(first)) == [5, 10, 15]
    assert rerun_check.first_checkpoint_difference(first, first) == (3, None)
    compared, difference = rerun_check.first_checkpoint_difference(first,
                                                                   second)
    assert compared == 2
    # kernel, iterations and the checkpoint's own save_counter were saved.
    assert difference == {
        "step": 10, "tensors_differing": "1 of 3",
        "tensors": {"kernel": {"elements": "1 of 4",
                               "max_abs_difference": 2.0 ** -22}}}
    assert float(nudged[1, 0]) - 2.0 == 2.0 ** -22


def test_tensor_difference_is_bitwise():
    assert rerun_check.tensor_difference(np.float32([np.nan, 1.0]),
                                         np.float32([np.nan, 1.0])) is None
    assert rerun_check.tensor_difference(np.float32([0.0]),
                                         np.float32([-0.0])) == {
        "elements": "1 of 1", "max_abs_difference": 0.0}
    assert rerun_check.tensor_difference(np.zeros([2]), np.zeros([3])) == {
        "shapes": [[2], [3]], "dtypes": ["float64", "float64"]}


def _git(repo, *arguments):
    return subprocess.run(["git", "-C", str(repo), *arguments], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    path.mkdir()
    _git(path, "init", "-q")
    _git(path, "config", "user.email", "t@example.com")
    _git(path, "config", "user.name", "t")
    (path / "trainer.py").write_text("VERSION = 1\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "first")
    return path


def test_code_version_is_the_commit_and_whether_code_changed(repo, tmp_path):
    commit = _git(repo, "rev-parse", "HEAD")
    assert runs_lib.code_version(str(repo)) == {
        "commit": commit, "dirty": False, "changed_files": []}
    # Results and logs written beside the code do not make it dirty.
    (repo / "results.json").write_text("{}")
    (repo / "train.log").write_text("step 1")
    assert runs_lib.code_version(str(repo))["dirty"] is False
    (repo / "trainer.py").write_text("VERSION = 2\n")
    (repo / "package").mkdir()
    (repo / "package" / "new_module.py").write_text("")
    assert runs_lib.code_version(str(repo)) == {
        "commit": commit, "dirty": True,
        "changed_files": ["package/new_module.py", "trainer.py"]}
    outside = tmp_path / "not_a_checkout"
    outside.mkdir()
    assert runs_lib.code_version(str(outside)) == {
        "commit": None, "dirty": None, "changed_files": []}


def test_checkout_is_a_temporary_worktree_at_the_commit(repo):
    first = _git(repo, "rev-parse", "HEAD")
    (repo / "trainer.py").write_text("VERSION = 2\n")
    _git(repo, "commit", "-qam", "second")
    with rerun_check.checkout(first, repo=str(repo)) as code_root:
        with open(os.path.join(code_root, "trainer.py")) as f:
            assert f.read() == "VERSION = 1\n"
    assert not os.path.exists(code_root)
    assert str(repo) in _git(repo, "worktree", "list")
    assert len(_git(repo, "worktree", "list").splitlines()) == 1
    with rerun_check.checkout(None, repo=str(repo)) as code_root:
        assert code_root == str(repo)


def test_recorded_code_says_what_a_rerun_can_restore():
    clean = {"commit": "a" * 40, "dirty": False, "changed_files": []}
    assert rerun_check.recorded_code({"attempts": [{"code": clean}]}) == (
        "a" * 40, "at its recorded commit aaaaaaaaaaaa")
    dirty = dict(clean, dirty=True, changed_files=["trainers/train.py"])
    commit, note = rerun_check.recorded_code(
        {"attempts": [{"code": clean}, {"code": dirty}]})
    assert commit == "a" * 40 and "uncommitted changes to trainers/train.py" \
        in note
    commit, note = rerun_check.recorded_code(
        {"attempts": [{"code": clean}, {"code": dict(clean,
                                                     commit="b" * 40)}]})
    assert commit == "a" * 40 and "resumed at bbbbbbbbbbbb" in note
    assert rerun_check.recorded_code({"attempts": [{"threads": 1}]}) == (
        None, "its run.json records no commit")


def test_trainer_of_the_archived_command():
    assert rerun_check.trainer_of({"command": (
        "python3 -m tests.stand_in_trainer --config_file=c.yaml")}) == (
        "tests.stand_in_trainer")
    assert rerun_check.trainer_of({}) == "trainers.train"


def _archived_stand_in_run(tmp_path, code_root=runs_lib.REPO_ROOT):
    spec = {"run_id": "pilot/b8/sgd/lr0.4_w1_e2_s0", "config": "s.yaml",
            "overrides": ["optimizer.base_learning_rate=0.4",
                          "optimizer.warmup_epochs=1", "train.seed=0",
                          "train.eval_splits=validation"]}
    run = runs_lib.Run(spec, str(tmp_path / "work"), str(tmp_path / "runs"),
                       trainer="tests.stand_in_trainer", threads=1,
                       code_root=code_root)
    assert run.execute()[0] == "done"
    return run


def test_a_run_records_its_code_and_environment(tmp_path):
    record = _archived_stand_in_run(tmp_path).record()
    attempt = record["attempts"][0]
    assert attempt["code"] == runs_lib.code_version()
    assert attempt["environment"]["cpu"]
    assert attempt["threads"] == 1


def test_rerun_of_an_archived_run(tmp_path, capsys):
    run = _archived_stand_in_run(tmp_path)
    verdict_path = tmp_path / "verdict.json"
    # At the commit the run recorded, a temporary worktree.
    assert rerun_check.main([run.archive, "--work_dir",
                             str(tmp_path / "rerun"), "--output",
                             str(verdict_path)]) == 0
    verdict = json.loads(verdict_path.read_text())
    assert verdict["identical"] and verdict["steps_compared"] == 8
    assert verdict["step_precision"] == "exact"
    assert verdict["code"].startswith(
        f"at its recorded commit {runs_lib.code_version()['commit'][:12]}")
    assert verdict["first_step_difference"] is None
    assert json.loads(capsys.readouterr().out) == verdict
    # The archived results altered by one example: found, exit code 1.
    with open(os.path.join(run.archive, "steps.jsonl")) as f:
        records = [json.loads(line) for line in f]
    records[5]["accuracy"] += 1 / 2048
    _write_steps(run.archive, records)
    assert rerun_check.main([run.archive, "--work_dir",
                             str(tmp_path / "rerun2"), "--commit", "HEAD",
                             "--output", str(verdict_path)]) == 1
    verdict = json.loads(verdict_path.read_text())
    assert verdict["first_step_difference"] == {
        "step": 6, "field": "accuracy", "archived": 0.5 + 1 / 2048,
        "rerun": 0.5}
    # The same --work_dir again: a fresh rerun, not a resumed one.
    assert rerun_check.main([run.archive, "--work_dir",
                             str(tmp_path / "rerun2")]) == 1
    rerun = runs_lib.Outcome(str(tmp_path / "rerun2" / "archive" / "rerun"))
    assert len(rerun.record["attempts"]) == 1


def test_the_commit_a_run_without_one_most_likely_ran(repo):
    def commit_at(date, message, path="trainer.py", text=None):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text or message)
        _git(repo, "add", "-A")
        subprocess.run(["git", "-C", str(repo), "commit", "-qm", message],
                       check=True, env=dict(os.environ,
                                            GIT_COMMITTER_DATE=date,
                                            GIT_AUTHOR_DATE=date))
        return _git(repo, "rev-parse", "HEAD")

    ran = commit_at("2026-12-02T01:37:49", "the code the run ran")
    commit_at("2026-12-02T02:00:00", "changed while it ran")
    record = {"attempts": [{"started": "2026-12-02T01:52:13"}]}
    commit_at("2026-12-02T02:10:18", "archived", "runs/a/run.json",
              json.dumps(record))
    commit_at("2026-12-02T03:00:00", "later")
    assert rerun_check.archiving_commit_guess(
        str(repo / "runs" / "a"), record, repo=str(repo)) == ran
    assert rerun_check.archiving_commit_guess(
        str(repo / "runs" / "b"), record, repo=str(repo)) is None


def test_a_run_on_default_threads_is_rerun_with_its_machines_cores(
        tmp_path):
    spec = {"run_id": "r", "config": "s.yaml",
            "overrides": ["optimizer.base_learning_rate=0.4",
                          "optimizer.warmup_epochs=1", "train.seed=0",
                          "train.eval_splits=validation"]}
    run = runs_lib.Run(spec, str(tmp_path / "work"), str(tmp_path / "runs"),
                       trainer="tests.stand_in_trainer")
    assert run.execute()[0] == "done"
    record = run.record()
    assert record["attempts"][0]["threads"] == "default"
    record["attempts"][0]["environment"]["cores"] = 3
    runs_lib.write_json(os.path.join(run.archive, "run.json"), record)
    verdict_path = tmp_path / "verdict.json"
    assert rerun_check.main([run.archive, "--work_dir", str(tmp_path / "re"),
                             "--output", str(verdict_path)]) == 0
    verdict = json.loads(verdict_path.read_text())
    assert verdict["threads"] == 3
    assert verdict["environment_differences"]["threads"] == {
        "archived": "default", "rerun": 3}
    with open(tmp_path / "re" / "rerun" / "train.log") as f:
        assert "intra-op threads 3" in f.read()
