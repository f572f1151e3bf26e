"""The second warmup study and its report, with a scripted stand-in trainer."""

import json
import os

import pytest
import yaml

from experiments import runs as runs_lib
from experiments import warmup_report
from experiments import warmup_study

PLAN = {
    "validation_examples": 5000, "tuning_seed": 0, "max_extensions": 3,
    "pilot": {"models": ["small_cnn"], "batch_size": 4096, "epochs": 2,
              "warmup_epochs": 1.0, "grid": [0.1, 0.2, 0.4, 0.8],
              "gap_points": 2.0, "confirm_seeds": [10]},
    "comparison": {
        "model": "small_cnn", "batch_sizes": [4096], "epochs": 2,
        "warmup_epochs": 1.0, "warmup_variants": [0.5], "seeds": [1, 2],
        "targets": [0.8], "diagnostics_every_steps": 1,
        "methods": {
            "clars": {"label": "CLARS", "config": "c.yaml", "warmup": False,
                      "grid": [0.8, 1.6]},
            "sgd_warmup": {"label": "SGD + warmup", "config": "s.yaml",
                           "warmup": True, "grid": [0.2, 0.4, 0.8]},
        },
        "ablations": {"clars_clip_only": {
            "label": "clip only",
            "overrides": ["clars.trust_coefficient=1.0e+12"]}},
    },
}


def _study(tmp_path, *flags):
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(PLAN))
    return warmup_study.main([
        f"--plan={plan_path}", f"--work_dir={tmp_path / 'work'}",
        f"--archive_dir={tmp_path / 'results' / 'runs'}",
        "--trainer=tests.stand_in_trainer", *flags])


def _archived(tmp_path):
    return runs_lib.load_archived(str(tmp_path / "results" / "runs"))


def _rates(outcomes, method):
    return sorted(o.record["base_learning_rate"] for o in outcomes.values()
                  if o.record["method"] == method)


def test_rate_beyond_edge():
    assert warmup_study.rate_beyond_edge([0.1, 0.2, 0.4], 0.1) == 0.05
    assert warmup_study.rate_beyond_edge([0.1, 0.2, 0.4], 0.4) == 0.8
    assert warmup_study.rate_beyond_edge([0.1, 0.2, 0.4], 0.2) is None
    # A sqrt(2) grid of rounded rates: 0.0707 * 1.41421 = 0.09998,
    # 0.0125 / 1.41421 = 0.008839.
    grid = [0.0125, 0.0177, 0.025, 0.0354, 0.05, 0.0707]
    assert warmup_study.rate_beyond_edge(grid, 0.0707) == 0.1
    assert warmup_study.rate_beyond_edge(grid, 0.0125) == 0.00884


def test_max_hours_stops_before_a_run_and_rerun_continues(tmp_path):
    assert _study(tmp_path, "--stage=pilot", "--max_hours=0.001") == 3
    assert _archived(tmp_path) == {}
    assert _study(tmp_path, "--stage=pilot") == 0
    outcomes = _archived(tmp_path)
    # Warmup peaks at 0.4 (interior); no warmup at 0.2, also interior.
    # Seed 10 confirms the chosen rates (0.4 with warmup, 0.2 without).
    assert _rates(outcomes, "sgd_warmup") == [0.1, 0.2, 0.4, 0.4, 0.8]
    assert _rates(outcomes, "sgd_nowarmup") == [0.1, 0.2, 0.2, 0.4, 0.8]
    assert "pilot/small_cnn/b4096/sgd_warmup/lr0.4_w1_e2_s10" in outcomes
    run = next(iter(outcomes.values()))
    assert run.record["attempts"][0]["returncode"] == 0
    assert "--mode=train" in run.record["command"]
    mtimes = {r: os.path.getmtime(os.path.join(o.directory, "run.json"))
              for r, o in outcomes.items()}
    assert _study(tmp_path, "--stage=pilot") == 0  # nothing left to run
    assert mtimes == {r: os.path.getmtime(os.path.join(o.directory,
                                                       "run.json"))
                      for r, o in _archived(tmp_path).items()}


def test_methods_split_over_two_processes_give_the_same_runs(tmp_path):
    together, apart = tmp_path / "together", tmp_path / "apart"
    together.mkdir(), apart.mkdir()
    assert _study(together, "--stage=pilot") == 0
    assert _study(apart, "--stage=pilot", "--methods=sgd_nowarmup",
                  "--threads=1") == 0
    assert _rates(_archived(apart), "sgd_warmup") == []
    assert _study(apart, "--stage=pilot", "--methods=sgd_warmup") == 0
    assert set(_archived(together)) == set(_archived(apart))
    # Comparison methods split the same way; ablations follow CLARS.
    assert _study(apart, "--stage=compare", "--methods=clars") == 0
    compare = {r for r in _archived(apart) if r.startswith("compare/")}
    assert {r.split("/")[2] for r in compare} == {"clars", "clars_clip_only"}
    threaded = _archived(apart)["pilot/small_cnn/b4096/sgd_nowarmup/"
                                "lr0.2_w0_e2_s10"]
    assert threaded.record["attempts"][0]["threads"] == 1
    with open(os.path.join(threaded.directory, "train.log")) as log:
        assert "intra-op threads 1" in log.read()


def test_unknown_method_is_refused(tmp_path):
    try:
        _study(tmp_path, "--stage=pilot", "--methods=sgd_warmup,adam")
    except SystemExit as stop:
        assert "unknown method(s) adam" in str(stop)
    else:
        raise AssertionError("an unknown method was accepted")


def test_grid_extends_past_the_edge_until_the_best_is_interior(tmp_path):
    PLAN["pilot"]["grid"] = [0.8, 1.6]
    try:
        _study(tmp_path, "--stage=pilot")
    finally:
        PLAN["pilot"]["grid"] = [0.1, 0.2, 0.4, 0.8]
    outcomes = _archived(tmp_path)
    # Best at the lower edge each time: 0.4, then 0.2 (warmup's peak at 0.4
    # is then interior); without warmup down to 0.1.
    assert _rates(outcomes, "sgd_warmup") == [0.2, 0.4, 0.4, 0.8, 1.6]
    assert _rates(outcomes, "sgd_nowarmup") == [0.1, 0.2, 0.2, 0.4, 0.8,
                                                1.6]


def test_comparison_needs_a_pilot_gap_then_tunes_varies_and_reseeds(
        tmp_path, capsys):
    _study(tmp_path, "--stage=pilot")
    # The stand-in's gap is 5 points: the comparison runs.
    assert _study(tmp_path, "--stage=compare") == 0
    outcomes = _archived(tmp_path)
    compare = {o.run_id for o in outcomes.values()
               if o.record["stage"] == "compare"}
    # CLARS (no warmup) peaks at 0.2: grid 0.8, 1.6 extended down to 0.1.
    for rate in ("0.1", "0.2", "0.4", "0.8", "1.6"):
        assert f"compare/b4096/clars/lr{rate}_w0_e2_s0" in compare
    assert "compare/b4096/sgd_warmup/lr0.4_w0.5_e2_s0" in compare
    for seed in (1, 2):
        assert f"compare/b4096/clars/lr0.2_w0_e2_s{seed}" in compare
        assert f"compare/b4096/sgd_warmup/lr0.4_w1_e2_s{seed}" in compare
        assert f"compare/b4096/clars_clip_only/lr0.2_w0_e2_s{seed}" in compare
    seed_run = outcomes["compare/b4096/clars_clip_only/lr0.2_w0_e2_s1"]
    assert "clars.trust_coefficient=1.0e+12" in seed_run.record["overrides"]
    assert "train.eval_splits=validation+test" in seed_run.record["overrides"]
    assert seed_run.test_accuracy is not None
    tuning_run = outcomes["compare/b4096/clars/lr0.2_w0_e2_s0"]
    assert tuning_run.test_accuracy is None  # never measured for tuning


def test_no_pilot_gap_stops_the_comparison(tmp_path):
    PLAN["pilot"]["gap_points"] = 10.0
    try:
        _study(tmp_path, "--stage=pilot")
        try:
            _study(tmp_path, "--stage=compare")
        except SystemExit as stop:
            assert "no warmup gap" in str(stop)
        else:
            raise AssertionError("the comparison ran without a gap")
    finally:
        PLAN["pilot"]["gap_points"] = 2.0


def test_report_from_archive_hand_computed(tmp_path):
    _study(tmp_path, "--stage=pilot")
    _study(tmp_path, "--stage=compare")
    plan_path = tmp_path / "plan.yaml"
    warmup_report.main([f"--plan={plan_path}",
                        f"--results_dir={tmp_path / 'results'}"])
    text = (tmp_path / "results" / "results.md").read_text()
    # Pilot: warmup 0.9 at 0.4, without 0.85 at 0.2 (seed 0); seed 10 adds
    # 0.01 to each: the means differ by 5.0 points.
    assert "mean over 2 and 2 seed(s): gap +5.0 points" in text
    assert "lr0.4_w1_e2_s10: 91.0 %" in text
    assert "**Warmup gap in this setting: yes**" in text
    assert ("SGD without warmup is worse than SGD with warmup by the "
            "pilot's rule (best-rate gap +5.0 points") in text
    # 2 epochs of 4 steps; a 1-epoch warmup is 4 steps.
    assert "Each run: 8 steps (4 per epoch); a 1-epoch warmup is 4 steps" in (
        text)
    # Early loss over the first 20 % of 8 steps (steps 1 and 2) at rate 0.4:
    # mean(2/1 + 0.4, 2/2 + 0.4) = 1.9.
    row = next(line for line in text.splitlines()
               if line.startswith("| 0.4 |"))
    assert row.split("|")[4].strip() == "1.900"
    # Fresh seeds 1 and 2 of CLARS at 0.2: test 0.85 - 0.02 + 0.001 * seed.
    clars = next(line for line in text.splitlines()
                 if line.startswith("| CLARS | 0.2"))
    assert "83.1 (83.1-83.2, n=2)" in clars
    # CLARS (no warmup) vs SGD + warmup (test 0.88 + ...): -5.0 points at
    # both seeds, so the interval has no width.
    assert ("CLARS minus SGD + warmup, test accuracy paired by seed (1: -5.0, "
            "2: -5.0): mean -5.0 points, 95 % interval [-5.0, -5.0] (1 degree "
            "of freedom): CLARS lower.") in text
    # Two comparisons (CLARS vs SGD + warmup and vs clip only); only the
    # first excludes 0 at 1 - 0.05/2.
    assert ("- 2 comparisons above" in text and "the intervals that exclude "
            "0: Batch 4096: CLARS minus SGD + warmup (-5.0 to -5.0).") in text
    # CLARS's best is 0.2 at 85.0 %, 1 point lower per factor 2: within 1
    # point 0.1-0.4, within 2 points 0.1-0.8 (0.05 was not run), within 5
    # points 0.1-1.6.
    assert "| x4 | x8 | x16 |" in next(line for line in text.splitlines()
                                       if line.startswith("| CLARS | 0.1:"))
    # The first CLARS seed logs diagnostics; over steps 1-2 (20 % of 8):
    # conv at the clip both steps, dense's a_l/||g_l|| median of 1.5 and 3.
    assert "| conv/kernel | 0.200 | 100 % | 3.00 | 2 |" in text
    assert "| dense/kernel | 0.010 | 0 % | 2.25 | 2 |" in text
    assert ("the trust of 1 of 2 kernels sat at the 0.1 clip in every logged "
            "step (conv/kernel): on those layers and steps CLARS acted as "
            "the clip-only ablation, its estimate unused; over the whole run, "
            "steps at the clip: conv/kernel 100 %, dense/kernel 0 %.") in text
    for name in ("pilot_small_cnn_b4096_rates.png",
                 "compare_small_cnn_b4096_early_loss.png"):
        assert f"![]({name})" in text
        assert (tmp_path / "results" / name).stat().st_size > 1000


class _SeedRun:
    """An archived fresh-seed run reduced to what the verdict reads."""

    def __init__(self, seed, test_accuracy):
        self.record = {"seed": seed}
        self.test_accuracy = test_accuracy


def test_verdict_states_the_warmup_problem_before_clars():
    runs = {"sgd_warmup": [_SeedRun(1, 0.72), _SeedRun(2, 0.74),
                           _SeedRun(3, 0.75)],
            "sgd_nowarmup": [_SeedRun(1, 0.70), _SeedRun(2, 0.71),
                             _SeedRun(3, 0.71)]}
    labels = {"sgd_warmup": "SGD + warmup", "sgd_nowarmup": "SGD, no warmup"}
    lines, compared = warmup_report._verdict(8192, runs, labels)
    # Per seed +2, +3, +4: mean 3, s = 1, half-width t(0.975, 2) / sqrt(3)
    # = 4.303 / 1.732 = 2.48 (a t table), so [+0.5, +5.5].
    assert lines == [
        "- Batch 8192, the warmup problem: SGD + warmup minus SGD, no "
        "warmup, test accuracy paired by seed (1: +2.0, 2: +3.0, 3: +4.0): "
        "mean +3.0 points, 95 % interval [+0.5, +5.5] (2 degrees of "
        "freedom): SGD + warmup higher.",
        "- Batch 8192: CLARS's seed runs are not done."]
    assert len(compared) == 1


def test_undetectable_difference_says_what_it_allows():
    # Per seed -1, +1, +3: mean 1, s = 2, half-width 4.303 * 2 / sqrt(3) =
    # 4.97; 80 % power needs (4.303 + 1.061) * 2 / sqrt(3) = 6.19 points.
    assert warmup_report._reading([-1.0, 1.0, 3.0], "CLARS") == (
        "mean +1.0 points, 95 % interval [-4.0, +6.0] (2 degrees of "
        "freedom): not detectable with 3 seeds (with this spread, the "
        "smallest true gap found 80 % of the time is about 6.2 points); the "
        "interval allows CLARS to be up to 4.0 points lower or 6.0 higher.")


def test_multiplicity_counts_comparisons_and_applies_bonferroni():
    # At 1 - 0.05/2 with 2 degrees of freedom, t = 6.205 (a t table):
    # +2, +3, +4 gives 3 +- 3.58 (spans 0); 4.9, 5, 5.1 gives 5 +- 0.36.
    (line,) = warmup_report.multiplicity_lines(
        [("A minus B", [2.0, 3.0, 4.0]), ("C minus D", [4.9, 5.0, 5.1])])
    assert line.startswith("- 2 comparisons above")
    assert "about 0.1 of them" in line
    assert line.endswith("(each interval at 97.50 %), the intervals that "
                         "exclude 0: C minus D (+4.6 to +5.4).")


class _Scored:
    """An archived run reduced to what pilot_verdict reads."""

    def __init__(self, rate, accuracy, status="done"):
        self.record = {"base_learning_rate": rate, "seed": 0}
        self.status, self.validation_accuracy = status, accuracy

    def score(self):
        return None if self.validation_accuracy is None else (
            self.validation_accuracy, 0.0)


def _verdict(warm, cold):
    return runs_lib.pilot_verdict(
        [_Scored(r, a, *s) for r, a, *s in warm],
        [_Scored(r, a, *s) for r, a, *s in cold], gap_points=2.0)


def test_pilot_verdict_rules():
    # More failures without warmup, but its best is 8.2 points higher: no.
    verdict = _verdict([(0.1, 0.628), (0.2, 0.630), (0.4, 0.397)],
                       [(0.1, 0.712), (0.2, 0.463), (0.4, 0.132)])
    assert round(verdict["gap"], 1) == -8.2
    assert (verdict["bad_warm"], verdict["bad_cold"]) == (0, 1)
    assert not verdict["shows"]
    # Same best within 2 points, but no-warmup diverges at more rates: yes.
    assert _verdict([(0.1, 0.70), (0.2, 0.71), (0.4, 0.69)],
                    [(0.1, 0.715), (0.2, None, "diverged"),
                     (0.4, None, "diverged")])["shows"]
    # Warmup's best more than 2 points higher: yes.
    assert _verdict([(0.1, 0.75)], [(0.1, 0.72)])["shows"]
    assert _verdict([(0.1, 0.75)], [(0.1, None, "failed")]) is None


def test_gate_from_the_plans_rule(tmp_path):
    gate_plan = dict(PLAN, gate={"margin_points": 2.0, "rate_ratio": 0.5,
                                 "trains_within_points": 5.0},
                     pilot=dict(PLAN["pilot"], confirm_seeds=[1, 2, 3],
                                confirm_splits="validation+test",
                                overrides=["model.options.hidden_layers=8"]))
    del gate_plan["comparison"]
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(gate_plan))
    assert warmup_study.main([
        f"--plan={plan_path}", f"--work_dir={tmp_path / 'work'}",
        f"--archive_dir={tmp_path / 'results' / 'runs'}",
        "--trainer=tests.stand_in_trainer", "--stage=pilot"]) == 0
    outcomes = _archived(tmp_path)
    assert all("model.options.hidden_layers=8" in o.record["overrides"]
               for o in outcomes.values())
    verdict = warmup_report.gate_verdict(gate_plan, outcomes, "small_cnn")
    # Chosen: 0.4 with warmup (90 %), 0.2 without (85 %); test accuracy at
    # seeds 1-3 differs by exactly 5 points: rule (a) holds.
    assert sorted(verdict["paired"]) == [1, 2, 3]
    assert all(abs(d - 5.0) < 1e-9 for d in verdict["paired"].values())
    assert verdict["by_margin"]
    # Trains: validation >= 90 - 5 = 85 %. With warmup every grid rate
    # (85-90 %) up to the top, 0.8; without only 0.2 (85 %, 1 point lower
    # per factor 2): 0.2 <= 0.5 * 0.8, rule (b) holds too.
    assert (verdict["largest_warm"], verdict["largest_cold"]) == (0.8, 0.2)
    assert verdict["warm_at_top"] and verdict["by_rate"] and verdict["passed"]
    warmup_report.main([f"--plan={plan_path}",
                        f"--results_dir={tmp_path / 'results'}"])
    text = (tmp_path / "results" / "results.md").read_text()
    assert "- **Gate, small_cnn: passed**." in text
    assert ("with warmup 0.8 (the top of its grid: a lower bound), without "
            "0.2. Rule (b): met.") in text


def test_sharpness_of_a_quadratic_is_its_top_eigenvalue():
    import keras
    import numpy as np

    from experiments import sharpness

    # A linear model under half the squared error has the Hessian X^T X / n
    # in its weights, whatever the weights are.
    inputs = np.random.default_rng(0).standard_normal((64, 3)) * [3, 1, 0.5]
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(1, use_bias=False)])
    expected = np.linalg.eigvalsh(inputs.T @ inputs / 64)[-1]
    estimates = sharpness.top_hessian_eigenvalue(
        model, lambda y, out: 0.5 * (out[:, 0] - y) ** 2,
        inputs.astype("float32"), np.zeros(64, "float32"), iterations=30)
    assert abs(estimates[-1] / expected - 1) < 1e-4


def test_noninferiority_reads_the_lower_end_against_the_margin():
    # +0.5, +1, +1.5: mean 1, s = 0.5, half-width 4.303 * 0.5 / sqrt(3) =
    # 1.24, so [-0.2, +2.2]: above -1, not above 0.
    shown = warmup_report._reading([0.5, 1.0, 1.5], "CLARS", margin=1.0)
    assert shown.startswith(
        "mean +1.0 points, 95 % interval [-0.2, +2.2] (2 degrees of "
        "freedom): no worse within the plan's 1-point margin: shown; not "
        "detectable with 3 seeds")
    # -1, +1, +3: [-4.0, +6.0], whose lower end is below -1.
    assert "1-point margin: not shown;" in warmup_report._reading(
        [-1.0, 1.0, 3.0], "CLARS", margin=1.0)


def test_a_method_with_overrides_extends_as_its_plan_allows(tmp_path):
    """comparison.max_extensions bounds the grid's extensions; raised, the
    same command extends on and reruns the seeds at the new choice, and the
    report counts only those (and the plan's fixed differences)."""
    import copy

    saved = copy.deepcopy(PLAN)
    compare = PLAN["comparison"]
    compare["methods"]["lars_nowarmup"] = {
        "label": "LARS", "config": "l.yaml", "warmup": False,
        "grid": [0.8, 1.6], "overrides": ["lars.trust_clip=0.1"]}
    compare["ablations"] = {}
    compare["differences"] = [["clars", "lars_nowarmup"],
                              ["sgd_warmup", "lars_nowarmup"]]
    try:
        _study(tmp_path, "--stage=pilot")
        compare["max_extensions"] = 1
        assert _study(tmp_path, "--stage=compare",
                      "--methods=clars,lars_nowarmup") == 0
        outcomes = _archived(tmp_path)
        # Best at the lower edge (no warmup peaks at 0.2): one extension.
        assert _rates(outcomes, "lars_nowarmup") == [0.4, 0.4, 0.4, 0.8, 1.6]
        seed_run = outcomes["compare/b4096/lars_nowarmup/lr0.4_w0_e2_s1"]
        assert "lars.trust_clip=0.1" in seed_run.record["overrides"]
        compare["max_extensions"] = 3
        assert _study(tmp_path, "--stage=compare",
                      "--methods=lars_nowarmup") == 0
        assert _rates(_archived(tmp_path), "lars_nowarmup") == [
            0.1, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4, 0.8, 1.6]
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(PLAN))
        warmup_report.main([f"--plan={tmp_path / 'plan.yaml'}",
                            f"--results_dir={tmp_path / 'results'}"])
    finally:
        PLAN.clear()
        PLAN.update(saved)
    text = (tmp_path / "results" / "results.md").read_text()
    # Seeds 1 and 2 at 0.2, test 0.85 - 0.02 + 0.001 * seed; those at 0.4
    # (the first choice) are left out.
    rows = [line for line in text.splitlines() if line.startswith("| LARS | ")
            and "n=" in line]
    assert len(rows) == 1 and rows[0].startswith("| LARS | 0.2 | ")
    assert "83.1 (83.1-83.2, n=2)" in rows[0]
    # CLARS stopped at 0.4 (one extension allowed then): test 0.84 - 0.02.
    assert ("CLARS minus LARS, test accuracy paired by seed (1: -1.0, 2: "
            "-1.0)") in text
    assert "SGD + warmup minus LARS: seed runs not done." in text
    # Bonferroni counts both planned comparisons, done or not.
    assert "- 2 comparisons fixed in the plan (1 of them above)" in text
    assert "each interval at 97.50 %" in text


def test_equivalence_is_the_90_percent_interval_inside_the_margins():
    # mean 0, s = sqrt(4/3), n = 4; t(0.95, 3) = 2.3534 from a t table:
    # half-width 2.3534 * 1.1547 / 2 = 1.3587.
    differences = [1.0, -1.0, 1.0, -1.0]
    equivalent, low, high = warmup_report.equivalence_test(differences, 1.5)
    assert equivalent
    assert (low, high) == pytest.approx((-1.3587, 1.3587), abs=1e-4)
    assert not warmup_report.equivalence_test(differences, 1.3)[0]
    # A shifted mean fails on one side only.
    assert not warmup_report.equivalence_test(
        [d + 0.5 for d in differences], 1.5)[0]
    assert warmup_report.equivalence_test([0.3], 1.5) is None


def test_seeds_for_a_half_width_from_a_t_table():
    # s = 2: n = 9 gives 2.306 * 2 / 3 = 1.537 > 1.5, n = 10 gives
    # 2.262 * 2 / sqrt(10) = 1.431.
    assert warmup_report.seeds_for_half_width(2.0, 1.5) == 10
    # s = 6.2 (the third study's SGD warmup effect): n = 68 gives
    # 1.9960 * 6.2 / sqrt(68) = 1.5007, n = 69 gives 1.9955 * 6.2 /
    # sqrt(69) = 1.4894.
    assert warmup_report.seeds_for_half_width(6.2, 1.5) == 69


def test_seed_plan_reads_each_comparisons_spread():
    # s of [1, -1, 1, -1] is sqrt(4/3) = 1.15; n = 6 gives
    # 2.571 * 1.1547 / sqrt(6) = 1.212 > 1.2, n = 7 gives
    # 2.447 * 1.1547 / sqrt(7) = 1.068.
    text = warmup_report.seed_plan_lines(
        [("A minus B", [1.0, -1.0, 1.0, -1.0])], 1.2)
    assert text.splitlines()[1] == (
        "- A minus B: s = 1.15 points over 4 seeds -> 7 seeds")


def test_check_stage_reruns_a_drawn_run_and_records_the_verdict(tmp_path):
    assert _study(tmp_path, "--stage=pilot") == 0
    finished = sorted(run_id for run_id, o in _archived(tmp_path).items()
                      if o.status == "done")
    drawn = warmup_study.sample_finished_run(
        str(tmp_path / "results" / "runs"), 0)
    assert drawn.run_id in finished
    # Another seed draws another run here (10 runs to draw from).
    assert warmup_study.sample_finished_run(
        str(tmp_path / "results" / "runs"), 1).run_id != drawn.run_id
    assert _study(tmp_path, "--stage=check") == 0
    verdict_path = tmp_path / "results" / "rerun_check.json"
    verdict = json.loads(verdict_path.read_text())
    assert verdict["run"] == drawn.run_id and verdict["identical"]
    assert verdict["check_seed"] == 0
    assert verdict["command"].startswith(
        f"python3 -m experiments.rerun_check {drawn.directory} ")
    assert verdict["steps_compared"] == 8
    # The archived losses altered from step 5 on: the check fails there.
    steps = os.path.join(drawn.directory, "steps.jsonl")
    with open(steps) as f:
        records = [json.loads(line) for line in f]
    with open(steps, "w") as f:
        f.writelines(json.dumps(dict(r, loss=r["loss"] + (r["step"] >= 5)))
                     + "\n" for r in records)
    assert _study(tmp_path, "--stage=check") == 1
    verdict = json.loads(verdict_path.read_text())
    assert not verdict["identical"]
    assert verdict["first_step_difference"]["step"] == 5
    assert verdict["first_step_difference"]["field"] == "loss"


class _Ended:
    """An archived run reduced to what the budget pilot reads."""

    def __init__(self, epochs, train_loss, accuracy, status="done",
                 batch_size=2048, rate=1.0):
        self.record = {"stage": "budget", "batch_size": batch_size,
                       "base_learning_rate": rate, "epochs": epochs}
        self.status, self.train_loss = status, train_loss
        self.validation_accuracy = accuracy


def test_budget_is_the_first_whose_doubling_buys_little():
    # 10 -> 20: loss 0.90 / 0.70 = 1.29 times lower; 20 -> 40: 1.17 times;
    # 40 -> 80: 0.60 / 0.55 = 1.09 times and +0.5 points: 40 is enough.
    ladder = [(10, _Ended(10, 0.90, 0.700)), (20, _Ended(20, 0.70, 0.760)),
              (40, _Ended(40, 0.60, 0.780)), (80, _Ended(80, 0.55, 0.785))]
    assert runs_lib.budget_choice(ladder, 1.1, 1.0) == (40, True)
    # The loss flattens from 20 but accuracy still rises 2 points: not yet.
    ladder = [(20, _Ended(20, 0.60, 0.76)), (40, _Ended(40, 0.58, 0.78))]
    assert runs_lib.budget_choice(ladder, 1.1, 1.0) == (40, False)
    # A run that did not finish breaks the doubling; none finished: None.
    ladder = [(10, _Ended(10, 0.6, 0.7)),
              (20, _Ended(20, None, None, status="failed")),
              (40, _Ended(40, 0.6, 0.7))]
    assert runs_lib.budget_choice(ladder, 1.1, 1.0) == (40, False)
    assert runs_lib.budget_choice([], 1.1, 1.0) == (None, False)


def test_budget_ladders_read_the_halved_rate_after_a_divergence():
    plan = {"budget_pilot": {"ladders": {2048: [10, 20], 8192: [10, 20]},
                             "base_learning_rate": 1.0, "loss_ratio": 1.1,
                             "accuracy_points": 1.0}}
    runs = [_Ended(10, 0.7, 0.70), _Ended(20, 0.68, 0.705),
            _Ended(10, None, None, "diverged", 8192),
            _Ended(10, 0.9, 0.60, batch_size=8192, rate=0.5)]
    choices = runs_lib.budget_ladders(plan, dict(enumerate(runs)))
    assert (choices[2048]["rate"], choices[2048]["epochs"],
            choices[2048]["flattened"]) == (1.0, 10, True)
    assert (choices[8192]["rate"], choices[8192]["epochs"],
            choices[8192]["flattened"]) == (0.5, 10, False)
    assert [e for e, _ in choices[8192]["ladder"]] == [10]


def test_budget_stage_lists_the_ladder_in_order(tmp_path, capsys):
    plan = dict(PLAN, budget_pilot={
        "model": "sigmoid_mlp", "config": "l.yaml", "method": "lars_warmup",
        "base_learning_rate": 1.0, "warmup_fraction": 0.1,
        "ladders": {2048: [10, 20]}, "loss_ratio": 1.1,
        "accuracy_points": 1.0})
    run_stage(tmp_path, plan, "budget", "--dry_run")
    commands = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("python3 -m tests.stand_in_trainer")]
    assert [c.split("train.epochs=")[1].split(",")[0] for c in commands] == [
        "10", "20"]
    assert "optimizer.warmup_epochs=2" in commands[1]


def _fourth_plan(select_from):
    methods = {
        "sgd_warmup": {"label": "SGD + warmup", "config": "s.yaml",
                       "warmup": True, "grid": [0.2, 0.4, 0.8]},
        "clars": {"label": "CLARS", "config": "c.yaml", "warmup": False,
                  "grid": [0.1, 0.2, 0.4]},
        "trust_a": {"label": "clip 1", "config": "c.yaml", "warmup": False,
                    "grid": [0.4], "seeds": [], "batch_sizes": [4096],
                    "overrides": ["clars.trust_clip=1"]},
        "trust_b": {"label": "clip none", "config": "c.yaml",
                    "warmup": False, "grid": [0.8], "seeds": [],
                    "batch_sizes": [4096]},
        "clars_tuned": {"label": "CLARS, tuned trust", "warmup": False,
                        "select_from": select_from, "at": 4096}}
    return {"validation_examples": 5000, "tuning_seed": 0,
            "comparison": {
                "model": "sigmoid_mlp", "batch_sizes": [4096, 8192],
                "epochs": {4096: 2, 8192: 4}, "warmup_fraction": 0.5,
                "seeds": [1, 2], "max_extensions": 0,
                "diagnostics_every_steps": 1,
                "scaled_grid": {"from": 4096, "factors": [0.5, 1]},
                "methods": methods}}


def run_stage(tmp_path, plan, stage, *flags):
    """A stage of `plan` with the stand-in trainer; the plan's path."""
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(plan))
    assert warmup_study.main([
        f"--plan={plan_path}", f"--work_dir={tmp_path / 'work'}",
        f"--archive_dir={tmp_path / 'results' / 'runs'}", f"--stage={stage}",
        "--trainer=tests.stand_in_trainer", *flags]) == 0
    return plan_path


def run_compare_stage(tmp_path, plan):
    return run_stage(tmp_path, plan, "compare")


def _fourth_runs(tmp_path, select_from):
    run_compare_stage(tmp_path, _fourth_plan(select_from))
    return {(o.record["batch_size"], o.record["method"],
             o.record["base_learning_rate"], o.record["warmup_epochs"],
             o.record["epochs"], o.record["seed"]): o.record["overrides"]
            for o in _archived(tmp_path).values()}


def test_fourth_plan_scales_grids_limits_arms_and_reuses_a_winners_seeds(
        tmp_path):
    runs = _fourth_runs(tmp_path, ["clars", "trust_a", "trust_b"])
    keys = set(runs)
    # The stand-in peaks at 0.4 with warmup and 0.2 without. Batch 4096, 2
    # epochs, warmup half of them; batch 8192 starts from the chosen rate
    # times 0.5 and 1, 4 epochs.
    assert {k for k in keys if k[1] == "sgd_warmup"} == {
        (4096, "sgd_warmup", r, 1.0, 2, 0) for r in (0.2, 0.4, 0.8)} | {
        (4096, "sgd_warmup", 0.4, 1.0, 2, s) for s in (1, 2)} | {
        (8192, "sgd_warmup", r, 2.0, 4, 0) for r in (0.2, 0.4)} | {
        (8192, "sgd_warmup", 0.4, 2.0, 4, s) for s in (1, 2)}
    assert {k for k in keys if k[1] == "clars" and k[5] > 0} == {
        (b, "clars", r, 0.0, e, s) for b, r, e in ((4096, 0.2, 2),
                                                   (8192, 0.2, 4))
        for s in (1, 2)}
    # Tuning-only arms at 4096 alone; CLARS (0.85) beats clip 1 (0.84)
    # and clip none (0.83), so the selection reuses CLARS's seeds.
    assert {k[:2] for k in keys if k[1].startswith("trust")} == {
        (4096, "trust_a"), (4096, "trust_b")}
    assert not any(k[1] == "clars_tuned" for k in keys)


def test_a_selection_won_by_a_tuning_arm_runs_its_seeds_and_retunes(
        tmp_path):
    runs = _fourth_runs(tmp_path, ["trust_a", "trust_b"])
    tuned = {k: v for k, v in runs.items() if k[1] == "clars_tuned"}
    assert set(tuned) == {(4096, "clars_tuned", 0.4, 0.0, 2, s)
                          for s in (1, 2)} | {
        (8192, "clars_tuned", r, 0.0, 4, 0) for r in (0.2, 0.4)} | {
        (8192, "clars_tuned", 0.2, 0.0, 4, s) for s in (1, 2)}
    assert all("clars.trust_clip=1" in overrides
               for overrides in tuned.values())


def test_a_selection_reads_candidates_another_process_tunes_and_runs_none(
        tmp_path, capsys):
    """The study's two processes: a selection arm and one of its candidates
    in different --methods. The selection used to wait for ever."""
    plan = _fourth_plan(["clars", "trust_a", "trust_b"])
    # With warmup the stand-in peaks higher (0.9 at 0.4): trust_a wins.
    plan["comparison"]["methods"]["trust_a"]["warmup"] = True
    selection = "--methods=trust_a,trust_b,clars_tuned"

    def methods_run():
        return {(o.record["batch_size"], o.record["method"],
                 o.record["base_learning_rate"], o.record["seed"])
                for o in _archived(tmp_path).values()}

    run_stage(tmp_path, plan, "compare", selection)
    assert {m for _, m, _, _ in methods_run()} == {"trust_a", "trust_b"}
    assert "clars at batch 4096 (outside --methods) is not tuned yet" in (
        capsys.readouterr().out)
    run_stage(tmp_path, plan, "compare", "--methods=sgd_warmup,clars")
    before = methods_run()
    run_stage(tmp_path, plan, "compare", selection)
    added = methods_run() - before
    assert added == {(4096, "clars_tuned", 0.4, s) for s in (1, 2)} | {
        (8192, "clars_tuned", r, 0) for r in (0.2, 0.4)} | {
        (8192, "clars_tuned", 0.4, s) for s in (1, 2)}


def test_a_ladder_at_chance_halves_the_rate_and_chooses_nothing():
    plan = {"budget_pilot": {"ladders": {8192: [10, 20]},
                             "base_learning_rate": 1.0, "loss_ratio": 1.1,
                             "accuracy_points": 1.0}}
    # Two runs at chance "flatten" (same loss, same accuracy) but count
    # for nothing; the rate is halved.
    at_chance = [_Ended(10, 59.8, 0.105, batch_size=8192),
                 _Ended(20, 59.8, 0.105, batch_size=8192)]
    assert runs_lib.budget_choice([(10, at_chance[0]), (20, at_chance[1])],
                                  1.1, 1.0) == (None, False)
    choices = runs_lib.budget_ladders(plan, dict(enumerate(at_chance)))
    assert (choices[8192]["rate"], choices[8192]["epochs"]) == (0.5, None)
    # With up to 3 halvings, 0.5 at chance too: the ladder reads 0.25.
    plan["budget_pilot"]["max_halvings"] = 3
    at_chance.append(_Ended(10, 13.3, 0.098, batch_size=8192, rate=0.5))
    at_chance.append(_Ended(10, 0.9, 0.70, batch_size=8192, rate=0.25))
    choices = runs_lib.budget_ladders(plan, dict(enumerate(at_chance)))
    assert (choices[8192]["rate"], choices[8192]["epochs"]) == (0.25, 10)


def test_a_tuning_run_that_fails_is_run_again_before_the_choice(
        tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_FAIL_ONCE", str(tmp_path / "failed_once"))
    runs = _fourth_runs(tmp_path, ["clars", "trust_a", "trust_b"])
    # The first run (the plan's methods are written with sorted keys).
    first = runs_lib.load_archived(str(tmp_path / "results" / "runs"))[
        "compare/b4096/clars/lr0.1_w0_e2_s0"]
    assert [a["status"] for a in first.record["attempts"]] == ["failed",
                                                               "done"]
    assert (4096, "sgd_warmup", 0.4, 1.0, 2, 1) in runs


def _compare_stage_stop(tmp_path):
    """The compare stage of PLAN with the stand-in; the message it stops with."""
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(PLAN))
    with pytest.raises(SystemExit) as stop:
        warmup_study.main([
            f"--plan={plan_path}", f"--work_dir={tmp_path / 'work'}",
            f"--archive_dir={tmp_path / 'results' / 'runs'}",
            "--stage=compare", "--force",
            "--trainer=tests.stand_in_trainer"])
    return str(stop.value)


def test_runs_failing_three_times_in_a_row_stop_the_stage_with_their_logs(
        tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_ALWAYS_FAIL", "1")
    message = _compare_stage_stop(tmp_path)
    assert "the last 3 run attempts failed" in message
    assert message.count("the stand-in's disk is full") == 3
    assert message.count("train.log") == 3
    archived = _archived(tmp_path)
    # The first tuning run, its one retry, then the second rate: 3 attempts
    # over 2 runs, and nothing after them.
    assert len(archived) == 2
    assert sum(len(o.record["attempts"]) for o in archived.values()) == 3


def test_a_trainer_that_cannot_import_stops_the_stage_at_its_first_run(
        tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_IMPORT_ERROR", "1")
    message = _compare_stage_stop(tmp_path)
    assert "No module named 'absl'" in message
    assert ".venv/bin/python3" in message
    archived = _archived(tmp_path)
    assert len(archived) == 1
    assert [o.record["status"] for o in archived.values()] == ["failed"]
