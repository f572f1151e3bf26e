r"""Writes the study's report from the files its runs wrote, and nothing else.

    python3 -m experiments.report --output_dir runs/study

Reads, under OUTPUT_DIR, every run directory's `results.json` (written by
the trainer: config, per-epoch metrics, final), `diagnostics.jsonl` (CLARS
runs: per-layer trust ratio and a_l/||g_l||) and `run.json` (written by
experiments/study.py: the exact trainer command, status, wall time), plus
OUTPUT_DIR/study.json (the plan). Writes REPORT_DIR/results.md and PNG
plots beside it (default experiments/results; for a --quick study
OUTPUT_DIR/report, out of git). Works on a partial study (runs still
missing, diverged or interrupted) and without run.json or study.json: the
method, rate, seed and an equivalent command are then taken from the
config inside results.json.
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys

from experiments.study import format_rate as _rate
from experiments.study import read_json as _read_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REPORT_DIR = os.path.join("experiments", "results")
METHOD_ORDER = ("clars", "sgd_warmup", "lars_warmup", "sgd_nowarmup")
DEFAULT_LABELS = {"clars": "CLARS, no warmup", "sgd_warmup": "SGD + warmup",
                  "lars_warmup": "LARS + warmup",
                  "sgd_nowarmup": "SGD, no warmup"}
DEFAULT_TARGETS = (0.80, 0.85)
CHANCE_LEVEL = 0.12  # Fashion-MNIST has 10 balanced classes
# What a run directory holds that the report reads; copied next to the report
# so the numbers can be checked against files in git (checkpoints, exports
# and TensorBoard events stay behind).
RUN_FILES = ("results.json", "run.json", "diagnostics.jsonl", "train.log")
ARCHIVE_DIR = "runs"
COLORS = {"clars": "tab:red", "sgd_warmup": "tab:blue",
          "lars_warmup": "tab:green", "sgd_nowarmup": "tab:gray"}


def _read_jsonl(path):
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a killed run
    except OSError:
        pass
    return records


_STEP_LINE = re.compile(
    r"step (\d+)/\d+ epoch \S+ loss (\S+) accuracy (\S+) lr (\S+)")


def _read_step_log(path):
    """{step: (train loss, train accuracy, rate)} from the trainer's log.

    The trainer logs one line per loop (one step per loop in the study's
    configs); a resumed run logs some steps again, the last line wins.
    """
    steps = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                match = _STEP_LINE.search(line)
                if match:
                    try:
                        steps[int(match.group(1))] = tuple(
                            float(v) for v in match.group(2, 3, 4))
                    except ValueError:
                        continue
    except OSError:
        pass
    return steps


def _method_from_config(config):
    opt = config.get("optimizer", {})
    name = opt.get("name", "?")
    if name in ("sgd", "lars"):
        warm = "warmup" if opt.get("warmup_epochs", 0) > 0 else "nowarmup"
        return f"{name}_{warm}"
    return name


def _yaml_safe_json(value):
    """JSON that YAML reads back with the same types (1e-06 -> 1.0e-06)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_yaml_safe_json(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_yaml_safe_json(v) for v in value) + "]"
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        return mantissa + (f"e{exponent}" if exponent else "")
    return json.dumps(value)


def _command_from_config(model_dir, config):
    """A trainer command equivalent to the run, from its full config."""
    override = _yaml_safe_json(config)
    return ("python3 -m trainers.train --mode=train_and_eval "
            f"--model_dir={shlex.quote(model_dir)} "
            f"--params_override={shlex.quote(override)}")


class RunData:
    """What one run directory holds."""

    def __init__(self, model_dir, rel_dir):
        self.dir = rel_dir
        self.results = _read_json(os.path.join(model_dir, "results.json"))
        self.record = _read_json(os.path.join(model_dir, "run.json")) or {}
        self.diagnostics = _read_jsonl(
            os.path.join(model_dir, "diagnostics.jsonl"))
        self.steps = _read_step_log(os.path.join(model_dir, "train.log"))
        config = (self.results or {}).get("config") or {}
        self.config = config
        # Last resort for unreadable files: the study's directory layout
        # b<batch>/<method>/lr<rate>_s<seed>.
        match = re.search(r"b(\d+)/([\w-]+)/lr([0-9.eE+-]+)_s(\d+)$",
                          rel_dir.replace(os.sep, "/"))
        path_meta = ({"batch_size": int(match.group(1)),
                      "method": match.group(2),
                      "base_learning_rate": float(match.group(3)),
                      "seed": int(match.group(4))} if match else {})
        train, opt = config.get("train", {}), config.get("optimizer", {})
        rec = dict(path_meta, **self.record)
        self.method = rec.get("method") or (
            _method_from_config(config) if config else None)
        self.batch_size = int(rec.get("batch_size")
                              or train.get("global_batch_size") or 0)
        self.rate = float(rec.get("base_learning_rate")
                          or opt.get("base_learning_rate") or 0.0)
        self.seed = int(rec.get("seed", train.get("seed", 0)))
        self.run_id = rec.get("run_id") or (
            f"b{self.batch_size}/{self.method}/lr{_rate(self.rate)}"
            f"_s{self.seed}")
        self.command = rec.get("command") or (
            _command_from_config(rel_dir, config) if config else "?")
        self.epochs = [e for e in (self.results or {}).get("epochs") or []
                       if isinstance(e, dict)]
        self.final = (self.results or {}).get("final") or None
        if self.final and self.final.get("eval_accuracy") is not None:
            self.status = "done"
        else:
            status = rec.get("status")
            self.status = status if status in (
                "diverged", "failed", "running", "interrupted") else (
                    "incomplete")
            if self.results is None and os.path.exists(
                    os.path.join(model_dir, "results.json")):
                self.status = "unreadable results.json"
        self.error = rec.get("error", "")
        self.wall_seconds = rec.get("wall_seconds")
        self.cpu_seconds = rec.get("cpu_seconds")

    @property
    def accuracy(self):
        return self.final.get("eval_accuracy") if self.final else None

    def curve(self, key):
        return [(e["epoch"], e[key]) for e in self.epochs
                if e.get(key) is not None and e.get("epoch") is not None]

    def epochs_to(self, target):
        for epoch, accuracy in self.curve("eval_accuracy"):
            if accuracy >= target:
                return epoch
        return None

    def peak_rate(self):
        opt = self.config.get("optimizer", {})
        reference = opt.get("reference_batch_size") or 128
        return self.rate * self.batch_size / reference

    @property
    def at_chance(self):
        """Final accuracy no better than guessing (10 classes): a blow-up
        that batch norm kept finite."""
        return self.accuracy is not None and self.accuracy < CHANCE_LEVEL

    def accuracy_after(self, epoch):
        for e, accuracy in self.curve("eval_accuracy"):
            if e == epoch:
                return accuracy
        return None

    def outcome(self):
        """The final accuracy as text, or why there is none."""
        if self.accuracy is not None:
            return f"{100 * self.accuracy:.2f}" + (
                " (chance)" if self.at_chance else "")
        if self.status == "diverged":
            match = re.search(r"at step (\d+)|between steps (\d+)",
                              self.error or "")
            where = (f"step {match.group(1) or match.group(2)}" if match
                     else f"epoch {len(self.epochs) + 1}")
            return f"diverged ({where})"
        return self.status


def load_runs(output_dir):
    runs = []
    for root, dirs, files in os.walk(output_dir):
        dirs.sort()
        if "results.json" in files or "run.json" in files:
            rel = os.path.relpath(root, REPO_ROOT) if os.path.isabs(
                root) else root
            run = RunData(root, rel)
            if run.batch_size and run.method:
                runs.append(run)
            dirs[:] = [d for d in dirs if d not in ("checkpoints", "export",
                                                    "train", "eval")]
    return runs


def _mean_spread(values):
    """'mean ± sd (min–max, n)' in percent."""
    values = [100 * v for v in values]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return (f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"({min(values):.2f}–{max(values):.2f}, n={len(values)})")


class Report:
    """Groups the runs and writes results.md and the plots."""

    def __init__(self, output_dir, report_dir, targets=None):
        self.output_dir, self.report_dir = output_dir, report_dir
        self.study = _read_json(os.path.join(output_dir, "study.json")) or {}
        self.plan = self.study.get("plan") or {}
        self.targets = list(targets or self.plan.get("targets")
                            or DEFAULT_TARGETS)
        self.runs = load_runs(output_dir)
        methods = list(self.plan.get("methods") or {})
        seen = {r.method for r in self.runs}
        self.methods = [m for m in methods if m in seen] + sorted(
            (seen - set(methods)), key=lambda m: (
                METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
        self.batch_sizes = sorted({r.batch_size for r in self.runs})
        seeds = self.plan.get("seeds")
        self.tuning_seed = seeds[0] if seeds else (
            min(r.seed for r in self.runs) if self.runs else 0)
        self.ids = {}  # run_id -> short reference [n]
        self.figures = []

    def label(self, method):
        spec = (self.plan.get("methods") or {}).get(method) or {}
        return spec.get("label") or DEFAULT_LABELS.get(method, method)

    def ref(self, runs):
        refs = []
        for run in runs:
            if run.run_id not in self.ids:
                self.ids[run.run_id] = len(self.ids) + 1
            refs.append(f"[{self.ids[run.run_id]}]")
        return " ".join(refs)

    def select(self, batch_size, method):
        """(tuning runs by rate, best rate or None, runs at the best rate)."""
        group = [r for r in self.runs
                 if r.batch_size == batch_size and r.method == method]
        tuning = sorted((r for r in group if r.seed == self.tuning_seed),
                        key=lambda r: r.rate)
        grid = self.grid(method, batch_size)
        finished = [r for r in tuning if r.accuracy is not None and any(
            math.isclose(r.rate, rate) for rate in grid)]
        best = max(finished, key=lambda r: r.accuracy).rate if (
            finished) else None
        at_best = sorted((r for r in group if best is not None
                          and math.isclose(r.rate, best)),
                         key=lambda r: r.seed)
        return tuning, best, at_best

    def grid(self, method, batch_size):
        """The rates the best is chosen from: the plan's grid, plus the rate
        the study ran beyond an edge of it (study.json)."""
        spec = (self.plan.get("methods") or {}).get(method) or {}
        grid = [float(g) for g in spec.get("grid") or []]
        if not grid:
            return sorted({r.rate for r in self.runs if r.method == method
                           and r.batch_size == batch_size})
        edge = self.edge_rate(method, batch_size)
        return sorted(grid + ([edge] if edge is not None else []))

    def edge_rate(self, method, batch_size):
        tuning = ((self.study.get("tuning") or {}).get(str(batch_size))
                  or {}).get(method) or {}
        edge = tuning.get("beyond_edge")
        return float(edge) if edge is not None else None

    def config_using(self, optimizer):
        """The config of the first run with `optimizer`, or None."""
        return next((r.config for r in self.runs
                     if r.config.get("optimizer", {}).get("name")
                     == optimizer), None)

    # Text ----------------------------------------------------------------

    def setup_lines(self):
        lines = []
        plan = self.plan
        any_config = next((r.config for r in self.runs if r.config), {})
        train = any_config.get("train", {})
        opt = any_config.get("optimizer", {})
        if plan:
            lines.append(
                f"- Batch sizes {plan.get('batch_sizes')}, "
                f"{plan.get('epochs')} epoch(s) per run"
                + (f" cut to {plan['max_steps']} steps"
                   if plan.get("max_steps") else "")
                + f", seeds {plan.get('seeds')} (seed {self.tuning_seed} "
                "tunes; the best rate is rerun with the others), warmup "
                f"{plan.get('warmup_epochs_used')} epoch(s) for the warmup "
                "methods.")
        if any_config:
            lines.append(
                f"- Model {any_config.get('model', {}).get('name')} on "
                f"{any_config.get('task', {}).get('dataset')} "
                f"({any_config.get('task', {}).get('image_size')} px), "
                f"momentum {opt.get('momentum')}, coupled L2 "
                f"{opt.get('weight_decay_rate')}, peak rate = base × B / "
                f"{opt.get('reference_batch_size')}, {opt.get('decay')} "
                f"decay (power {opt.get('power')}) to "
                f"{opt.get('end_learning_rate')} over the whole run; "
                f"eval on the 10,000 test images every "
                f"{train.get('eval_every_epochs')} epoch.")
        clars = self.config_using("clars")
        if clars and {"clars", "estimator"} <= set(clars):
            c, e = clars["clars"], clars["estimator"]
            lines.append(
                f"- CLARS: trust_coefficient {c['trust_coefficient']}, "
                f"trust_clip {c['trust_clip']}, epsilon {c['epsilon']}; "
                f"estimator s = {e['micro_batch_size']} examples × J = "
                f"{e['num_micro_batches']} micro-batches per step.")
        lars = self.config_using("lars")
        if lars and "lars" in lars:
            c = lars["lars"]
            lines.append(
                f"- LARS (MLPerf): trust_coefficient "
                f"{c['trust_coefficient']}, epsilon {c['epsilon']}, "
                f"decay of excluded variables "
                f"{c['decay_excluded_variables']}.")
        lines.append(
            "- The best rate is chosen on the tuning seed's final test "
            "accuracy (the trainer has no separate validation split), so "
            "that seed's numbers are optimistic for every method alike; "
            "the other seeds are not used for the choice.")
        return lines

    def main_table(self, batch_size):
        header = ["Method", "best base rate (peak)",
                  "final test acc. % (mean ± sd (min–max, n))",
                  "best-epoch test acc. %"]
        header += [f"epochs to {100 * t:g}%" for t in self.targets]
        header += ["test acc. % after epoch 1", "final train loss",
                   "wall time per run", "runs"]
        rows = []
        for method in self.methods:
            tuning, best, at_best = self.select(batch_size, method)
            if not tuning and not at_best:
                continue
            if best is None:
                rows.append([self.label(method), "none finished", "–", "–"]
                            + ["–"] * len(self.targets)
                            + ["–", "–", "–", self.ref(tuning)])
                continue
            done = [r for r in at_best if r.accuracy is not None]
            failed = [r for r in at_best if r.accuracy is None]
            accuracy = _mean_spread([r.accuracy for r in done])
            if failed:
                accuracy += "; " + ", ".join(
                    f"seed {r.seed}: {r.outcome()}" for r in failed)
            best_epoch = _mean_spread(
                [max(a for _, a in r.curve("eval_accuracy"))
                 for r in done if r.curve("eval_accuracy")])
            reach = []
            for target in self.targets:
                epochs = [r.epochs_to(target) for r in done]
                reached = [e for e in epochs if e is not None]
                text = (f"{statistics.mean(reached):g}" if reached else
                        "not reached")
                if reached and len(reached) < len(epochs):
                    text += f" ({len(reached)}/{len(epochs)} seeds)"
                reach.append(text)
            losses = [r.curve("train_loss")[-1][1] for r in done
                      if r.curve("train_loss")]
            loss = (f"{statistics.mean(losses):.3f}" if losses else "–")
            first = _mean_spread([r.accuracy_after(1) for r in done
                                  if r.accuracy_after(1) is not None])
            walls = [r.wall_seconds for r in done
                     if isinstance(r.wall_seconds, (int, float))]
            wall = f"{statistics.mean(walls):.0f} s" if walls else "–"
            peak = at_best[0].peak_rate()
            rows.append([self.label(method), f"{_rate(best)} ({peak:.3g})",
                         accuracy, best_epoch] + reach
                        + [first, loss, wall, self.ref(at_best)])
        return _table(header, rows)

    def tuning_table(self, batch_size):
        methods = [m for m in self.methods if self.select(batch_size, m)[0]]
        width = max((len(self.grid(m, batch_size)) for m in methods),
                    default=0)
        header = ["Method"] + [f"rate {i + 1}" for i in range(width)] + [
            "note"]
        rows = []
        for method in methods:
            tuning, best, _ = self.select(batch_size, method)
            by_rate = {_rate(r.rate): r for r in tuning}
            grid = self.grid(method, batch_size)
            edge = self.edge_rate(method, batch_size)
            cells = []
            for rate in grid:
                run = by_rate.get(_rate(rate))
                if run is None:
                    cells.append(f"{_rate(rate)}: not run")
                    continue
                text = f"{_rate(rate)}: {run.outcome()} {self.ref([run])}"
                if edge is not None and math.isclose(rate, edge):
                    text += " (beyond the edge)"
                if best is not None and math.isclose(run.rate, best):
                    text = f"**{text}**"
                cells.append(text)
            cells += [""] * (width - len(cells))
            note = ""
            extra = [r for r in tuning
                     if not any(math.isclose(r.rate, g) for g in grid)]
            if best is not None and len(grid) > 1 and (
                    math.isclose(best, min(grid))
                    or math.isclose(best, max(grid))):
                best_run = by_rate[_rate(best)]
                beyond = [r for r in extra if (r.rate < best) == (
                    math.isclose(best, min(grid)))]
                if beyond and all(r.accuracy is None
                                  or r.accuracy < best_run.accuracy
                                  for r in beyond):
                    note = ("best at the grid's edge; the rates also run "
                            "beyond that edge did worse")
                else:
                    note = ("best at the grid's edge: the optimum may lie "
                            "outside it")
            if extra:
                note += (" also run: " + ", ".join(
                    f"{_rate(r.rate)}: {r.outcome()} {self.ref([r])}"
                    for r in extra))
            rows.append([self.label(method)] + cells + [note.strip()])
        return _table(header, rows)

    def observations(self, batch_size):
        """Plain comparisons of the numbers in the main table."""
        lines = []
        summary = {}
        for method in self.methods:
            _, best, at_best = self.select(batch_size, method)
            done = [r.accuracy for r in at_best if r.accuracy is not None]
            if done:
                summary[method] = (statistics.mean(done),
                                   (max(done) - min(done)) if len(done) > 1
                                   else None, at_best)
        if not summary:
            return ["- No finished runs yet."]
        ranked = sorted(summary, key=lambda m: -summary[m][0])
        lines.append("- Ranking by mean final test accuracy: " + ", ".join(
            f"{self.label(m)} {100 * summary[m][0]:.2f}%" for m in ranked)
            + ".")
        if "clars" in summary:
            mean, spread, runs = summary["clars"]
            for other in ranked:
                if other == "clars":
                    continue
                o_mean, o_spread, o_runs = summary[other]
                diff = 100 * (mean - o_mean)
                spreads = [s for s in (spread, o_spread) if s is not None]
                if spreads:
                    width = 100 * max(spreads)
                    within = ("within" if abs(diff) <= width else "outside")
                    note = (f"{within} the larger min–max range over "
                            f"seeds, {width:.2f} points")
                else:
                    note = "single seeds: no spread to compare with"
                verdict = ("higher than" if diff > 0 else "lower than" if
                           diff < 0 else "equal to")
                lines.append(
                    f"- CLARS is {abs(diff):.2f} points {verdict} "
                    f"{self.label(other)} ({note}) "
                    f"{self.ref(runs + o_runs)}.")
        for method in self.methods:
            tuning, _, _ = self.select(batch_size, method)
            bad = [r for r in tuning
                   if r.status in ("diverged", "failed") or r.at_chance]
            if bad:
                lines.append(
                    f"- {self.label(method)}: {len(bad)} of {len(tuning)} "
                    "tuning rates diverged, failed or ended at chance level "
                    f"(< {100 * CHANCE_LEVEL:g}%) ("
                    + ", ".join(f"{_rate(r.rate)}: {r.outcome()}"
                                for r in bad)
                    + f") {self.ref(bad)}.")
        for target in self.targets:
            reached = {}
            for method in summary:
                epochs = [r.epochs_to(target) for r in summary[method][2]
                          if r.accuracy is not None]
                if epochs and all(e is not None for e in epochs):
                    reached[method] = statistics.mean(epochs)
            if reached:
                first = min(reached.values())
                lines.append(
                    f"- {100 * target:g}% test accuracy first reached (mean "
                    f"epoch over seeds) after {first:g} epoch(s) by "
                    + ", ".join(self.label(m) for m in reached
                                if reached[m] == first)
                    + "; methods with a seed that never reached it: "
                    + (", ".join(self.label(m) for m in summary
                                 if m not in reached) or "none") + ".")
        return lines

    # Plots ---------------------------------------------------------------

    def plots(self):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:  # the report still has its tables
            print(f"[report] no plots: {error}", file=sys.stderr)
            return
        import matplotlib.ticker  # noqa: F401 (used as matplotlib.ticker)
        for batch_size in self.batch_sizes:
            self._curves(plt, batch_size)
            self._step_curves(plt, batch_size)
        self._tuning_plot(plt)
        self._noise_plot(plt)

    def _save(self, plt, fig, name, caption, runs):
        path = os.path.join(self.report_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.figures.append((name, caption, self.ref(runs)))

    def _curves(self, plt, batch_size):
        import matplotlib
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        used = []
        for method in self.methods:
            _, best, at_best = self.select(batch_size, method)
            for i, run in enumerate(at_best):
                label = (f"{self.label(method)} (base {_rate(best)})"
                         if i == 0 else None)
                style = dict(color=COLORS.get(method), marker="o",
                             markersize=3, alpha=0.9 if i == 0 else 0.5,
                             linestyle="-" if i == 0 else "--")
                for ax, key in zip(axes, ("train_loss", "eval_accuracy")):
                    points = run.curve(key)
                    if points:
                        ax.plot(*zip(*points), label=label, **style)
                used.append(run)
        axes[0].set(xlabel="epoch", ylabel="training loss (epoch mean)",
                    title=f"B = {batch_size}: training loss")
        axes[0].set_yscale("log")
        for ax in axes:
            ax.xaxis.set_major_locator(
                matplotlib.ticker.MaxNLocator(integer=True))
        axes[1].set(xlabel="epoch", ylabel="test accuracy",
                    title=f"B = {batch_size}: test accuracy")
        for target in self.targets:
            axes[1].axhline(target, color="k", linewidth=0.5, linestyle=":")
        if not used:
            plt.close(fig)
            return
        axes[1].legend(fontsize=8, loc="lower right")
        self._save(plt, fig, f"curves_b{batch_size}.png",
                   f"Training loss and test accuracy per epoch at B = "
                   f"{batch_size}, each method at its best base rate "
                   "(solid: tuning seed; dashed: other seeds; dotted lines: "
                   "targets).", used)

    def _step_curves(self, plt, batch_size):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        used = []
        for method in self.methods:
            _, best, at_best = self.select(batch_size, method)
            for i, run in enumerate(r for r in at_best if r.steps):
                steps = sorted(run.steps)
                label = (f"{self.label(method)} (base {_rate(best)})"
                         if i == 0 else None)
                style = dict(color=COLORS.get(method), linewidth=1.2,
                             alpha=0.9 if i == 0 else 0.5,
                             linestyle="-" if i == 0 else "--")
                axes[0].plot(steps, [run.steps[s][0] for s in steps],
                             label=label, **style)
                if i == 0:
                    axes[1].plot(steps, [run.steps[s][2] for s in steps],
                                 label=label, **style)
                used.append(run)
        if not used:
            plt.close(fig)
            return
        axes[0].set(xlabel="step", ylabel="training loss (step batch)",
                    title=f"B = {batch_size}: training loss per step")
        axes[0].set_yscale("log")
        axes[1].set(xlabel="step", ylabel="global learning rate",
                    title=f"B = {batch_size}: schedule (CLARS and LARS "
                    "scale it per layer)")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)
        self._save(plt, fig, f"steps_b{batch_size}.png",
                   f"Per-step training loss (solid: tuning seed; dashed: "
                   f"other seeds) and the global learning rate at B = "
                   f"{batch_size}, each method at its best base rate, from "
                   "the trainer's log (train.log).", used)

    def _tuning_plot(self, plt):
        if not self.batch_sizes:
            return
        fig, axes = plt.subplots(1, len(self.batch_sizes),
                                 figsize=(5.5 * len(self.batch_sizes), 4),
                                 squeeze=False)
        used = []
        for ax, batch_size in zip(axes[0], self.batch_sizes):
            for method in self.methods:
                tuning, _, _ = self.select(batch_size, method)
                done = [r for r in tuning if r.accuracy is not None]
                bad = [r for r in tuning if r.accuracy is None]
                if done:
                    ax.plot([r.rate for r in done],
                            [r.accuracy for r in done], marker="o",
                            color=COLORS.get(method), label=self.label(method))
                if bad:
                    ax.scatter([r.rate for r in bad], [0.1] * len(bad),
                               marker="x", color=COLORS.get(method))
                used += tuning
            ax.set_xscale("log")
            ax.set(xlabel="base learning rate (per 128 examples)",
                   ylabel="final test accuracy",
                   title=f"B = {batch_size}: tuning (seed "
                   f"{self.tuning_seed})")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        self._save(plt, fig, "tuning.png",
                   "Final test accuracy over each method's grid (× at 0.1: "
                   "diverged or did not finish).", used)

    def _noise_plot(self, plt):
        chosen = []
        for batch_size in self.batch_sizes:
            _, _, at_best = self.select(batch_size, "clars")
            candidates = [r for r in at_best if r.diagnostics] or [
                r for r in self.runs if r.batch_size == batch_size
                and r.method == "clars" and r.diagnostics]
            if candidates:
                chosen.append((batch_size, candidates[0]))
        if not chosen:
            return
        fig, axes = plt.subplots(2, len(chosen), figsize=(
            5.5 * len(chosen), 7), squeeze=False)
        for column, (batch_size, run) in enumerate(chosen):
            paths = list(run.diagnostics[0].get("layers", {}))
            kernels = [p for p in paths if p.endswith("kernel")] or paths
            picks = []
            for index in (0, len(kernels) // 2, len(kernels) - 2,
                          len(kernels) - 1):
                if 0 <= index < len(kernels) and kernels[index] not in picks:
                    picks.append(kernels[index])
            bn = [p for p in paths if p.endswith("gamma")]
            if bn:
                picks.append(bn[0])
            steps = [d["step"] for d in run.diagnostics]
            for path in picks:
                for row, key in enumerate(("noise_ratio", "trust_ratio")):
                    values = [d["layers"].get(path, {}).get(key)
                              for d in run.diagnostics]
                    axes[row][column].plot(steps, values, marker=".",
                                           label=path)
            epoch_steps = (run.results or {}).get("steps_per_epoch")
            axes[0][column].set(
                xlabel="step", ylabel="a_l / ||g_l||",
                title=f"B = {batch_size}: CLARS base {_rate(run.rate)}, "
                f"seed {run.seed}")
            axes[0][column].set_yscale("log")
            axes[1][column].set(xlabel="step", ylabel="trust ratio",
                                title="CLARS trust ratio (clip shown dotted)")
            axes[1][column].set_yscale("log")
            clip = run.config.get("clars", {}).get("trust_clip")
            if clip:
                axes[1][column].axhline(clip, color="k", linestyle=":",
                                        linewidth=0.8)
            if epoch_steps:
                for ax in axes[:, column]:
                    for e in range(1, len(run.epochs) + 1):
                        if e * epoch_steps <= max(steps):
                            ax.axvline(e * epoch_steps, color="0.8",
                                       linewidth=0.5)
            if axes[0][column].get_legend_handles_labels()[0]:
                axes[0][column].legend(fontsize=7)
        self._save(plt, fig, "noise_ratio.png",
                   "CLARS diagnostics: per-layer a_l/||g_l|| (the average "
                   "micro-batch gradient norm over the norm of the full-batch "
                   "gradient, on a separate batch) and the trust ratio, over "
                   "training, for a few layers (grey lines: epoch ends). "
                   "Variables of rank <= 1 (batch-norm gamma) use trust 1.",
                   [run for _, run in chosen])

    # Output --------------------------------------------------------------

    def write(self):
        os.makedirs(self.report_dir, exist_ok=True)
        self.plots()
        regenerate = ("python3 -m experiments.report "
                      f"--output_dir {shlex.quote(self.output_dir)}")
        out = ["# CLARS reproduction study: results", ""]
        if self.plan.get("quick"):
            out += ["> **QUICK smoke run** (`--quick`): a few steps of one "
                    "epoch, one rate and one seed per method. It checks the "
                    "pipeline; its numbers are not evidence for or against "
                    "CLARS.", ""]
        out += [
            "Produced by "
            + (f"`{self.study['command']}`" if self.study.get("command")
               else "the runs under the output directory")
            + f" (runs under `{self.output_dir}`); this page by "
            f"`{regenerate}`, from the runs' files only. Every number "
            "carries references [n] to the runs that produced it; the "
            "trainer command of each is listed under \"Runs\" at the end.",
            "",
        ]
        total = sum(1 for _ in self.runs)
        done = sum(1 for r in self.runs if r.status == "done")
        out += [f"Runs found: {total}, finished: {done}"
                + (f", diverged: {sum(r.status == 'diverged' for r in self.runs)}")
                + (f", other: {total - done - sum(r.status == 'diverged' for r in self.runs)}")
                + ".", ""]
        if self.study and not self.study.get("finished"):
            out += ["> The study has not finished: tables show what exists "
                    "so far.", ""]
        out += ["## Setup", ""] + self.setup_lines() + [""]
        for batch_size in self.batch_sizes:
            steps = next(((r.results or {}).get("steps_per_epoch")
                          for r in self.runs if r.batch_size == batch_size
                          and r.results), None)
            out += [f"## Batch size {batch_size}"
                    + (f" ({steps} steps per epoch)" if steps else ""), ""]
            out += ["Each method at its best base rate; final = after the "
                    "last epoch. sd over seeds; 'epochs to' is the mean over "
                    "seeds of the first epoch whose test accuracy reaches "
                    "the target.", ""]
            out += self.main_table(batch_size) + [""]
            out += [f"Tuning grid (seed {self.tuning_seed}; final test "
                    "accuracy %, best in bold; \"beyond the edge\": the one "
                    "rate the study adds past a grid edge where the best of "
                    "the stated grid sat):", ""]
            out += self.tuning_table(batch_size) + [""]
            out += ["What the numbers show:", ""]
            out += self.observations(batch_size) + [""]
        if self.figures:
            out += ["## Plots", ""]
            for name, caption, refs in self.figures:
                out += [f"![{name}]({name})", "", f"{caption} Runs: {refs}",
                        ""]
        out += ["## Runs", "",
                "Run from the repository root. Wall time is the study's "
                "measure of the whole subprocess (start-up, training, "
                "evaluation, export). \"files\" links each run's "
                f"{', '.join(RUN_FILES)}, copied under `{ARCHIVE_DIR}/` "
                "next to this page; `python3 -m experiments.report "
                f"--output_dir {shlex.quote(self.archive_dir())}` "
                "regenerates the tables from that copy.", ""]
        rows = []
        for run in sorted(self.runs, key=lambda r: self.ids.get(
                r.run_id, 10 ** 6)):
            if run.run_id not in self.ids:
                self.ids[run.run_id] = len(self.ids) + 1
            wall = (f"{run.wall_seconds:.0f} s" if isinstance(
                run.wall_seconds, (int, float)) else "–")
            if isinstance(run.cpu_seconds, (int, float)):
                wall += f" ({run.cpu_seconds:.0f} s CPU)"
            status = run.status + (f": {run.error}" if run.error and
                                   run.status != "done" else "")
            files = "/".join([ARCHIVE_DIR] + self.relative_dir(run).split(
                os.sep))
            rows.append([f"[{self.ids[run.run_id]}]",
                         f"`{run.dir}` ([files]({files}/))",
                         status.replace("|", "/"), wall,
                         f"`{run.command}`"])
        out += _table(["ref", "run directory", "status",
                       "wall time (CPU time)", "command"], rows)
        walls = [r.wall_seconds for r in self.runs
                 if isinstance(r.wall_seconds, (int, float))]
        if walls:
            cpus = [r.cpu_seconds for r in self.runs
                    if isinstance(r.cpu_seconds, (int, float))]
            out += ["", f"Total wall time of the runs: "
                    f"{sum(walls) / 3600:.2f} h over {len(walls)} runs"
                    + (f"; CPU time {sum(cpus) / 3600:.2f} h (user + "
                       "system, all threads; independent of other jobs on "
                       "the machine)" if cpus else "") + "."]
        path = os.path.join(self.report_dir, "results.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
        self.archive()
        return path

    def archive_dir(self):
        return os.path.join(self.report_dir, ARCHIVE_DIR)

    def archive(self):
        """Copies the files the report read to REPORT_DIR/runs/<run>/.

        The copy keeps the study's layout, so `--output_dir REPORT_DIR/runs`
        regenerates the same tables from it (and skips this step). It is
        built beside the old copy and swapped in, so it always matches
        results.md and an interrupted report leaves the old one whole.
        """
        final = os.path.realpath(self.archive_dir())
        if os.path.realpath(self.output_dir) == final:
            return
        staging, retired = final + ".new", final + ".old"
        for leftover in (staging, retired):
            shutil.rmtree(leftover, ignore_errors=True)
        for run in self.runs:
            source = os.path.join(self.output_dir, self.relative_dir(run))
            target = os.path.join(staging, self.relative_dir(run))
            os.makedirs(target, exist_ok=True)
            for name in RUN_FILES:
                if os.path.exists(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name),
                                    os.path.join(target, name))
        study = os.path.join(self.output_dir, "study.json")
        os.makedirs(staging, exist_ok=True)
        if os.path.exists(study):
            shutil.copyfile(study, os.path.join(staging, "study.json"))
        if os.path.exists(final):
            os.rename(final, retired)
        os.rename(staging, final)
        shutil.rmtree(retired, ignore_errors=True)

    def relative_dir(self, run):
        """The run's directory relative to OUTPUT_DIR."""
        absolute = run.dir if os.path.isabs(run.dir) else os.path.join(
            REPO_ROOT, run.dir)
        return os.path.relpath(os.path.realpath(absolute),
                               os.path.realpath(self.output_dir))


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    if not rows:
        lines.append("| " + " | ".join(["(no runs yet)"] + [""] * (
            len(header) - 1)) + " |")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m experiments.report",
        description="Writes results.md and plots from a study's run files.")
    parser.add_argument("--output_dir", default=os.path.join("runs", "study"),
                        help="The study's output directory (default "
                        "%(default)s).")
    parser.add_argument("--report_dir", default=None,
                        help=f"Where results.md goes (default "
                        f"{DEFAULT_REPORT_DIR}; OUTPUT_DIR/report for a "
                        "--quick study).")
    parser.add_argument("--targets", default=None,
                        help="Comma-separated target test accuracies "
                        "(default from the plan, else 0.80,0.85).")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.chdir(REPO_ROOT)
    if not os.path.isdir(args.output_dir):
        sys.exit(f"error: {args.output_dir} does not exist; run "
                 "`python3 -m experiments.study` first (or pass "
                 "--output_dir).")
    study = _read_json(os.path.join(args.output_dir, "study.json")) or {}
    report_dir = args.report_dir or (
        os.path.join(args.output_dir, "report")
        if (study.get("plan") or {}).get("quick") else DEFAULT_REPORT_DIR)
    targets = ([float(t) for t in args.targets.split(",")]
               if args.targets else None)
    report = Report(args.output_dir, report_dir, targets)
    path = report.write()
    print(f"[report] {len(report.runs)} runs -> {path}")
    return path


if __name__ == "__main__":
    main()
