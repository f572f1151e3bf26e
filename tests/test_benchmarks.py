"""What the benchmark scripts share (benchmarks/common.py): the per-round
rows, the columns their tables print and the JSON they write."""

import json
import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows():
    times = {"sgd": [2.0, 4.0, 3.0], "clars": [3.0, 5.0, 6.0]}
    cpu_times = {"sgd": [1.0, 1.0, 1.0], "clars": [2.0, 2.0, 2.0]}
    shares = {"sgd": [0.5, 0.9, 0.7], "clars": [0.4, 0.8, 0.6]}
    return common.per_round_rows(times, cpu_times, shares, "sgd")


def test_rows_hold_the_ratio_to_the_unit_in_the_same_round():
    rows = _rows()
    assert rows["clars"] == {"seconds": [3.0, 5.0, 6.0],
                             "cpu_seconds": [2.0, 2.0, 2.0],
                             "cpu_share": [0.4, 0.8, 0.6],
                             "ratios": [1.5, 1.25, 2.0]}
    assert rows["sgd"]["ratios"] == [1.0, 1.0, 1.0]


def test_ratio_columns_print_median_range_and_cpu_share():
    # Widths 6, 5..<5 and 5, as under the tables' headers.
    assert common.ratio_columns(_rows()["clars"]) == (
        "  1.50  1.25..2.00   0.60")


def test_results_are_written_beside_the_environment(tmp_path):
    path = tmp_path / "out.json"
    common.write_results(str(path), {"batch_size": 64}, candidates=_rows())
    written = json.loads(path.read_text())
    assert written["candidates"] == _rows()
    environment = written["environment"]
    assert environment["batch_size"] == 64
    assert environment["tensorflow"] == tf.__version__
    assert environment["keras"] == keras.__version__
    assert environment["cpu_count"] == os.cpu_count()


def test_trainer_throughput_summary_checks_the_targets_on_medians():
    from benchmarks import trainer_throughput

    rates = {"pipeline": [500.0, 400.0, 600.0],
             "model_step": [100.0, 100.0, 100.0],
             "trainer": [80.0, 90.0, 70.0],
             "fit": [95.0, 120.0, 60.0]}
    summary = trainer_throughput.summarise(rates)
    assert summary["pipeline_over_model_step"] == [5.0, 4.0, 6.0]
    # Per round, against the faster of model_step (100) and fit.
    assert summary["trainer_over_faster_of_model_step_and_fit"] == [
        0.8, 0.75, 0.7]
    assert summary["pipeline_target_met"]  # median 5.0 >= 5
    assert not summary["trainer_target_met"]  # median 0.75 < 1 / 1.2


def test_trainer_throughput_steady_state_leaves_out_each_rounds_first_epoch():
    from benchmarks import trainer_throughput

    # Epochs of 4, 2 and 3 s in a round of 10 s: steady epochs of 2.5 s,
    # and 10 - 3 * 2.5 = 2.5 s of the round beyond them.
    rate, rest = trainer_throughput.steady_state(10.0, [4.0, 2.0, 3.0], 600)
    assert rate == pytest.approx(600 / 2.5)
    assert rest == pytest.approx(2.5)


def test_trainer_throughput_runs_and_reports_every_candidate(tmp_path):
    """A tiny run (synthetic data, 512-example batches, 15 steps an epoch):
    every candidate timed each round; the pipeline's and the model step's
    images/s their images over their seconds, the trainer's and fit's
    from their epochs after each round's first; the ratios those of the
    rates."""
    output = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.trainer_throughput",
         "--models=sigmoid_mlp", "--rounds=2", "--epochs=2",
         "--pipeline_batches=3", "--model_steps=2", f"--output={output}",
         "--overrides=task.dataset=synthetic,task.validation_examples=192,"
         "train.global_batch_size=512,train.eval_batch_size=192"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())
    assert written["environment"]["rounds"] == 2
    run = written["results"]["sigmoid_mlp"]
    assert run["batch_size"] == 512
    assert run["steps_per_epoch"] == (8192 - 192) // 512
    epoch = 15 * 512
    images = {"pipeline": 3 * 512, "model_step": 2 * 512,
              "trainer": 2 * epoch, "fit": 2 * epoch}
    rates = {}
    for name, count in images.items():
        row = run["candidates"][name]
        assert row["images"] == count
        assert len(row["seconds"]) == 2 and min(row["seconds"]) > 0
        for clock, per_second in (("", "second"), ("cpu_", "cpu_second")):
            if name in ("trainer", "fit"):
                # Epoch 2 of each round alone sets the rate; the rest of
                # the round is start-up (round 1) or restart (round 2).
                per_epoch = row[f"epoch_{clock}seconds"]
                assert [len(s) for s in per_epoch] == [2, 2]
                steady = [seconds[1] for seconds in per_epoch]
                expected = [epoch / s for s in steady]
                rests = [total - 2 * s
                         for total, s in zip(row[f"{clock}seconds"], steady)]
                assert row[f"start_up_{clock}seconds"] == pytest.approx(
                    rests[0])
                assert row[f"restart_{clock}seconds"] == pytest.approx(
                    rests[1:])
            else:
                expected = [count / s for s in row[f"{clock}seconds"]]
            assert row[f"images_per_{per_second}"] == pytest.approx(expected)
        assert all(0 < share <= 1.5 for share in row["cpu_share"])
        rates[name] = row["images_per_second"]
    assert set(run["one_time_seconds"]) == {"decode", "trainer_build",
                                            "fit_build"}
    assert written["environment"]["import_seconds"] > 0
    for r in range(2):
        assert run["pipeline_over_model_step"][r] == pytest.approx(
            rates["pipeline"][r] / rates["model_step"][r])
        assert run["trainer_over_faster_of_model_step_and_fit"][
            r] == pytest.approx(rates["trainer"][r] / max(
                rates["model_step"][r], rates["fit"][r]))
    cpu_rates = {name: run["candidates"][name]["images_per_cpu_second"]
                 for name in images}
    assert run["on_cpu_time"]["trainer_over_faster_of_model_step_and_fit"] == (
        pytest.approx([cpu_rates["trainer"][r] / max(
            cpu_rates["model_step"][r], cpu_rates["fit"][r])
                       for r in range(2)]))
    assert "pipeline / model_step" in result.stdout
    assert "trainer: start-up" in result.stdout


def test_paired_extra_is_per_round_over_the_unit_with_its_t_interval():
    seconds = {"sgd": [1.0, 2.0, 1.0], "without": [1.5, 2.8, 1.6],
               "with": [1.6, 3.0, 1.6]}
    rows = {name: {"seconds": times, "cpu_seconds": [2 * t for t in times]}
            for name, times in seconds.items()}
    extra = common.paired_extra(rows, "with", "without", "sgd")
    # Per round 0.1, 0.1, 0.0 steps of sgd; mean 1/15, sd 0.0577,
    # t(0.975, 2) = 4.303: half-width 4.303 * 0.0577 / sqrt(3) = 0.1434.
    # Doubling every CPU time leaves the ratios as they are.
    for clock in ("wall", "cpu"):
        assert extra[clock] == pytest.approx(
            (0.1, 1 / 15, 1 / 15 - 0.14342, 1 / 15 + 0.14342), abs=1e-4)


def test_one_pass_probe_times_the_probe_beside_the_step_trace():
    """plain_cnn: six convolutions and two Dense layers, all readable and
    none coupled; one row with the probe's and the trace's seconds."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.one_pass_probe",
         "--models=plain_cnn", "--image_size=8", "--num_classes=3"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line.split() for line in result.stdout.splitlines()
               if line.startswith("plain_cnn"))
    assert row[1] == "8" and len(row) == 7
    assert all(float(seconds) > 0 for seconds in row[2:6])


def _check_run(one_pass, unchecked, checked):
    def row(seconds):
        return {"seconds": seconds, "cpu_seconds": [s / 2 for s in seconds],
                "cpu_share": [0.9] * len(seconds), "ratios": seconds}

    return {"sgd": row([1.0] * len(one_pass)), "one_pass": row(one_pass),
            "one_pass_unchecked": row(unchecked),
            "one_pass_checked_every_step": row(checked)}


def test_pooled_rows_put_several_runs_rounds_one_after_another():
    first = _check_run([1.1, 1.2], [1.0, 1.1], [1.4, 1.6])
    second = _check_run([1.0], [1.0], [1.5])
    rows = common.pooled_rows([first, second])
    assert rows["one_pass"]["seconds"] == [1.1, 1.2, 1.0]
    assert rows["one_pass"]["cpu_seconds"] == [0.55, 0.6, 0.5]
    # Skipped check: 0.1, 0.1, 0.0 of an SGD step over the pooled rounds.
    median, mean, _, _ = common.paired_extra(
        rows, "one_pass", "one_pass_unchecked", "sgd")["wall"]
    assert median == pytest.approx(0.1) and mean == pytest.approx(0.2 / 3)
    with pytest.raises(ValueError, match="different candidates"):
        common.pooled_rows([first, {"sgd": first["sgd"]}])


def test_paired_of_prints_the_pooled_checks_amortised_cost_and_bound(
        tmp_path):
    """In a subprocess: importing the benchmark here would define its absl
    flags a second time in a worker that holds another benchmark's."""
    paths = []
    for index, run in enumerate((
            _check_run([1.1, 1.2], [1.0, 1.1], [1.4, 1.6]),
            _check_run([1.0], [1.0], [1.5]))):
        paths.append(tmp_path / f"run{index}.json")
        paths[-1].write_text(json.dumps({"candidates": run}))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.one_pass_fallback",
         "--paired_of=" + ",".join(map(str, paths))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 run(s), 3 paired rounds" in result.stdout
    # Skipped 0.1, 0.1, 0.0 and checked 0.4, 0.5, 0.5 of an SGD step: both
    # spreads 0.0577, so each mean's interval reaches 4.303 * 0.0577 / 3**0.5
    # = 0.1434 above it (t at 2 degrees of freedom). Amortised over 100
    # steps: 0.1 + 0.5 / 100, at most (0.0667 + 0.1434) + (0.4667 +
    # 0.1434) / 100. Halved CPU seconds give the same ratios.
    for clock in ("wall", "cpu"):
        line = next(line for line in result.stdout.splitlines()
                    if line.strip().startswith(clock + ":"))
        assert "amortised 0.105, at most 0.216 at" in line, line
