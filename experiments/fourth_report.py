r"""The fourth warmup study's report (issue 27), rebuilt from its run files.

    python3 -m experiments.fourth_report

Reads the plan (`configs/fourth_study/plan.yaml`) and the archive that
`experiments.warmup_study` wrote (`experiments/fourth_results/runs/`), and
writes `experiments/fourth_results/results.md` and its figure. Each
comparison is read as the plan fixed it before the runs: paired by seed,
a t-test per hypothesis ("difference": mean 0; "noninferiority": mean at
most -margin), Holm's step-down procedure within each family over every
planned hypothesis (run or not), and an equivalence test (two one-sided
tests) before any "same level". A missing run is reported as missing,
never filled in.
"""

import argparse
import math
import os
import statistics

import yaml
from scipy import stats

from experiments import runs as runs_lib
from experiments import warmup_report

PLAN = "configs/fourth_study/plan.yaml"
RESULTS_DIR = "experiments/fourth_results"
# A seed run that diverged scores chance on the 10 classes (plan).
DIVERGED_ACCURACY = 0.10


def p_value(differences, kind, margin):
    """One-sample t-test p-value of paired differences (points).

    kind "difference": two-sided, H0 mean = 0. kind "noninferiority":
    one-sided, H0 mean <= -margin.
    """
    n = len(differences)
    error = statistics.stdev(differences) / math.sqrt(n)
    mean = statistics.mean(differences)
    if kind == "difference":
        if error == 0:
            return 0.0 if mean else 1.0
        return 2 * stats.t.sf(abs(mean) / error, n - 1)
    if error == 0:
        return 0.0 if mean > -margin else 1.0
    return stats.t.sf((mean + margin) / error, n - 1)


def holm(p_values, alpha, planned):
    """Holm's step-down rejections for `p_values` among `planned` hypotheses.

    Hypotheses planned but not (yet) tested count in the family and are
    never rejected, so a partial study is not less strict than a full one.
    Returns one bool per p-value, in the order given.
    """
    if planned < len(p_values):
        raise ValueError(f"{len(p_values)} p-values but only {planned} "
                         "planned hypotheses: the family is the plan's.")
    rejected = [False] * len(p_values)
    for rank, index in enumerate(sorted(range(len(p_values)),
                                        key=lambda i: p_values[i])):
        if p_values[index] > alpha / (planned - rank):
            break
        rejected[index] = True
    return rejected


def tuned_runs(plan, outcomes, batch_size):
    """{method: its best tuning-seed run at `batch_size`} (the study's choice:
    the best over every rate its grid and extensions tried)."""
    tuning = [o for o in outcomes.values()
              if o.record.get("stage") == "compare"
              and o.record.get("batch_size") == batch_size
              and o.record.get("seed") == plan["tuning_seed"]]
    found = {method: runs_lib.best([o for o in tuning
                                    if o.record["method"] == method])
             for method in plan["comparison"]["methods"]}
    return {method: run for method, run in found.items() if run is not None}


def chosen_runs(plan, outcomes, batch_size):
    """{arm: the tuning run whose rate and settings its seeds use}.

    A selection arm is its candidates' best at its own batch size, and the
    winner's choice wherever the winner was tuned too; elsewhere its own
    rate tuning with the winner's settings.
    """
    chosen = tuned_runs(plan, outcomes, batch_size)
    for method, spec in plan["comparison"]["methods"].items():
        if "select_from" not in spec:
            continue
        at = tuned_runs(plan, outcomes, spec["at"])
        if any(candidate not in at for candidate in spec["select_from"]):
            chosen.pop(method, None)
            continue
        winner = max(spec["select_from"], key=lambda c: at[c].score())
        if winner in chosen:
            chosen[method] = chosen[winner]
    return chosen


def seed_accuracies(plan, outcomes, batch_size, method, chosen):
    """{seed: test accuracy} of `method`'s fresh seeds at its chosen rate
    (the plan's and any its seed extension added).

    A selection arm whose winner ran its own seeds reads the winner's.
    """
    run = chosen.get(method)
    if run is None:
        return {}
    source = run.record["method"]
    accuracies = {}
    for outcome in outcomes.values():
        record = outcome.record
        if (record.get("stage") == "compare"
                and record.get("batch_size") == batch_size
                and record.get("method") in (method, source)
                and record.get("seed") != plan["tuning_seed"]
                and record.get("base_learning_rate")
                == run.record["base_learning_rate"]
                and arm_settings(outcome) == arm_settings(run)):
            if outcome.status == "diverged":
                accuracies[record["seed"]] = DIVERGED_ACCURACY
            elif outcome.test_accuracy is not None:
                accuracies[record["seed"]] = outcome.test_accuracy
    return accuracies


def arm_settings(run):
    """The overrides a seed run of `run`'s arm starts with (its settings)."""
    return [o for o in run.record.get("overrides", [])
            if o.split("=")[0] not in _PER_RUN]


_PER_RUN = ("model.name", "task.validation_examples",
            "train.global_batch_size", "train.epochs", "train.seed",
            "train.eval_splits", "optimizer.base_learning_rate",
            "optimizer.warmup_epochs", "train.diagnostics_every_steps")


def comparisons(plan, outcomes):
    """Every planned comparison with its numbers and Holm's decision.

    Returns [{family, batch_size, first, second, kind, seeds, complete,
    differences, mean, low, high, p, rejected, equivalent,
    seeds_needed}], with differences None where a side has fewer than two
    seed runs; only complete rows (every planned seed of both arms in)
    are tested.
    """
    compare = plan["comparison"]
    alpha = compare["family_wise_error"]
    rows = []
    for family in ("primary", "secondary"):
        planned = [(batch_size, *entry) for entry in compare[family]
                   for batch_size in compare["batch_sizes"]
                   if all(batch_size in compare["methods"][m].get(
                       "batch_sizes", compare["batch_sizes"])
                          for m in entry[:2])]
        family_rows = []
        for batch_size, first, second, kind in planned:
            chosen = chosen_runs(plan, outcomes, batch_size)
            mine = seed_accuracies(plan, outcomes, batch_size, first, chosen)
            theirs = seed_accuracies(plan, outcomes, batch_size, second,
                                     chosen)
            seeds = sorted(set(mine) & set(theirs))
            planned_seeds = set.intersection(*(
                set(compare["methods"][m].get("seeds", compare["seeds"]))
                for m in (first, second)))
            row = {"family": family, "batch_size": batch_size,
                   "first": first, "second": second, "kind": kind,
                   "seeds": seeds, "differences": None, "rejected": False,
                   "complete": planned_seeds <= set(seeds),
                   "planned_seeds": len(planned_seeds)}
            if len(seeds) >= 2:
                differences = [100 * (mine[s] - theirs[s]) for s in seeds]
                mean, half, low, high = warmup_report.paired_interval(
                    differences)
                equivalent = warmup_report.equivalence_test(
                    differences, compare["equivalence_points"])
                spread = statistics.stdev(differences)
                row.update(
                    differences=differences, mean=mean, half_width=half,
                    low=low, high=high,
                    p=p_value(differences, kind,
                              compare["noninferiority_points"]),
                    equivalent=equivalent[0],
                    equivalence_interval=equivalent[1:],
                    seeds_needed=(warmup_report.seeds_for_half_width(
                        spread, compare["seed_extension"][
                            "half_width_points"]) if spread > 0 else 2))
            family_rows.append(row)
        # No test before a comparison has all its planned seeds.
        tested = [r for r in family_rows
                  if r["differences"] is not None and r["complete"]]
        for row, rejected in zip(tested, holm([r["p"] for r in tested],
                                              alpha, len(family_rows))):
            row["rejected"] = rejected
        rows += family_rows
    return rows


def reading(row, labels, plan):
    """One sentence of what the row's numbers allow."""
    compare = plan["comparison"]
    first, second = labels[row["first"]], labels[row["second"]]
    head = f"Batch {row['batch_size']}: {first} minus {second}"
    if row["differences"] is None:
        return f"- {head}: not run (seed runs missing)."
    if not row["complete"]:
        return (f"- {head}: interim, {len(row['seeds'])} of "
                f"{row['planned_seeds']} seeds: {row['mean']:+.1f} points "
                f"(95 % interval [{row['low']:+.1f}, {row['high']:+.1f}]); "
                "no test before all its seeds are in.")
    kind, margin = row["kind"], compare["noninferiority_points"]
    text = (f"- {head}: {row['mean']:+.1f} points, 95 % interval "
            f"[{row['low']:+.1f}, {row['high']:+.1f}], {len(row['seeds'])} "
            f"seeds, p = {row['p']:.3g} ("
            + ("H0: no difference" if kind == "difference" else
               f"H0: worse by {margin:g} point{'s' * (margin != 1)} or "
               "more")
            + "); Holm: " + ("rejected" if row["rejected"] else
                             "not rejected") + ". ")
    if kind == "noninferiority":
        text += (f"{first} is no worse than {second} within {margin:g} "
                 f"point{'s' * (margin != 1)}: "
                 + ("shown" if row["rejected"] else "not shown") + ". ")
    elif row["rejected"]:
        text += f"{first} {'higher' if row['mean'] > 0 else 'lower'}. "
    equivalence = compare["equivalence_points"]
    low, high = row["equivalence_interval"]
    text += (f"Same level within +-{equivalence:g} points (90 % interval "
             f"[{low:+.1f}, {high:+.1f}]): "
             + ("shown." if row["equivalent"] else "not shown."))
    if row["half_width"] > compare["seed_extension"]["half_width_points"]:
        text += (f" Half-width {row['half_width']:.1f} points: this spread "
                 f"needs {row['seeds_needed']} seeds for "
                 f"{compare['seed_extension']['half_width_points']:g}.")
    return text


def budget_lines(plan, outcomes):
    lines = ["## Budget pilot", "",
             "| batch | rate | epochs: final training loss / validation % "
             "| budget |", "|---|---|---|---|"]
    for batch_size, choice in runs_lib.budget_ladders(plan,
                                                      outcomes).items():
        cells = ", ".join(
            f"{epochs}: {warmup_report._number(o.train_loss)} / "
            f"{warmup_report._percent(o.validation_accuracy)}"
            for epochs, o in choice["ladder"])
        budget = ("-" if choice["epochs"] is None else
                  f"{choice['epochs']}" + ("" if choice["flattened"] else
                                           " (not flattened)"))
        lines.append(f"| {batch_size} | {choice['rate']:g} | {cells} | "
                     f"{budget} |")
    return lines + [""]


def tuning_lines(plan, outcomes, labels):
    compare = plan["comparison"]
    lines = []
    for batch_size in compare["batch_sizes"]:
        chosen = chosen_runs(plan, outcomes, batch_size)
        lines += [f"## Batch {batch_size}", "",
                  f"Tuning (seed {plan['tuning_seed']}, final validation %, "
                  "chosen in bold) and fresh seeds at the chosen rate "
                  "(test %, mean (min-max)):", "",
                  "| arm | rates: validation % | chosen | test % |",
                  "|---|---|---|---|"]
        for method in compare["methods"]:
            tuning = [o for o in outcomes.values()
                      if o.record.get("stage") == "compare"
                      and o.record.get("batch_size") == batch_size
                      and o.record.get("method") == method
                      and o.record.get("seed") == plan["tuning_seed"]]
            run = chosen.get(method)
            if not tuning and run is None:
                continue
            cells = ", ".join(
                f"{warmup_report._rate(o)}: "
                + (f"**{warmup_report._result(o)}**" if o is run
                   else warmup_report._result(o))
                for o in sorted(tuning, key=lambda o: o.record[
                    "base_learning_rate"])) or "(the winner's)"
            if warmup_report.at_edge(tuning):
                cells += " (best at grid edge)"
            accuracies = seed_accuracies(plan, outcomes, batch_size, method,
                                         chosen)
            lines.append(
                f"| {labels[method]} | {cells} | "
                + (f"{warmup_report._rate(run)} "
                   f"({run.record['method']})" if run else "-") + " | "
                + warmup_report._spread(list(accuracies.values())) + " |")
        lines.append("")
    return lines


def forest(rows, labels, path, margin):
    """The tested comparisons' 95 % intervals; returns the file name.

    Primary comparisons in blue, secondary in grey; a dashed line at minus
    the non-inferiority `margin` (points).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    tested = [r for r in rows if r["differences"] is not None
              and r["complete"]]
    if not tested:
        return None
    figure, axis = pyplot.subplots(figsize=(7, 0.35 * len(tested) + 1))
    for y, row in enumerate(reversed(tested)):
        colour = "C0" if row["family"] == "primary" else "C7"
        axis.plot([row["low"], row["high"]], [y, y], color=colour)
        axis.plot(row["mean"], y, "o", color=colour,
                  label=f"{row['family']} comparison")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.axvline(-margin, color="black", linewidth=0.8, linestyle="--",
                 label=f"non-inferiority margin (-{margin:g})")
    axis.set_yticks(range(len(tested)))
    axis.set_yticklabels([
        f"{r['batch_size']}: {labels[r['first']]} - {labels[r['second']]}"
        f" (n={len(r['seeds'])})" for r in reversed(tested)], fontsize=7)
    axis.set_xlabel("test accuracy difference, points (95 % interval, "
                    "paired seeds)")
    handles, names = axis.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return os.path.basename(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=PLAN)
    parser.add_argument("--results_dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    os.chdir(runs_lib.REPO_ROOT)
    with open(args.plan, encoding="utf-8") as f:
        plan = yaml.safe_load(f)
    outcomes = runs_lib.load_archived(os.path.join(args.results_dir, "runs"))
    labels = {m: s["label"] for m, s in plan["comparison"]["methods"].items()}
    rows = comparisons(plan, outcomes)
    command = "python3 -m experiments.fourth_report" + (
        "" if args.plan == PLAN else
        f" --plan {args.plan} --results_dir {args.results_dir}")
    text = [f"# {plan['title']}: results", "",
            f"Written by `{command}` from `{args.results_dir}/runs/` (each "
            "run's command is in its run.json), by the rules the plan fixed "
            "before the runs.", ""]
    for family in ("primary", "secondary"):
        text += [f"## {family.capitalize()} comparisons", ""] + [
            reading(r, labels, plan) for r in rows if r["family"] == family
        ] + [""]
    figure = forest(rows, labels, os.path.join(args.results_dir,
                                               "comparisons.png"),
                    plan["comparison"]["noninferiority_points"])
    if figure:
        text += [f"![]({figure})", ""]
    if "budget_pilot" in plan:
        text += budget_lines(plan, outcomes)
    text += tuning_lines(plan, outcomes, labels)
    warmup_report.write_results(args.results_dir, text, outcomes)


if __name__ == "__main__":
    main()
