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

from scipy import stats

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
# Windows (points of validation accuracy below the best) for the rate range.
RANGE_WINDOWS = (1.0, 2.0, 5.0)


def paired_interval(differences, confidence=0.95):
    """Mean and two-sided t-interval of paired differences.

    Returns:
        (mean, half_width, low, high), or None for fewer than two pairs.
    """
    if len(differences) < 2:
        return None
    mean = statistics.mean(differences)
    half_width = (stats.t.ppf(0.5 + confidence / 2, len(differences) - 1)
                  * statistics.stdev(differences)
                  / math.sqrt(len(differences)))
    return mean, half_width, mean - half_width, mean + half_width


def detectable_gap(differences, confidence=0.95, power=0.8):
    """Smallest true paired gap found with `power` by a `confidence` t-test.

    (t_{1-alpha/2} + t_{power}) * s / sqrt(n), with n - 1 degrees of
    freedom and the observed spread s standing in for the true one.
    """
    degrees = len(differences) - 1
    return ((stats.t.ppf(0.5 + confidence / 2, degrees)
             + stats.t.ppf(power, degrees))
            * statistics.stdev(differences) / math.sqrt(len(differences)))


def equivalence_test(differences, margin, alpha=0.05):
    """Two one-sided t-tests (TOST) that the true paired mean lies within
    (-margin, +margin) points.

    Equivalent at level alpha exactly when the two-sided (1 - 2 alpha)
    t-interval lies inside the margins, which is how it is computed.

    Returns:
        (equivalent, low, high): the verdict and the 90 % interval (for
        alpha 0.05), or None for fewer than two pairs.
    """
    interval = paired_interval(differences, confidence=1 - 2 * alpha)
    if interval is None:
        return None
    _, _, low, high = interval
    return (-margin < low and high < margin), low, high


def seeds_for_half_width(spread, half_width, confidence=0.95, smallest=3):
    """Fewest paired seeds n whose t-interval half-width,
    t_{n-1} * spread / sqrt(n), is at most `half_width` points."""
    seeds = smallest
    while (stats.t.ppf(0.5 + confidence / 2, seeds - 1) * spread
           / math.sqrt(seeds)) > half_width:
        seeds += 1
    return seeds


def seed_plan_lines(compared, half_width):
    """For each (name, differences): its paired spread and the seeds that
    give a 95 % interval of at most `half_width` points at that spread."""
    lines = [f"seeds for a 95 % half-width <= {half_width:g} points, from "
             "each comparison's paired spread:"]
    for name, differences in compared:
        spread = statistics.stdev(differences)
        lines.append(f"- {name}: s = {spread:.2f} points over "
                     f"{len(differences)} seeds -> "
                     f"{seeds_for_half_width(spread, half_width)} seeds")
    return "\n".join(lines)


def run_length(outcome):
    """(total steps, warmup steps) of a run, as the trainer rounds them."""
    per_epoch = outcome.results.get("steps_per_epoch")
    total = outcome.total_steps()
    if not per_epoch or not total:
        return None
    return total, round(outcome.record["warmup_epochs"] * per_epoch)


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
    lines = ["## Tuning and fresh seeds of SGD" if "gate" in plan
             else "## Stage 1: pilot (is there a warmup gap?)", "",
             f"SGD + momentum with a {pilot['warmup_epochs']:g}-epoch linear "
             f"warmup vs without, batch {pilot['batch_size']}, "
             f"{pilot['epochs']} epochs, seed {plan['tuning_seed']}; final "
             "validation accuracy (%)" + (
                 "" if "gate" in plan else " after batch-norm recomputation")
             + ", final "
             "training loss, and the mean training loss over the first 20 % "
             "of steps (from steps.jsonl).", ""]
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
        lines += _length_line(warm_all, pilot["warmup_epochs"])
        if verdict:
            gap, shows = verdict["gap"], verdict["shows"]
            shared = len(verdict["shared"])
            bad_warm, bad_cold = verdict["bad_warm"], verdict["bad_cold"]
            warm_seeds = _accuracy_by_seed(
                _at_rate(warm_all, best_warm), "validation_accuracy")
            cold_seeds = _accuracy_by_seed(
                _at_rate(cold_all, best_cold), "validation_accuracy")
            paired = {seed: 100 * (warm_seeds[seed] - cold_seeds[seed])
                      for seed in sorted(set(warm_seeds) & set(cold_seeds))
                      if seed != tuning_seed}
            verdicts.append((model, gap, shows, paired))
            lines += [
                "- Best with warmup: "
                f"{_percent(best_warm.validation_accuracy)} % at "
                f"{_rate(best_warm)}"
                f" [{best_warm.run_id}]; best without: "
                f"{_percent(best_cold.validation_accuracy)} % at "
                f"{_rate(best_cold)}"
                f" [{best_cold.run_id}] (seed {tuning_seed}).",
                f"- At these rates, mean over {verdict['seeds'][0]} and "
                f"{verdict['seeds'][1]} seed(s): gap {gap:+.1f} points"
                + ("" if "gate" in plan
                   else f" (threshold {pilot['gap_points']:g})") + "".join(
                    f"; {o.run_id}: {_percent(o.validation_accuracy)} %"
                    for o in warm_all + cold_all
                    if o.record["seed"] != tuning_seed) + ".",
                f"- Rates of the shared grid that diverged or ended at chance "
                f"(<= {100 * runs_lib.CHANCE:.0f} %): {bad_warm} of {shared} "
                f"with warmup, {bad_cold} of {shared} without."]
            # Under a gate the plan's gate rule decides, not this one.
            lines += ([""] if "gate" in plan else [
                f"- **Warmup gap in this setting: {'yes' if shows else 'no'}"
                "** (a pilot finding, not a result).", ""])
    return lines, verdicts


def _length_line(runs, warmup_epochs):
    """How many steps the runs took and their warmup, from results.json."""
    warm = [o for o in runs if o.record["warmup_epochs"] == warmup_epochs
            and run_length(o)]
    if not warm:
        return []
    total, warmup_steps = run_length(warm[0])
    return [f"Each run: {total} steps ({warm[0].results['steps_per_epoch']} "
            f"per epoch); a {warmup_epochs:g}-epoch warmup is "
            f"{warmup_steps} steps [{warm[0].run_id}].", ""]


def _at_rate(group, chosen):
    """The runs of `group` at `chosen`'s rate and warmup length."""
    return [o for o in group
            if o.record["base_learning_rate"]
            == chosen.record["base_learning_rate"]
            and o.record["warmup_epochs"] == chosen.record["warmup_epochs"]]


def _accuracy_by_seed(group, key):
    """{seed: accuracy} of the finished runs in `group` (`key`: property)."""
    return {o.record["seed"]: getattr(o, key) for o in group
            if getattr(o, key) is not None}


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
    labels = {"sgd_warmup": "SGD + warmup", "sgd_nowarmup": "SGD, no warmup"}
    labels.update({m: s["label"] for m, s in compare["methods"].items()})
    labels.update({m: s["label"] for m, s in compare["ablations"].items()})
    lines = ["## Stage 2: comparison", ""]
    verdict, compared = [], []
    seed_set = set(compare["seeds"])
    for batch_size in compare["batch_sizes"]:
        runs = _group(outcomes, stage="compare", batch_size=batch_size)
        if not runs:
            lines += [f"Batch {batch_size}: no runs yet.", ""]
            continue
        lines += [f"### Batch {batch_size}", ""] + _length_line(
            runs, compare["warmup_epochs"]) + [
            "Tuning (seed "
            f"{plan['tuning_seed']}, validation %, best in bold). Rate "
            "range: the largest over the smallest grid rate whose accuracy "
            "is within the window of the best (one seed, the plan's grid: "
            "x1 means no neighbour within the window).", "",
            "| method | rates: val % | " + " | ".join(
                f"range within {w:g} point{'s' * (w != 1)}" for w in RANGE_WINDOWS) + " |",
            "|---|---|" + "---|" * len(RANGE_WINDOWS)]
        chosen = {}
        for method, spec in compare["methods"].items():
            warmup = compare["warmup_epochs"] if spec["warmup"] else 0.0
            grid = [o for o in runs if o.record["method"] == method
                    and o.record["seed"] == plan["tuning_seed"]
                    and o.record["warmup_epochs"] == warmup]
            if not grid:
                continue
            top = best(grid)
            if top is not None:
                chosen[method] = top
            cells = ", ".join(
                f"{runs_lib.format_rate(r)}: "
                + (f"**{_result(o)}**" if o is top else _result(o))
                for r, o in sorted(_by_rate(grid).items()))
            widths = [rate_range_width(grid, w) for w in RANGE_WINDOWS]
            edge = " (best at grid edge)" if at_edge(grid) else ""
            lines.append(f"| {labels[method]} | {cells}{edge} | " + " | ".join(
                "-" if width is None else f"x{width:.3g}" for width in widths)
                + " |")
        variants = [o for o in runs if o.record["method"] == "sgd_warmup"
                    and o.record["seed"] == plan["tuning_seed"]
                    and o.record["warmup_epochs"]
                    in compare["warmup_variants"]]
        if variants:
            lines += ["", "SGD + warmup at its best rate, other warmup "
                      "lengths: " + ", ".join(
                          f"{o.record['warmup_epochs']:g} epochs: "
                          f"{_result(o)} % [{o.run_id}]" for o in variants)
                      + f" (the fresh seeds ran the plan's "
                      f"{compare['warmup_epochs']:g} epoch whichever scored "
                      "higher)."]
        lines += ["", f"Fresh seeds {sorted(seed_set)} at the chosen rates "
                  "(mean (min-max)):", "",
                  "| method | rate | val % | test % | early loss | final "
                  "train loss | " + " | ".join(
                      f"steps to {100 * t:g} % val"
                      for t in compare["targets"]) + " |",
                  "|---" * (6 + len(compare["targets"])) + "|"]
        seeds_by_method = {}
        # A gate's SGD arms ran their fresh seeds in the pilot stage.
        gate_arms = _group(outcomes, stage="pilot", batch_size=batch_size,
                           model=compare["model"]) if "gate" in plan else []
        for outcome in runs + gate_arms:
            method = outcome.record["method"]
            # A tuned method's seeds count at its chosen rate only (seeds
            # run at an earlier choice stay archived, out of the verdict).
            if outcome.record["seed"] in seed_set and (
                    method not in chosen
                    or outcome.record["base_learning_rate"]
                    == chosen[method].record["base_learning_rate"]):
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
        batch_verdict, batch_compared = _verdict(
            batch_size, seeds_by_method, labels,
            compare.get("noninferiority_points"), compare.get("differences"))
        verdict += batch_verdict
        compared += batch_compared
        lines.append("")
    return lines, verdict, compared


def _difference(heading, first, second, seeds_by_method, labels,
                margin=None):
    """`first` minus `second` in test accuracy, paired by fresh seed.

    Each fresh seed fixes the initialisation and the data order for every
    method alike, so the per-seed differences are paired; the verdict reads
    their 95 % t-interval. Returns (lines, differences in points).
    """
    mine = _accuracy_by_seed(seeds_by_method.get(first, []), "test_accuracy")
    theirs = _accuracy_by_seed(seeds_by_method.get(second, []),
                               "test_accuracy")
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return [], []
    differences = [100 * (mine[seed] - theirs[seed]) for seed in seeds]
    name, other = labels.get(first, first), labels.get(second, second)
    line = (f"- {heading}: {name} minus {other}, test accuracy paired by "
            "seed (" + ", ".join(f"{seed}: {d:+.1f}" for seed, d in
                                 zip(seeds, differences)) + ")")
    if len(differences) < 2:
        return [line + ": one pair, no interval."], differences
    return [line + ": " + _reading(differences, name, margin)], differences


def _reading(differences, name, margin=None):
    """What the paired 95 % interval of `differences` allows, in words.

    With `margin` (points, fixed in the plan), also whether `name` is shown
    no worse: the interval's lower end above -margin.
    """
    mean, _, low, high = paired_interval(differences)
    degrees = len(differences) - 1
    text = (f"mean {mean:+.1f} points, 95 % interval [{low:+.1f}, "
            f"{high:+.1f}] ({degrees} degree{'s' * (degrees != 1)} of "
            "freedom): ")
    if margin is not None:
        text += (f"no worse within the plan's {margin:g}-point margin: "
                 f"{'shown' if low > -margin else 'not shown'}; ")
    if low > 0:
        return text + f"{name} higher."
    if high < 0:
        return text + f"{name} lower."
    return text + (
        f"not detectable with {len(differences)} seeds (with this spread, "
        "the smallest true gap found 80 % of the time is about "
        f"{detectable_gap(differences):.1f} points); the interval allows "
        f"{name} to be up to {max(0.0, -low):.1f} points lower or "
        f"{max(0.0, high):.1f} higher.")


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


def _verdict(batch_size, seeds_by_method, labels, margin=None,
             differences=None):
    """Verdict lines and the [(name, differences)] they compared.

    `margin`: the plan's non-inferiority margin for CLARS, if any.
    `differences`: the plan's [first, second] pairs, fixed before the runs;
    by default the warmup problem and CLARS against every other method.
    """
    compared = []

    def add(heading, first, second):
        lines, differences = _difference(
            heading, first, second, seeds_by_method, labels,
            margin if first == "clars" else None)
        if differences:
            compared.append((f"{heading}: {labels.get(first, first)} minus "
                             f"{labels.get(second, second)}", differences))
        return lines

    clars = seeds_by_method.get("clars")
    if differences:
        out = []
        for first, second in differences:
            out += add(f"Batch {batch_size}" + (
                ", the warmup problem" if (first, second) == (
                    "sgd_warmup", "sgd_nowarmup") else ""), first, second)
            if not (seeds_by_method.get(first)
                    and seeds_by_method.get(second)):
                out.append(f"- Batch {batch_size}: "
                           f"{labels.get(first, first)} minus "
                           f"{labels.get(second, second)}: seed runs not "
                           "done.")
        return out + (_mechanism(batch_size, clars) if clars else []), compared
    out = add(f"Batch {batch_size}, the warmup problem", "sgd_warmup",
              "sgd_nowarmup")
    if not clars:
        return out + [f"- Batch {batch_size}: CLARS's seed runs are not "
                      "done."], compared
    for other in ("sgd_warmup", "lars_warmup", "sgd_nowarmup",
                  "clars_warmup", "clars_clip_only", "clars_adapt_all"):
        out += add(f"Batch {batch_size}", "clars", other)
    return out + _mechanism(batch_size, clars), compared


def _planned_count(plan):
    """Comparisons the plan fixed (its differences, per batch size), or 0."""
    compare = plan.get("comparison") or {}
    return len(compare.get("differences") or []) * len(
        compare.get("batch_sizes") or [])


def multiplicity_lines(compared, confidence=0.95, planned=None):
    """How many comparisons the verdict makes, and which survive Bonferroni.

    Args:
        compared: [(name, differences in points)].
        planned: the number of comparisons the plan fixed, if it did: the
            correction counts them all, done or not.
    """
    if not compared:
        return []
    count = max(planned or 0, len(compared))
    corrected = 1 - (1 - confidence) / count
    survivors = []
    for name, differences in compared:
        interval = paired_interval(differences, corrected)
        if interval and (interval[2] > 0 or interval[3] < 0):
            survivors.append(f"{name} ({interval[2]:+.1f} to "
                             f"{interval[3]:+.1f})")
    return [f"- {count} comparisons" + (
        f" fixed in the plan ({len(compared)} of them above)"
        if count != len(compared) else " above")
            + ", each with its own 95 % interval "
            "and no correction for their number: with no real difference "
            f"anywhere, about {count * (1 - confidence):.1f} of them would "
            "still exclude 0 by chance. With a Bonferroni correction (each "
            f"interval at {100 * corrected:.2f} %), the intervals that "
            "exclude 0: " + ("; ".join(survivors) if survivors else "none")
            + "."]


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
    axis.set_title(title, fontsize=9)
    axis.set(xlabel=xlabel, ylabel=ylabel)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return os.path.basename(path)


def _variant_label(method, warmup_epochs):
    return f"{method}, " + (f"warmup {warmup_epochs:g} epoch" if warmup_epochs
                            else "no warmup")


def _early_loss_run(members, main_warmup, tuning_seed):
    """One run per method for the early-loss plot: the first seed run.

    The lowest seed other than the tuning seed at the method's chosen rate
    and main warmup length (an ablation, never tuned: its lowest seed), so
    that every curve of a plot starts from the same initialisation.
    """
    main = [o for o in members if o.record["warmup_epochs"] in (0.0,
                                                                main_warmup)]
    chosen = best([o for o in main if o.record["seed"] == tuning_seed])
    candidates = (_at_rate(main, chosen) if chosen is not None else main)
    candidates = [o for o in candidates if o.record["seed"] != tuning_seed
                  and o.step_losses()]
    return min(candidates, key=lambda o: o.record["seed"], default=None)


def accuracy_by_peak_rate(outcomes, path, plan):
    """Every method's tuning curve and its fresh seeds, on one figure.

    Lines: final validation accuracy of the tuning seed against the peak
    rate (base rate * batch / 128); points: test accuracy of each fresh
    seed at the method's chosen rate. Returns the file name.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    compare = plan["comparison"]
    labels = {"sgd_warmup": "SGD + warmup", "sgd_nowarmup": "SGD, no warmup"}
    labels.update({m: s["label"] for m, s in compare["methods"].items()})
    seeds = set(compare["seeds"])
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for method, label in labels.items():
        members = [o for o in outcomes.values()
                   if o.record["method"] == method
                   and o.record.get("model") == compare["model"]]
        tuning = sorted(
            (o.record["base_learning_rate"] * o.record["batch_size"] / 128,
             100 * o.validation_accuracy) for o in members
            if o.record["seed"] == plan["tuning_seed"]
            and o.validation_accuracy is not None)
        chosen = best([o for o in members
                       if o.record["seed"] == plan["tuning_seed"]])
        if not tuning or chosen is None:
            continue
        line, = axis.plot(*zip(*tuning), marker="o", markersize=3,
                          linewidth=1, label=label)
        fresh = [o for o in _at_rate(members, chosen)
                 if o.record["seed"] in seeds and o.test_accuracy is not None]
        axis.scatter([o.record["base_learning_rate"] * o.record["batch_size"]
                      / 128 for o in fresh],
                     [100 * o.test_accuracy for o in fresh], marker="x",
                     s=30, color=line.get_color())
    axis.set_xscale("log", base=2)
    axis.set_title(f"{compare['model']}, batch "
                   f"{compare['batch_sizes'][0]}, {compare['epochs']} "
                   f"epochs\nlines: validation accuracy (seed "
                   f"{plan['tuning_seed']}); "
                   f"crosses: test accuracy (seeds "
                   f"{min(seeds)}-{max(seeds)}) at the chosen rate",
                   fontsize=8)
    axis.set(xlabel="peak learning rate", ylabel="accuracy (%)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return os.path.basename(path)


def figures(outcomes, results_dir, plan):
    """Rate sensitivity and early training loss, per stage and batch size."""
    lines = []
    if "gate" in plan and "comparison" in plan:
        lines.append("![]({})".format(accuracy_by_peak_rate(
            outcomes, os.path.join(results_dir, "accuracy_by_peak_rate.png"),
            plan)))
    groups = {}
    for outcome in outcomes.values():
        record = outcome.record
        key = (record["stage"], record.get("model"), record["batch_size"])
        groups.setdefault(key, []).append(outcome)
    tuning_seed = plan["tuning_seed"]
    main_warmup = {stage: plan[section]["warmup_epochs"]
                   for stage, section in (("pilot", "pilot"),
                                          ("compare", "comparison"))
                   if section in plan}
    for (stage, model, batch_size), group in sorted(groups.items()):
        name = f"{stage}_{model}_b{batch_size}"
        by_method = {}
        for outcome in group:
            by_method.setdefault(outcome.record["method"], []).append(outcome)
        sensitivity, early, seeds = {}, {}, set()
        for method, members in sorted(by_method.items()):
            variants = {}
            for o in members:
                if o.validation_accuracy is not None and (
                        o.record["seed"] == tuning_seed):
                    variants.setdefault(o.record["warmup_epochs"], []).append(
                        (o.record["base_learning_rate"],
                         100 * o.validation_accuracy))
            for warmup, points in sorted(variants.items()):
                points.sort()
                sensitivity[_variant_label(method, warmup)] = (
                    [r for r, _ in points], [a for _, a in points])
            run = _early_loss_run(members, main_warmup[stage], tuning_seed)
            if run is not None:
                losses = sorted(run.step_losses().items())
                cut = max(1, round(0.2 * (run.total_steps() or len(losses))))
                seeds.add(run.record["seed"])
                early[f"{_variant_label(method, run.record['warmup_epochs'])}"
                      f" at {_rate(run)}"] = (
                    [s for s, _ in losses if s <= cut],
                    [l for s, l in losses if s <= cut])
        if sensitivity:
            lines.append("![]({})".format(plot(
                os.path.join(results_dir, f"{name}_rates.png"),
                f"{name}: validation accuracy by rate, seed {tuning_seed}",
                sensitivity, "base rate (per 128 examples)",
                "validation accuracy (%)", log_x=True)))
        if early:
            lines.append("![]({})".format(plot(
                os.path.join(results_dir, f"{name}_early_loss.png"),
                f"{name}: training loss, first 20 % of steps; seed "
                + ", ".join(map(str, sorted(seeds))), early, "step",
                "training loss")))
    return lines


_RULE = (
    "Rule: each comparison is a difference per fresh seed (a seed fixes the "
    "initialisation and the data order for both methods), read through its "
    "95 % t-interval with n - 1 degrees of freedom. A difference is called "
    "only when its interval excludes 0; otherwise it is not detectable with "
    "n seeds, and the interval says how large a gap it still allows either "
    "way. No non-inferiority margin was set before these runs, so \"no "
    "worse\" is not shown for any method.")


def _pairing_note(outcomes):
    """Whether reruns of one config and seed were bit-identical."""
    loose = [o for o in outcomes.values() if o.status == "done" and not (
        (o.results.get("config") or {}).get("train") or {}).get(
            "deterministic")]
    return (f" The pairing is not exact: {len(loose)} of the "
            f"{len(outcomes)} runs ran without train.deterministic, so a "
            "rerun of one config and seed can differ by itself." if loose
            else "")


def _second_study_summary(plan, pilot_verdicts, verdict, compared,
                          outcomes):
    summary = ["## Verdict", "", _RULE + _pairing_note(outcomes), ""]
    threshold = plan["pilot"]["gap_points"]
    for model, gap, shows, paired in pilot_verdicts:
        rule = ("worse than SGD with warmup by the pilot's rule" if shows
                else "not worse than SGD with warmup by the pilot's rule")
        line = (f"- Pilot, {model}: SGD without warmup is {rule} (best-rate "
                f"gap {gap:+.1f} points of validation accuracy on the "
                f"tuning seed and the confirmation seeds, threshold "
                f"{threshold:g})")
        if len(paired) > 1:
            line += (". SGD + warmup minus SGD, no warmup, validation "
                     "accuracy paired by confirmation seed (" + ", ".join(
                         f"{seed}: {d:+.1f}" for seed, d in paired.items())
                     + "): " + _reading(list(paired.values()),
                                        "SGD + warmup"))
        summary.append(line if line.endswith(".") else line + ".")
    return summary + ((verdict + multiplicity_lines(
        compared, planned=_planned_count(plan))) or [
        "- Comparison: not run yet."])


def gate_verdict(plan, outcomes, model):
    """The gate of `plan["gate"]` for `model`, from the pilot's runs.

    Returns:
        dict with best_warm and best_cold (tuning runs), paired ({seed:
        test-accuracy difference in points, warmup minus none}), by_margin
        (rule a), largest_warm, largest_cold (rates that train, or None),
        warm_at_top (the warmup arm trains at its grid's top rate),
        by_rate (rule b) and passed; None without both tuning bests.
    """
    gate, tuning_seed = plan["gate"], plan["tuning_seed"]
    arms = {}
    for method in ("sgd_warmup", "sgd_nowarmup"):
        runs = _group(outcomes, stage="pilot", model=model, method=method)
        tuning = [o for o in runs if o.record["seed"] == tuning_seed]
        arms[method] = (runs, tuning, best(tuning))
    (warm_runs, warm_tuning, best_warm), (cold_runs, cold_tuning,
                                          best_cold) = arms.values()
    if best_warm is None or best_cold is None:
        return None
    warm_test = _accuracy_by_seed(_at_rate(warm_runs, best_warm),
                                  "test_accuracy")
    cold_test = _accuracy_by_seed(_at_rate(cold_runs, best_cold),
                                  "test_accuracy")
    paired = {seed: 100 * (warm_test[seed] - cold_test[seed])
              for seed in sorted(set(warm_test) & set(cold_test))}
    interval = paired_interval(list(paired.values()))
    by_margin = bool(interval and interval[0] > gate["margin_points"]
                     and interval[2] > 0)
    bar = max(best_warm.validation_accuracy, best_cold.validation_accuracy
              ) - gate["trains_within_points"] / 100

    def largest(tuning):
        rates = [o.record["base_learning_rate"] for o in tuning
                 if o.status == "done" and o.validation_accuracy >= bar]
        return max(rates) if rates else None

    largest_warm, largest_cold = largest(warm_tuning), largest(cold_tuning)
    by_rate = largest_warm is not None and (
        largest_cold is None
        or largest_cold <= gate["rate_ratio"] * largest_warm)
    return {"best_warm": best_warm, "best_cold": best_cold, "paired": paired,
            "by_margin": by_margin, "largest_warm": largest_warm,
            "largest_cold": largest_cold, "bar": bar,
            "warm_at_top": largest_warm is not None and largest_warm == max(
                o.record["base_learning_rate"] for o in warm_tuning),
            "by_rate": by_rate, "passed": by_margin or by_rate}


def gate_lines(plan, outcomes, sharpness_path):
    """The gate's verdict per model, in the plan's own terms."""
    gate = plan["gate"]
    lines = [
        f"Rule (fixed in the plan before the runs): passes if (a) SGD + "
        "warmup minus SGD without, test accuracy paired over the fresh "
        f"seeds, has a mean above {gate['margin_points']:g} points and a "
        "95 % t-interval above 0, or (b) the largest grid rate that trains "
        f"without warmup is at most {gate['rate_ratio']:g} times the largest "
        "with it (trains: finishes within "
        f"{gate['trains_within_points']:g} points of the better arm's best "
        "validation accuracy, tuning seed).", ""]
    sharpness = runs_lib.read_json(sharpness_path)
    if sharpness:
        limits = [s["base_rate_limit"] for s in sharpness["seeds"].values()]
        values = [s["lambda_0"] for s in sharpness["seeds"].values()]
        lines += [
            f"- Initial sharpness lambda_0 {min(values):.3g}-"
            f"{max(values):.3g} (seeds {', '.join(sharpness['seeds'])}, "
            f"{sharpness['examples']} examples): the stability limit "
            f"2(1 + {sharpness['momentum']:g})/lambda_0 is a base rate of "
            f"{min(limits):.3g}-{max(limits):.3g} at batch "
            f"{sharpness['batch_size']} (`python3 -m experiments.sharpness "
            f"--config {sharpness['config']} --seeds "
            f"{','.join(sharpness['seeds'])}`)."]
    for model in plan["pilot"]["models"]:
        verdict = gate_verdict(plan, outcomes, model)
        if verdict is None:
            lines.append(f"- {model}: the tuning runs are not done.")
            continue
        warm, cold = verdict["best_warm"], verdict["best_cold"]
        lines.append(
            f"- {model}: chosen rates (validation, seed "
            f"{plan['tuning_seed']}): with warmup {_rate(warm)} "
            f"({_percent(warm.validation_accuracy)} %), without "
            f"{_rate(cold)} ({_percent(cold.validation_accuracy)} %).")
        paired = verdict["paired"]
        if len(paired) > 1:
            lines.append(
                "- (a) SGD + warmup minus SGD, no warmup, test accuracy "
                "paired by seed (" + ", ".join(
                    f"{seed}: {d:+.1f}" for seed, d in paired.items())
                + "): " + _reading(list(paired.values()), "SGD + warmup")
                + f" Rule (a): {'met' if verdict['by_margin'] else 'not met'}"
                ".")
        else:
            lines.append("- (a) the fresh seeds are not done.")
        show = (lambda rate: "none" if rate is None
                else runs_lib.format_rate(rate))
        lines.append(
            f"- (b) largest rate that trains (validation >= "
            f"{_percent(verdict['bar'])} %): with warmup "
            f"{show(verdict['largest_warm'])}"
            + (" (the top of its grid: a lower bound)"
               if verdict["warm_at_top"] else "")
            + f", without {show(verdict['largest_cold'])}. Rule (b): "
            + ("met." if verdict["by_rate"] else "not met."))
        lines.append(f"- **Gate, {model}: "
                     f"{'passed' if verdict['passed'] else 'not passed'}**"
                     + ("" if len(paired) > 1 else " (so far)") + ".")
    return lines


def main(argv=None):
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=PLAN)
    parser.add_argument("--results_dir", default=RESULTS_DIR)
    parser.add_argument(
        "--seeds_for_half_width", type=float, default=None,
        help="instead of the report: for each compared difference, its "
             "paired spread and the seeds a next study needs for a 95 %% "
             "interval of at most this half-width (points)")
    args = parser.parse_args(argv)
    os.chdir(runs_lib.REPO_ROOT)
    with open(args.plan, encoding="utf-8") as f:
        plan = yaml.safe_load(f)
    outcomes = runs_lib.load_archived(os.path.join(args.results_dir, "runs"))
    pilot_lines, pilot_verdicts = pilot_section(plan, outcomes)
    compare_lines, verdict, compared = (
        comparison_section(plan, outcomes) if "comparison" in plan
        else ([], [], []))
    if args.seeds_for_half_width:
        print(seed_plan_lines(compared, args.seeds_for_half_width))
        return
    if "gate" in plan:
        summary = ["## The gate", ""] + gate_lines(
            plan, outcomes, os.path.join(args.results_dir, "sharpness.json"))
        if verdict:
            summary += ["", "## Comparison verdict", "", _RULE.replace(
                "No non-inferiority margin was set before these runs, so "
                "\"no worse\" is not shown for any method.",
                "CLARS is \"no worse\" only against the plan's "
                "non-inferiority margin.") + _pairing_note(outcomes), ""] + (
                verdict + multiplicity_lines(compared,
                                             planned=_planned_count(plan)))
        method = ("No batch norm; every run with train.deterministic=true "
                  "(reruns bit-identical, seeds paired exactly).")
    else:
        summary = _second_study_summary(plan, pilot_verdicts, verdict,
                                        compared, outcomes)
        method = ("Batch-norm statistics recomputed on 4,096 training "
                  "examples before each evaluation.")
    command = "python3 -m experiments.warmup_report" + (
        "" if args.plan == PLAN else
        f" --plan {args.plan} --results_dir {args.results_dir}")
    text = [f"# {plan.get('title', 'Second warmup study')}: results", "",
            f"Written by `{command}` from "
            f"`{args.results_dir}/runs/` (each run's command is in its "
            "run.json). Rates chosen on validation accuracy (5,000 held-out "
            "training examples); test accuracy only for fresh seeds. "
            + method, ""] + summary + [""] + pilot_lines + compare_lines
    text += ["## Figures", ""] + figures(outcomes, args.results_dir, plan) + [""]
    write_results(args.results_dir, text, outcomes)


def write_results(results_dir, text, outcomes):
    """Writes `text` lines, then the runs not finished, to results.md."""
    unfinished = sorted(o.run_id for o in outcomes.values()
                        if o.status not in ("done", "diverged"))
    if unfinished:
        text = text + ["## Unfinished runs", ""] + [
            f"- {run_id}" for run_id in unfinished]
    with open(os.path.join(results_dir, "results.md"), "w",
              encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")
    print(f"wrote {results_dir}/results.md ({len(outcomes)} runs)")


if __name__ == "__main__":
    main()
