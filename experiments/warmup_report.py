r"""The second warmup study's report, rebuilt from the archived run files.

    python3 -m experiments.warmup_report

Reads only `experiments/warmup_results/runs/` (what
`experiments.warmup_study` archived) and the plan, and writes
`experiments/warmup_results/results.md` and its plots. Every number names
the run it comes from; rates are chosen on validation accuracy (with
batch-norm statistics recomputed), test accuracy appears only for the fresh
seeds.
"""

import argparse
import math
import os
import statistics

from experiments import runs as runs_lib

PLAN = "configs/warmup_study/plan.yaml"
RESULTS_DIR = "experiments/warmup_results"


def _percent(value):
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value, digits=3):
    return "-" if value is None or not math.isfinite(value) else (
        f"{value:.{digits}f}")


def _spread(values, show=_percent):
    """'mean (min-max)' over seeds, or '-'."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return (f"{show(statistics.mean(values))} "
            f"({show(min(values))}-{show(max(values))}, n={len(values)})")


def _rate(outcome):
    return runs_lib.format_rate(outcome.record["base_learning_rate"])


def _steps_cell(steps):
    """'k/n reached, median m' for the steps to a target of n runs."""
    reached = [s for s in steps if s is not None]
    return f"{len(reached)}/{len(steps)} reached" + (
        f", median {statistics.median(reached):g}" if reached else "")


def _result(outcome):
    """One cell: validation accuracy, or the status of a run without one."""
    if outcome is None:
        return "not run"
    if outcome.status != "done":
        return outcome.status
    return _percent(outcome.validation_accuracy)


def _group(outcomes, **fields):
    return [o for o in outcomes.values()
            if all(o.record.get(k) == v for k, v in fields.items())]


def _by_rate(outcomes):
    return {o.record["base_learning_rate"]: o for o in outcomes}


best = runs_lib.best


def rate_range_width(outcomes, points=1.0):
    """max/min rate among runs within `points` of the best accuracy."""
    top = best(outcomes)
    if top is None:
        return None
    near = [o.record["base_learning_rate"] for o in outcomes
            if o.validation_accuracy is not None
            and o.validation_accuracy >= top.validation_accuracy
            - points / 100]
    return max(near) / min(near)


def at_edge(outcomes):
    rates = sorted(_by_rate(outcomes))
    top = best(outcomes)
    return top is not None and len(rates) > 1 and (
        top.record["base_learning_rate"] in (rates[0], rates[-1]))


# Sections --------------------------------------------------------------


def pilot_section(plan, outcomes):
    pilot = plan["pilot"]
    lines = ["## Stage 1: pilot (is there a warmup gap?)", "",
             f"SGD + momentum with a {pilot['warmup_epochs']:g}-epoch linear "
             f"warmup vs without, batch {pilot['batch_size']}, "
             f"{pilot['epochs']} epochs, seed {plan['tuning_seed']}; final "
             "validation accuracy (%) after batch-norm recomputation, final "
             "training loss, and the mean training loss over the first 20 % "
             "of steps (from train.log).", ""]
    verdicts = []
    for model in pilot["models"]:
        warm_all = _group(outcomes, stage="pilot", model=model,
                          method="sgd_warmup")
        cold_all = _group(outcomes, stage="pilot", model=model,
                          method="sgd_nowarmup")
        tuning_seed = plan["tuning_seed"]
        warm = [o for o in warm_all if o.record["seed"] == tuning_seed]
        cold = [o for o in cold_all if o.record["seed"] == tuning_seed]
        if not warm and not cold:
            lines += [f"{model}: no runs yet.", ""]
            continue
        lines += [f"### {model}", "",
                  "| base rate | warmup: val % | train loss | early loss "
                  "| no warmup: val % | train loss | early loss |",
                  "|---|---|---|---|---|---|---|"]
        warm_by, cold_by = _by_rate(warm), _by_rate(cold)
        best_warm, best_cold = best(warm), best(cold)
        for rate in sorted(set(warm_by) | set(cold_by)):
            cells = [runs_lib.format_rate(rate)]
            for group, top in ((warm_by, best_warm), (cold_by, best_cold)):
                outcome = group.get(rate)
                mark = " **best**" if outcome is top and top else ""
                cells += [_result(outcome) + mark,
                          _number(outcome.train_loss) if outcome else "-",
                          _number(outcome.early_loss()) if outcome else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for name, group in (("warmup", warm), ("no warmup", cold)):
            if at_edge(group):
                lines.append(f"- Note: the best {name} rate is at an edge of "
                             "its grid; the optimum may lie beyond it.")
        verdict = runs_lib.pilot_verdict(warm_all, cold_all,
                                         pilot["gap_points"], tuning_seed)
        if verdict:
            gap, shows = verdict["gap"], verdict["shows"]
            shared = len(verdict["shared"])
            bad_warm, bad_cold = verdict["bad_warm"], verdict["bad_cold"]
            ranges = [_values_at_rate(group, top) for group, top in
                      ((warm_all, best_warm), (cold_all, best_cold))]
            verdicts.append((model, gap, shows, ranges))
            lines += [
                "- Best with warmup: "
                f"{_percent(best_warm.validation_accuracy)} % at "
                f"{_rate(best_warm)}"
                f" [{best_warm.run_id}]; best without: "
                f"{_percent(best_cold.validation_accuracy)} % at "
                f"{_rate(best_cold)}"
                f" [{best_cold.run_id}] (seed {tuning_seed}).",
                f"- At these rates, mean over {verdict['seeds'][0]} and "
                f"{verdict['seeds'][1]} seed(s): gap {gap:+.1f} points "
                f"(threshold {pilot['gap_points']:g})" + "".join(
                    f"; {o.run_id}: {_percent(o.validation_accuracy)} %"
                    for o in warm_all + cold_all
                    if o.record["seed"] != tuning_seed) + ".",
                f"- Rates of the shared grid that diverged or ended at chance "
                f"(<= {100 * runs_lib.CHANCE:.0f} %): {bad_warm} of {shared} "
                f"with warmup, {bad_cold} of {shared} without.",
                f"- **Warmup gap in this setting: {'yes' if shows else 'no'}"
                "** (a pilot finding, not a result).",
                ""]
    return lines, verdicts


def _values_at_rate(group, chosen):
    """Validation accuracies of every seed run at `chosen`'s rate."""
    return [o.validation_accuracy for o in group
            if o.record["base_learning_rate"]
            == chosen.record["base_learning_rate"]
            and o.validation_accuracy is not None]


def diagnostics_table(outcome, eta, clip, fraction=0.2):
    """Per kernel, over the first steps: the unclipped trust and a_l/||g_l||.

    Rows of (layer, median eta*||w||/a_l, share of steps at the clip,
    median a_l/||g_l||, steps), from the run's diagnostics.jsonl.
    """
    total = outcome.total_steps() or 0
    per_layer = {}
    for record in outcome.diagnostics():
        if total and record["step"] > max(1, round(fraction * total)):
            continue
        for path, layer in record["layers"].items():
            if path.endswith("kernel") and layer.get("estimate", 0) > 0:
                per_layer.setdefault(path, []).append(
                    (eta * layer["weight_norm"] / layer["estimate"],
                     layer["noise_ratio"]))
    return [(path, statistics.median(u for u, _ in samples),
             sum(u >= clip for u, _ in samples) / len(samples),
             statistics.median(n for _, n in samples), len(samples))
            for path, samples in per_layer.items()]


def comparison_section(plan, outcomes):
    compare = plan["comparison"]
    labels = {m: s["label"] for m, s in compare["methods"].items()}
    labels.update({m: s["label"] for m, s in compare["ablations"].items()})
    lines = ["## Stage 2: comparison", ""]
    verdict = []
    seed_set = set(compare["seeds"])
    for batch_size in compare["batch_sizes"]:
        runs = _group(outcomes, stage="compare", batch_size=batch_size)
        if not runs:
            lines += [f"Batch {batch_size}: no runs yet.", ""]
            continue
        lines += [f"### Batch {batch_size}", "", "Tuning (seed "
                  f"{plan['tuning_seed']}, validation %, best in bold):", "",
                  "| method | rates: val % | rate range within 1 point |",
                  "|---|---|---|"]
        for method, spec in compare["methods"].items():
            warmup = compare["warmup_epochs"] if spec["warmup"] else 0.0
            grid = [o for o in runs if o.record["method"] == method
                    and o.record["seed"] == plan["tuning_seed"]
                    and o.record["warmup_epochs"] == warmup]
            if not grid:
                continue
            top = best(grid)
            cells = ", ".join(
                f"{runs_lib.format_rate(r)}: "
                + (f"**{_result(o)}**" if o is top else _result(o))
                for r, o in sorted(_by_rate(grid).items()))
            width = rate_range_width(grid)
            edge = " (best at grid edge)" if at_edge(grid) else ""
            lines.append(f"| {labels[method]} | {cells}{edge} | "
                         f"{'-' if width is None else f'x{width:g}'} |")
        variants = [o for o in runs if o.record["method"] == "sgd_warmup"
                    and o.record["seed"] == plan["tuning_seed"]
                    and o.record["warmup_epochs"]
                    in compare["warmup_variants"]]
        if variants:
            lines += ["", "SGD + warmup at its best rate, other warmup "
                      "lengths: " + ", ".join(
                          f"{o.record['warmup_epochs']:g} epochs: "
                          f"{_result(o)} % [{o.run_id}]" for o in variants)]
        lines += ["", f"Fresh seeds {sorted(seed_set)} at the chosen rates "
                  "(mean (min-max)):", "",
                  "| method | rate | val % | test % | early loss | final "
                  "train loss | " + " | ".join(
                      f"steps to {100 * t:g} % val"
                      for t in compare["targets"]) + " |",
                  "|---" * (6 + len(compare["targets"])) + "|"]
        seeds_by_method = {}
        for outcome in runs:
            if outcome.record["seed"] in seed_set:
                seeds_by_method.setdefault(outcome.record["method"],
                                           []).append(outcome)
        for method, group in seeds_by_method.items():
            steps = [[o.steps_to(t) for o in group]
                     for t in compare["targets"]]
            lines.append(
                f"| {labels.get(method, method)} | "
                f"{_rate(group[0])}"
                f" | {_spread([o.validation_accuracy for o in group])} | "
                f"{_spread([o.test_accuracy for o in group])} | "
                f"{_spread([o.early_loss() for o in group], _number)} | "
                f"{_spread([o.train_loss for o in group], _number)} | "
                + " | ".join(_steps_cell(col) for col in steps) + " |")
        for method, group in seeds_by_method.items():
            if method not in ("clars", "clars_warmup"):
                continue  # the ablations' eta is not CLARS's
            for outcome in group:
                settings = outcome.results["config"]["clars"]
                rows = diagnostics_table(outcome,
                                         settings["trust_coefficient"],
                                         settings["trust_clip"])
                if rows:
                    lines += [
                        "", f"{labels.get(method, method)} "
                        f"[{outcome.run_id}], kernels over the first 20 % of "
                        "steps (medians; the trust is "
                        f"min({settings['trust_clip']:g}, eta*||w||/a_l)):",
                        "",
                        "| kernel | unclipped eta*\\|\\|w\\|\\|/a_l | "
                        "steps at the clip | a_l/\\|\\|g_l\\|\\| | "
                        "steps |", "|---|---|---|---|---|"]
                    lines += [f"| {path} | {unclipped:.3f} | "
                              f"{100 * clipped:.0f} % | {noise:.2f} | {n} |"
                              for path, unclipped, clipped, noise, n in rows]
        verdict += _verdict(batch_size, seeds_by_method, labels)
        lines.append("")
    return lines, verdict


def _test_accuracy_by_seed(group):
    return {o.record["seed"]: o.test_accuracy for o in group
            if o.test_accuracy is not None}


def _difference(heading, first, second, seeds_by_method, labels):
    """One line: `first` minus `second` in test accuracy over fresh seeds."""
    mine = _test_accuracy_by_seed(seeds_by_method.get(first, []))
    theirs = _test_accuracy_by_seed(seeds_by_method.get(second, []))
    if not mine or not theirs:
        return []
    difference = 100 * (statistics.mean(mine.values())
                        - statistics.mean(theirs.values()))
    separated = (min(mine.values()) > max(theirs.values())
                 or max(mine.values()) < min(theirs.values()))
    overlap = ("overlap (no evidence either way)" if not separated
               else "do not overlap" if min(len(mine), len(theirs)) > 1
               else "cannot be compared (one seed)")
    # Each fresh seed fixes the initialization and the data order for
    # every method alike, so per-seed differences are paired.
    paired = sorted(set(mine) & set(theirs))
    return [f"- {heading}: {labels.get(first, first)} minus "
            f"{labels.get(second, second)}: {difference:+.1f} points of test "
            f"accuracy; the seed ranges {overlap}; paired by seed ("
            + ", ".join(f"{seed}: {100 * (mine[seed] - theirs[seed]):+.1f}"
                        for seed in paired) + ")."]


def _mechanism(batch_size, clars_runs):
    """Whether CLARS's estimate set any kernel's trust, or the clip did."""
    for outcome in clars_runs:
        settings = outcome.results["config"]["clars"]
        clip = settings["trust_clip"]
        rows = diagnostics_table(outcome, settings["trust_coefficient"], clip)
        if not rows:
            continue
        always = [path for path, _, clipped, _, _ in rows if clipped == 1]
        return [f"- Batch {batch_size}, mechanism [{outcome.run_id}]: over "
                f"the first 20 % of steps the trust of {len(always)} of "
                f"{len(rows)} kernels sat at the {clip:g} clip in every "
                "logged step" + (
                    f" ({', '.join(always)}): on those layers and steps CLARS "
                    "acted as the clip-only ablation, its estimate unused"
                    if always else "") + "; over the whole run, steps at "
                "the clip: " + ", ".join(
                    f"{path} {100 * clipped:.0f} %" for path, _, clipped, _, _
                    in diagnostics_table(outcome,
                                         settings["trust_coefficient"], clip,
                                         fraction=1.0)) + "."]
    return []


def _verdict(batch_size, seeds_by_method, labels):
    out = _difference(f"Batch {batch_size}, the warmup problem",
                      "sgd_warmup", "sgd_nowarmup", seeds_by_method, labels)
    clars = seeds_by_method.get("clars")
    if not clars:
        return out + [f"- Batch {batch_size}: CLARS's seed runs are not "
                      "done."]
    for other in ("sgd_warmup", "lars_warmup", "sgd_nowarmup",
                  "clars_warmup", "clars_clip_only", "clars_adapt_all"):
        out += _difference(f"Batch {batch_size}", "clars", other,
                           seeds_by_method, labels)
    return out + _mechanism(batch_size, clars)


def plot(path, title, curves, xlabel, ylabel, log_x=False):
    """One figure of named (x, y) curves; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        axis.plot(xs, ys, marker="o", markersize=3, label=label)
    if log_x:
        axis.set_xscale("log", base=2)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return os.path.basename(path)


def figures(outcomes, results_dir):
    """Rate sensitivity and early training loss, per stage and batch size."""
    groups = {}
    for outcome in outcomes.values():
        record = outcome.record
        key = (record["stage"], record.get("model"), record["batch_size"])
        groups.setdefault(key, []).append(outcome)
    lines = []
    for (stage, model, batch_size), group in sorted(groups.items()):
        name = f"{stage}_{model}_b{batch_size}"
        by_method = {}
        for outcome in group:
            by_method.setdefault(outcome.record["method"], []).append(outcome)
        sensitivity, early = {}, {}
        for method, members in sorted(by_method.items()):
            tuning_seed = min(o.record["seed"] for o in members)
            tuning = sorted(
                (o.record["base_learning_rate"], o.validation_accuracy)
                for o in members if o.validation_accuracy is not None
                and o.record["seed"] == tuning_seed)
            if len(tuning) > 1:
                sensitivity[method] = ([r for r, _ in tuning],
                                       [100 * a for _, a in tuning])
            top = best(members)
            if top is not None and top.step_losses():
                losses = sorted(top.step_losses().items())
                cut = max(1, round(0.2 * (top.total_steps() or len(losses))))
                early[f"{method} at "
                      f"{_rate(top)}"
                      ] = ([s for s, _ in losses if s <= cut],
                           [l for s, l in losses if s <= cut])
        if sensitivity:
            lines.append("![]({})".format(plot(
                os.path.join(results_dir, f"{name}_rates.png"),
                f"{name}: final validation accuracy by rate", sensitivity,
                "base rate (per 128 examples)", "validation accuracy (%)",
                log_x=True)))
        if early:
            lines.append("![]({})".format(plot(
                os.path.join(results_dir, f"{name}_early_loss.png"),
                f"{name}: training loss, first 20 % of steps (best run)",
                early, "step", "training loss")))
    return lines


def main(argv=None):
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=PLAN)
    parser.add_argument("--results_dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    os.chdir(runs_lib.REPO_ROOT)
    with open(args.plan, encoding="utf-8") as f:
        plan = yaml.safe_load(f)
    outcomes = runs_lib.load_archived(os.path.join(args.results_dir, "runs"))
    pilot_lines, pilot_verdicts = pilot_section(plan, outcomes)
    compare_lines, verdict = comparison_section(plan, outcomes)
    summary = ["## Verdict", ""]
    threshold = plan["pilot"]["gap_points"]
    for model, gap, shows, (warm, cold) in pilot_verdicts:
        overlap = "overlap" if (min(warm) <= max(cold)
                                and min(cold) <= max(warm)) else (
            "do not overlap")
        seeds = (f"the seeds' ranges {overlap}: warmup "
                 f"{_percent(min(warm))}-{_percent(max(warm))} %, no warmup "
                 f"{_percent(min(cold))}-{_percent(max(cold))} %")
        if not shows:
            finding = ("not worse than SGD with warmup by the pilot's rule: "
                       "in this setting there is no warmup problem for "
                       "CLARS to remove, and the comparison would not test "
                       f"the claim ({seeds})")
        elif gap < 2 * threshold:
            finding = ("worse than SGD with warmup by the pilot's rule, but "
                       f"only marginally (under twice the {threshold:g}-point"
                       f" threshold), and {seeds}")
        else:
            finding = f"clearly worse than SGD with warmup ({seeds})"
        summary.append(
            f"- Pilot, {model}: SGD without warmup is {finding} (best-rate "
            f"gap {gap:+.1f} points of validation accuracy).")
    summary += verdict or ["- Comparison: not run yet."]
    unfinished = [o.run_id for o in outcomes.values()
                  if o.status not in ("done", "diverged")]
    text = ["# Second warmup study: results", "",
            "Written by `python3 -m experiments.warmup_report` from "
            f"`{args.results_dir}/runs/` (each run's command is in its "
            "run.json). Rates chosen on validation accuracy (5,000 held-out "
            "training examples, batch-norm statistics recomputed on 4,096 "
            "training examples before each evaluation); test accuracy only "
            "for fresh seeds.", ""] + summary + [""] + pilot_lines \
        + compare_lines
    text += ["## Figures", ""] + figures(outcomes, args.results_dir) + [""]
    if unfinished:
        text += ["## Unfinished runs", ""] + [f"- {r}" for r in
                                               sorted(unfinished)]
    with open(os.path.join(args.results_dir, "results.md"), "w",
              encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")
    print(f"wrote {args.results_dir}/results.md ({len(outcomes)} runs)")


if __name__ == "__main__":
    main()
