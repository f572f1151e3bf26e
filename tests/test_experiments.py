"""The study's plan and report, on run files written here by hand."""

import json
import os

from experiments import report, study


def _write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if isinstance(content, str):
            f.write(content)
        else:
            json.dump(content, f)


def _results(method, rate, seed, accuracies):
    name = "lars" if method.startswith("lars") else (
        "sgd" if method.startswith("sgd") else method)
    epochs = [{"epoch": e + 1, "step": 14 * (e + 1),
               "train_loss": 1.0 / (e + 1), "eval_accuracy": accuracy}
              for e, accuracy in enumerate(accuracies)]
    return {
        "config": {
            "task": {"dataset": "fashion_mnist", "image_size": 32},
            "model": {"name": "resnet8"},
            "train": {"global_batch_size": 4096, "seed": seed, "epochs": 2},
            "optimizer": {"name": name, "base_learning_rate": rate,
                          "reference_batch_size": 128,
                          "warmup_epochs": 0.5 if "warmup" in method
                          and "nowarmup" not in method else 0.0},
        },
        "steps_per_epoch": 14,
        "epochs": epochs,
        "final": {"eval_accuracy": accuracies[-1], "step": 28},
    }


PLAN = {
    "batch_sizes": [4096], "epochs": 2, "seeds": [0, 1],
    "targets": [0.7, 0.8], "warmup_epochs_used": 0.5,
    "methods": {
        "clars": {"label": "CLARS", "grid": [0.1, 0.3]},
        "sgd_warmup": {"label": "SGD + warmup", "grid": [0.1, 0.3]},
    },
}

# (method, rate, seed): test accuracy after each of the 2 epochs.
FINISHED = {
    ("clars", 0.1, 0): [0.72, 0.81],
    ("clars", 0.3, 0): [0.70, 0.75],
    ("clars", 0.1, 1): [0.68, 0.79],
    ("sgd_warmup", 0.3, 0): [0.50, 0.60],
    ("sgd_warmup", 0.3, 1): [0.55, 0.65],
}


def _make_study(root):
    output_dir = os.path.join(root, "study")
    _write(os.path.join(output_dir, "study.json"),
           {"command": "python3 -m experiments.study", "plan": PLAN,
            "finished": "2026-11-29T00:00:00"})
    for (method, rate, seed), accuracies in FINISHED.items():
        run_dir = os.path.join(output_dir, "b4096", method,
                               f"lr{rate:g}_s{seed}")
        _write(os.path.join(run_dir, "results.json"),
               _results(method, rate, seed, accuracies))
        _write(os.path.join(run_dir, "train.log"),
               "step 1/28 epoch 0.07 loss 2.3 accuracy 0.1 lr 0.5 1.0 "
               "images/s\n")
    diverged = os.path.join(output_dir, "b4096", "sgd_warmup", "lr0.1_s0")
    _write(os.path.join(diverged, "run.json"), {
        "run_id": "b4096/sgd_warmup/lr0.1_s0", "method": "sgd_warmup",
        "batch_size": 4096, "base_learning_rate": 0.1, "seed": 0,
        "status": "diverged", "command": "python3 -m trainers.train ...",
        "error": "Non-finite gradient at step 3 in conv1/kernel."})
    _write(os.path.join(output_dir, "b4096", "clars", "lr0.1_s0",
                        "diagnostics.jsonl"),
           '{"step": 4, "layers": {"conv/kernel": {"trust_ratio": 0.1, '
           '"noise_ratio": 3.0}}}\n{"step": 8, "lay')  # cut by a kill
    return output_dir


def _add_clars_run_off_the_grid(output_dir, accuracies):
    """A seed-0 CLARS run at 0.03, below the plan's grid (0.1, 0.3)."""
    _write(os.path.join(output_dir, "b4096", "clars", "lr0.03_s0",
                        "results.json"),
           _results("clars", 0.03, 0, accuracies))


def _table_rows(text, first_cell):
    return [line for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


def _write_report(output_dir, report_dir):
    path = report.Report(output_dir, report_dir).write()
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_main_table_has_hand_computed_summary(tmp_path):
    text = _write_report(_make_study(str(tmp_path)), str(tmp_path / "out"))
    clars_row = _table_rows(text, "CLARS")[0]
    # Best rate 0.1 (0.81 > 0.75), peak 0.1 * 4096 / 128 = 3.2; seeds 0 and
    # 1 end at 81 and 79: mean 80, sd sqrt(2) = 1.41. 70 % is first reached
    # after epochs 1 and 2 (mean 1.5); 80 % only by seed 0, after epoch 2.
    assert "| 0.1 (3.2) | 80.00 ± 1.41 (79.00–81.00, n=2) |" in clars_row
    assert "| 1.5 | 2 (1/2 seeds) |" in clars_row
    sgd_row = _table_rows(text, "SGD + warmup")[0]
    # 0.1 diverged, so 0.3 is best: 60 and 65, sd 5 / sqrt(2) = 3.54.
    assert "| 0.3 (9.6) | 62.50 ± 3.54 (60.00–65.00, n=2) |" in sgd_row
    assert "| not reached | not reached |" in sgd_row
    # 80 - 62.5 points, outside the larger seed range (65 - 60 = 5).
    assert ("CLARS is 17.50 points higher than SGD + warmup (outside the "
            "larger min–max range over seeds, 5.00 points)") in text
    assert "1 of 2 tuning rates diverged" in text
    assert "0.1: diverged (step 3)" in text


def test_tuning_table_marks_best_rate_and_grid_edge(tmp_path):
    text = _write_report(_make_study(str(tmp_path)), str(tmp_path / "out"))
    clars_tuning = _table_rows(text, "CLARS")[1]
    assert "**0.1: 81.00 [1]**" in clars_tuning
    assert "0.3: 75.00" in clars_tuning
    assert "best at the grid's edge" in clars_tuning


def test_runs_off_the_grid_are_listed_but_never_chosen(tmp_path):
    output_dir = _make_study(str(tmp_path))
    _add_clars_run_off_the_grid(output_dir, [0.85, 0.90])
    text = _write_report(output_dir, str(tmp_path / "out"))
    clars_row, clars_tuning = _table_rows(text, "CLARS")[:2]
    assert "| 0.1 (3.2) | 80.00 ± 1.41" in clars_row
    assert "also run: 0.03: 90.00" in clars_tuning
    assert "the optimum may lie outside it" in clars_tuning


def test_edge_note_says_when_rates_beyond_the_edge_did_worse(tmp_path):
    output_dir = _make_study(str(tmp_path))
    _add_clars_run_off_the_grid(output_dir, [0.60, 0.70])
    text = _write_report(output_dir, str(tmp_path / "out"))
    clars_tuning = _table_rows(text, "CLARS")[1]
    assert ("best at the grid's edge; the rates also run beyond that edge "
            "did worse") in clars_tuning


def test_rate_run_beyond_the_edge_joins_the_grid(tmp_path):
    output_dir = _make_study(str(tmp_path))
    _add_clars_run_off_the_grid(output_dir, [0.60, 0.70])
    with open(os.path.join(output_dir, "study.json")) as f:
        manifest = json.load(f)
    manifest["tuning"] = {"4096": {"clars": {"beyond_edge": 0.03}}}
    _write(os.path.join(output_dir, "study.json"), manifest)
    text = _write_report(output_dir, str(tmp_path / "out"))
    clars_tuning = _table_rows(text, "CLARS")[1]
    assert "0.03: 70.00 [" in clars_tuning
    assert "(beyond the edge)" in clars_tuning
    assert "edge" not in clars_tuning.split("|")[-2]  # 0.1 is inside now


class _FinishedRun:
    def __init__(self, rate, accuracy):
        self.rate, self.accuracy = rate, accuracy

    def final_accuracy(self):
        return self.accuracy


def test_study_tries_one_rate_past_the_edge_where_the_best_sits():
    spec = {"grid": [0.03, 0.1, 0.3], "beyond_edges": [0.01, 1.0]}
    runs = [_FinishedRun(0.03, 0.5), _FinishedRun(0.1, 0.4),
            _FinishedRun(0.3, None)]
    assert study.best_run(runs).rate == 0.03
    assert study.rate_beyond_edge(spec, study.best_run(runs)) == 0.01
    assert study.rate_beyond_edge(spec, _FinishedRun(0.3, 0.9)) == 1.0
    assert study.rate_beyond_edge(spec, _FinishedRun(0.1, 0.9)) is None
    assert study.rate_beyond_edge({"grid": [0.1, 0.3]},
                                  _FinishedRun(0.1, 0.9)) is None
    assert study.best_run([_FinishedRun(0.1, None)]) is None


def test_study_runs_grid_then_edge_then_seed_reruns(tmp_path, monkeypatch):
    accuracy_by_rate = {0.03: 0.5, 0.1: 0.6, 0.3: 0.4, 1.0: 0.2}
    executed = []

    def fake_execute(run):
        executed.append(run.run_id)
        _write(os.path.join(study.REPO_ROOT, run.results_path),
               {"config": {"train": {"epochs": 2, "max_steps": 0}},
                "final": {"eval_accuracy": accuracy_by_rate[run.rate]}})
        return "done", 1.0

    monkeypatch.setattr(study.Run, "execute", fake_execute)
    plan = {"batch_sizes": [4096], "epochs": 2, "max_steps": 0,
            "seeds": [0, 1], "warmup_epochs_used": 0.5,
            "methods": {"lars_warmup": {
                "config": "configs/study/lars_warmup.yaml",
                "grid": [0.1, 0.3, 1.0], "beyond_edges": [0.03, 3.0],
                "warmup": True}}}
    args = type("Args", (), {"retry_failed": False, "data_dir": None})()
    output_dir = str(tmp_path / "study")
    study.Study(plan, args, output_dir).run()
    # 0.1 is best of the grid and at its lower edge: 0.03 is tried, loses,
    # and 0.1 is rerun with seed 1.
    assert executed == [f"b4096/lars_warmup/lr{rate}_s0"
                        for rate in ("0.1", "0.3", "1", "0.03")] + [
                            "b4096/lars_warmup/lr0.1_s1"]
    with open(os.path.join(output_dir, "study.json")) as f:
        tuning = json.load(f)["tuning"]["4096"]["lars_warmup"]
    assert tuning["beyond_edge"] == 0.03
    assert tuning["best_learning_rate"] == 0.1
    assert sorted(tuning["grid"]) == ["0.03", "0.1", "0.3", "1"]

    executed.clear()  # a second start finds every run done
    study.Study(plan, args, output_dir).run()
    assert executed == []


def test_report_copies_run_files_and_regenerates_from_the_copy(tmp_path):
    output_dir = _make_study(str(tmp_path))
    report_dir = str(tmp_path / "out")
    first = _write_report(output_dir, report_dir)
    archive = os.path.join(report_dir, report.ARCHIVE_DIR)
    for name in ("results.json", "diagnostics.jsonl", "train.log"):
        with open(os.path.join(output_dir, "b4096/clars/lr0.1_s0", name),
                  "rb") as original, open(os.path.join(
                      archive, "b4096/clars/lr0.1_s0", name), "rb") as copy:
            assert copy.read() == original.read()
    assert os.path.exists(os.path.join(archive, "study.json"))
    assert "([files](runs/b4096/clars/lr0.1_s0/))" in first

    again = _write_report(archive, report_dir)
    for cell in ("CLARS", "SGD + warmup"):
        assert _table_rows(again, cell) == _table_rows(first, cell)
    assert sorted(os.listdir(os.path.join(archive, "b4096"))) == [
        "clars", "sgd_warmup"]


def test_rewritten_archive_drops_runs_that_are_gone(tmp_path):
    output_dir = _make_study(str(tmp_path))
    report_dir = str(tmp_path / "out")
    _write_report(output_dir, report_dir)
    gone = os.path.join(output_dir, "b4096", "sgd_warmup", "lr0.3_s1")
    for name in os.listdir(gone):
        os.remove(os.path.join(gone, name))
    os.rmdir(gone)
    _write_report(output_dir, report_dir)
    archive = os.path.join(report_dir, report.ARCHIVE_DIR, "b4096",
                           "sgd_warmup")
    assert sorted(os.listdir(archive)) == ["lr0.1_s0", "lr0.3_s0"]


def test_study_plan_runs_every_grid_point_and_reruns_best_rate(capsys):
    study.main(["--dry_run"])
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if line.startswith("python3 -m")]
    # 2 batch sizes x 4 methods x 3 rates, then 1 rerun seed per method.
    assert len(commands) == 24
    assert lines[-1] == "# 32 runs, and up to 8 more beyond grid edges"
    assert all("train.epochs=2" in command for command in commands)
    warmups = {c.split("--config_file=configs/study/")[1].split(".yaml")[0]:
               c.split("optimizer.warmup_epochs=")[1].split(",")[0]
               for c in commands}
    assert warmups == {"clars": "0.0", "sgd_warmup": "0.5",
                       "lars_warmup": "0.5", "sgd_nowarmup": "0.0"}
