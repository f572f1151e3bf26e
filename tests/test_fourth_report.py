"""The fourth study's report: its tests, Holm's procedure and the wiring
from the archive, on hand-computed numbers and the stand-in trainer."""

import pytest

from experiments import fourth_report
from experiments import runs as runs_lib
from experiments import warmup_study
from tests.test_warmup_study import _fourth_plan, run_compare_stage


def test_holm_steps_down_over_the_planned_family():
    # 0.01 <= 0.05 / 3; then 0.03 > 0.05 / 2 stops: 0.04 is not reached.
    assert fourth_report.holm([0.01, 0.04, 0.03], 0.05, 3) == [
        True, False, False]
    assert fourth_report.holm([0.001, 0.02], 0.05, 2) == [True, True]
    # A planned hypothesis not yet tested still counts: 0.03 <= 0.05 / 1
    # of two, but 0.03 > 0.05 / 2 of three.
    assert fourth_report.holm([0.001, 0.03], 0.05, 2) == [True, True]
    assert fourth_report.holm([0.001, 0.03], 0.05, 3) == [True, False]
    with pytest.raises(ValueError, match="planned"):
        fourth_report.holm([0.1, 0.2], 0.05, 1)


def test_p_values_against_the_closed_form_t_with_two_degrees():
    # Differences 1, 2, 3: mean 2, standard error 1 / sqrt(3). With 2
    # degrees of freedom P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2.
    def tail(t):
        return (1 - t / (t * t + 2) ** 0.5) / 2

    t = 2 * 3 ** 0.5
    assert fourth_report.p_value([1, 2, 3], "difference", 1.0) == (
        pytest.approx(2 * tail(t)))                       # 0.0742
    assert fourth_report.p_value([1, 2, 3], "noninferiority", 1.0) == (
        pytest.approx(tail(3 * 3 ** 0.5)))                # 0.0175
    assert fourth_report.p_value([-1, -1], "noninferiority", 1.0) == 1.0


def _report_plan():
    plan = _fourth_plan(["clars", "trust_a", "trust_b"])
    plan["title"] = "Stand-in"
    plan["comparison"].update(
        noninferiority_points=1.0, equivalence_points=2.0,
        family_wise_error=0.05,
        seed_extension={"half_width_points": 1.5, "max_seeds": 4},
        primary=[["clars", "sgd_warmup", "noninferiority"]],
        secondary=[["clars_tuned", "clars", "difference"],
                   ["trust_a", "clars", "difference"]])
    return plan


def test_report_from_the_archive_reads_the_plans_comparisons(tmp_path):
    plan_path = run_compare_stage(tmp_path, _report_plan())
    fourth_report.main([f"--plan={plan_path}",
                        f"--results_dir={tmp_path / 'results'}"])
    text = (tmp_path / "results" / "results.md").read_text()
    # The stand-in: no warmup costs 5 points at every seed, so CLARS minus
    # SGD + warmup is -5.0 with no spread, at both batch sizes.
    assert ("- Batch 4096: CLARS minus SGD + warmup: -5.0 points, 95 % "
            "interval [-5.0, -5.0], 2 seeds, p = 1 (H0: worse by 1 point or "
            "more); Holm: not rejected. CLARS is no worse than SGD + warmup "
            "within 1 point: not shown. Same level within +-2 points (90 % "
            "interval [-5.0, -5.0]): not shown.") in text
    assert "- Batch 8192: CLARS minus SGD + warmup: -5.0 points" in text
    # The selection reuses CLARS's seeds: a difference of exactly 0.
    assert "- Batch 4096: CLARS, tuned trust minus CLARS: +0.0 points" in text
    # A tuning-only arm has no seeds; only 4096 is planned for it.
    assert "- Batch 4096: clip 1 minus CLARS: not run" in text
    assert "Batch 8192: clip 1" not in text
    # Validation 90 % at the peak, 1 point lower per factor 2; test 2
    # points lower plus 0.1 per seed (1, 2).
    assert ("| SGD + warmup | 0.2: 89.0, 0.4: **90.0**, 0.8: 89.0 | 0.4 "
            "(sgd_warmup) | 88.1 (88.1-88.2, n=2) |") in text
    assert "| CLARS, tuned trust | (the winner's) | 0.2 (clars) |" in text


def test_extend_stage_adds_the_seeds_a_wide_spread_needs(tmp_path,
                                                         monkeypatch):
    plan = _report_plan()
    plan_path = run_compare_stage(tmp_path, plan)
    real = fourth_report.comparisons

    def wide(plan, outcomes):
        rows = real(plan, outcomes)
        for row in rows:  # as if the 2 seeds' spread asked for 5
            if row["batch_size"] == 4096 and row["family"] == "primary":
                row.update(half_width=3.0, seeds_needed=5)
        return rows

    monkeypatch.setattr(fourth_report, "comparisons", wide)
    assert warmup_study.main([
        f"--plan={plan_path}", f"--work_dir={tmp_path / 'work'}",
        f"--archive_dir={tmp_path / 'results' / 'runs'}", "--stage=extend",
        "--trainer=tests.stand_in_trainer"]) == 0
    added = sorted((o.record["batch_size"], o.record["method"],
                    o.record["base_learning_rate"], o.record["seed"])
                   for o in runs_lib.load_archived(
                       str(tmp_path / "results" / "runs")).values()
                   if o.record["seed"] > 2)
    # max_seeds 4 caps the 5 the spread asks for: seeds 3 and 4, both arms
    # at their chosen rates, at 4096 only.
    assert added == [(4096, "clars", 0.2, 3), (4096, "clars", 0.2, 4),
                     (4096, "sgd_warmup", 0.4, 3),
                     (4096, "sgd_warmup", 0.4, 4)]


def test_a_comparison_without_all_its_seeds_is_interim_and_untested(
        tmp_path):
    plan = _report_plan()
    plan["comparison"]["seeds"] = [1, 2, 3]
    run_compare_stage(tmp_path, plan)
    outcomes = runs_lib.load_archived(str(tmp_path / "results" / "runs"))
    for run_id in [k for k in outcomes if k.endswith("_s3")]:
        del outcomes[run_id]
    rows = fourth_report.comparisons(plan, outcomes)
    row = next(r for r in rows if r["family"] == "primary")
    assert (row["complete"], row["rejected"], len(row["seeds"])) == (
        False, False, 2)
    assert fourth_report.reading(row, {"clars": "CLARS", "sgd_warmup": "SGD"},
                                 plan) == (
        "- Batch 4096: CLARS minus SGD: interim, 2 of 3 seeds: -5.0 points "
        "(95 % interval [-5.0, -5.0]); no test before all its seeds are in.")
