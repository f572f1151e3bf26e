r"""The warmup studies (issues 11, 18, 27): does CLARS remove the need for warmup?

    python3 -m experiments.warmup_study --stage budget --plan P  # epochs
    python3 -m experiments.warmup_study --stage pilot --max_hours 1
    python3 -m experiments.warmup_study --stage compare --max_hours 2
    python3 -m experiments.warmup_study --dry_run          # commands only
    python3 -m experiments.warmup_study --stage check      # a rerun check

Stages (plan: configs/warmup_study/plan.yaml):

0. budget (plans with a budget_pilot): one method over a ladder of epoch
   budgets doubling from the first, per batch size, until doubling no
   longer lowers the training loss or raises validation accuracy by the
   plan's margins; the study trains for the budget it chooses.
1. pilot: SGD with and without warmup over one rate grid per candidate
   model; establishes whether there is a warmup gap to remove.
2. compare (only after a pilot that shows a gap, or with --force): per
   batch size, every method tuned on validation accuracy over a grid a
   factor 2 apart, extended until the best rate is interior; SGD + warmup
   at its best rate with a shorter and a longer warmup; every method and
   ablation at its chosen rate with fresh seeds, evaluated on validation
   and test.
3. extend (plans with a seed_extension): more seeds for the primary
   comparisons whose interval is wider than the plan allows, decided on
   their spread alone.
4. check: reruns one finished run, drawn from the archive with
   --check_seed, and says whether it came out bit-identical
   (`experiments.rerun_check`); the verdict goes to RERUN_CHECK beside
   the archive, the exit code is 1 when it is not identical.

Every rate is chosen on the validation split (task.validation_examples)
with batch-norm statistics recomputed before each evaluation; test
accuracy is measured only in the fresh-seed runs. Each run is a trainer
subprocess (this interpreter, this checkout on PYTHONPATH) in
`--work_dir` (checkpoints; out of git); its small files go to
`--archive_dir` (committed), from which `experiments.warmup_report`
rebuilds the report. `--max_hours H` stops cleanly before a run that would
end past H hours; the same command continues where it stopped (finished
runs are kept, an interrupted run resumes from its last epoch checkpoint).
A stage also stops, naming the runs and their logs, at a trainer that
cannot import or after 3 failed run attempts in a row, whatever the error.
"""

import argparse
import math
import os
import random
import shlex
import sys
import time

import yaml

from experiments import rerun_check
from experiments import runs as runs_lib

PLAN = "configs/warmup_study/plan.yaml"
WORK_DIR = "runs/warmup_study"
ARCHIVE_DIR = "experiments/warmup_results/runs"
# Expected seconds of a run before any has finished in this session.
FIRST_RUN_GUESS = 180.0
# The check stage's verdict, in the archive's parent (the results dir).
RERUN_CHECK = "rerun_check.json"
# Failed runs in a row (errors, not divergences) after which a stage stops:
# one failure can be a race or a hiccup, and the study runs it again; this
# many in a row mean a broken environment or code, which would fail every
# run left and spend the budget's hours on nothing.
MAX_FAILURES_IN_A_ROW = 3


class OutOfTime(Exception):
    """The next run would end past --max_hours."""


class RunsKeepFailing(Exception):
    """Runs failed MAX_FAILURES_IN_A_ROW times in a row: a stop, not a skip."""

    def __init__(self, failures):
        listed = "\n".join(f"  {run.run_id}: {error} (log: "
                           f"{os.path.join(run.model_dir, 'train.log')})"
                           for run, error in failures)
        super().__init__(
            f"[study] the last {len(failures)} run attempts failed, so the "
            f"stage stopped rather than fail every run left:\n{listed}\n"
            "Read their logs and fix the cause, then run the same command "
            "again; the failed runs are run again.")


class TrainerCannotStart(Exception):
    """A run failed importing the trainer: every other run would too."""

    def __init__(self, run_id, error):
        super().__init__(
            f"[study] {run_id}: the trainer could not start ({error}) "
            f"under {sys.executable}, so the stage stopped there rather "
            "than fail every run. Run the study with the interpreter of "
            "the environment scripts/install.sh makes (.venv/bin/python3) "
            "and the same command again; the failed run is run again.")


def load_plan(path):
    with open(os.path.join(runs_lib.REPO_ROOT, path), encoding="utf-8") as f:
        return yaml.safe_load(f)


def rate_beyond_edge(rates, best_rate):
    """The next rate past the edge where the best sits, at the grid's step.

    The step is the ratio of the two rates at that edge snapped to the
    nearest power of sqrt(2) (grid rates are rounded: 0.025 / 0.0177 is a
    sqrt(2) step), so a factor-2 grid extends by 2 and a sqrt(2) grid by
    sqrt(2); the new rate is rounded to 3 significant digits, as the plans
    write them.
    """
    rates = sorted(rates)
    if len(rates) < 2:
        return None
    if best_rate == rates[0]:
        edge, ratio = rates[0], rates[0] / rates[1]
    elif best_rate == rates[-1]:
        edge, ratio = rates[-1], rates[-1] / rates[-2]
    else:
        return None
    step = 2 ** (round(2 * math.log2(ratio)) / 2)
    return float(f"{edge * step:.3g}")


class Study:
    """Runs the plan's stages; every decision reads archived run files."""

    def __init__(self, plan, args):
        self.plan, self.args = plan, args
        self.started = time.time()
        self.durations = []
        self.failures_in_a_row = []
        # Per batch size, selection candidates outside --methods, read from
        # the archive (read_tuning).
        self.read_at = {}
        self.dry_run = args.dry_run
        self.planned = []

    # Runs -------------------------------------------------------------

    def spec(self, stage, model, batch_size, method, config, rate, warmup,
             seed, epochs, splits="validation", extra=()):
        overrides = [
            f"model.name={model}",
            f"task.validation_examples={self.plan['validation_examples']}",
            f"train.global_batch_size={batch_size}",
            f"train.epochs={epochs}",
            f"train.seed={seed}",
            f"train.eval_splits={splits}",
            f"optimizer.base_learning_rate={runs_lib.format_rate(rate)}",
            f"optimizer.warmup_epochs={runs_lib.format_rate(warmup)}",
            *extra,
        ]
        return {"run_id": runs_lib.run_id(
                    stage if stage != "pilot" else f"pilot/{model}",
                    batch_size, method, rate, warmup, epochs, seed),
                "stage": stage, "model": model, "batch_size": batch_size,
                "method": method, "base_learning_rate": rate,
                "warmup_epochs": warmup, "epochs": epochs, "seed": seed,
                "config": config,
                "overrides": overrides}

    def outcome(self, spec):
        """Runs `spec` unless its archive says it is settled; its Outcome."""
        run = runs_lib.Run(spec, self.args.work_dir, self.args.archive_dir,
                           self.args.trainer, self.args.threads)
        settled = ("done",) if self.args.retry_failed else ("done",
                                                            "diverged")
        if self.dry_run:
            if run.status() not in settled and run.command not in (
                    self.planned):
                self.planned.append(run.command)
        elif run.status() not in settled:
            self._check_time()
            print(f"[study] {run.run_id}: running\n        {run.command}",
                  flush=True)
            status, seconds = run.execute()
            self.durations.append(seconds)
            print(f"[study] {run.run_id}: {status} in {seconds:.0f} s; "
                  f"{(time.time() - self.started) / 60:.1f} min elapsed.",
                  flush=True)
            self._stop_if_failing(run, status)
        return runs_lib.Outcome(run.archive)

    def _stop_if_failing(self, run, status):
        if status != "failed":
            self.failures_in_a_row = []
            return
        error = run.record().get("error", "")
        if error.startswith(("ModuleNotFoundError", "ImportError")):
            raise TrainerCannotStart(run.run_id, error)
        self.failures_in_a_row.append((run, error))
        if len(self.failures_in_a_row) >= MAX_FAILURES_IN_A_ROW:
            raise RunsKeepFailing(self.failures_in_a_row)

    def _check_time(self):
        if not self.args.max_hours:
            return
        expected = (sorted(self.durations)[len(self.durations) // 2]
                    if self.durations else FIRST_RUN_GUESS)
        if time.time() - self.started + expected > self.args.max_hours * 3600:
            raise OutOfTime()

    def tune(self, make_spec, grid, max_extensions=None):
        """Tries `grid`, extended past an edge holding the best; the best.

        At most `max_extensions` (default: the plan's) rates are added. A
        dry run follows the archived results as far as they go and lists
        the runs they call for.
        """
        if max_extensions is None:
            max_extensions = self.plan["max_extensions"]
        rates = sorted(float(r) for r in grid)
        for _ in range(max_extensions + 1):
            # A run that failed (an error, not a divergence) is run once
            # more before the choice reads the grid without it.
            outcomes = [self.outcome(make_spec(rate)) for rate in rates]
            outcomes = [self.outcome(make_spec(rate))
                        if outcome.status == "failed" else outcome
                        for rate, outcome in zip(rates, outcomes)]
            best = runs_lib.best(outcomes)
            if best is None:
                return best
            extra = rate_beyond_edge(rates, best.record["base_learning_rate"])
            if extra is None:
                return best
            rates = sorted(rates + [extra])
        return best

    # Stages -----------------------------------------------------------

    def pilot(self):
        """SGD with and without warmup per candidate model; the gap."""
        pilot = self.plan["pilot"]
        methods = [(method, warmup) for method, warmup in (
            ("sgd_warmup", pilot["warmup_epochs"]), ("sgd_nowarmup", 0.0))
            if self.selected(method)]
        findings = {}
        for model in pilot["models"]:

            def make_spec(rate, method, warmup, seed=self.plan["tuning_seed"],
                          model=model):
                return self.spec(
                    "pilot", model, pilot["batch_size"], method,
                    pilot.get("config", "configs/warmup_study/sgd.yaml"),
                    rate, warmup, seed, pilot["epochs"],
                    splits=(pilot.get("confirm_splits", "validation")
                            if seed != self.plan["tuning_seed"]
                            else "validation"),
                    extra=pilot.get("overrides", ()))

            # Both methods rate by rate first, so that a pilot cut short by
            # --max_hours still compares them on the same rates.
            for rate in pilot["grid"]:
                for method, warmup in methods:
                    self.outcome(make_spec(rate, method, warmup))
            for method, warmup in methods:
                chosen = self.tune(lambda rate, method=method, warmup=warmup:
                                   make_spec(rate, method, warmup),
                                   pilot["grid"])
                # More seeds at each method's chosen rate, so that a gap is
                # not one seed's luck (seeds apart from the comparison's).
                for seed in pilot.get("confirm_seeds", []) if chosen else ():
                    self.outcome(make_spec(
                        chosen.record["base_learning_rate"], method, warmup,
                        seed))
            findings[model] = self._pilot_verdict(model)
        return findings

    def _pilot_verdict(self, model):
        archived = runs_lib.load_archived(os.path.join(
            self.args.archive_dir, "pilot", model))
        return runs_lib.pilot_verdict(
            *[[o for o in archived.values() if o.record["method"] == method]
              for method in ("sgd_warmup", "sgd_nowarmup")],
            self.plan["pilot"]["gap_points"], self.plan["tuning_seed"])

    def budget(self):
        """The budget pilot: per batch size, the epochs where training flattens.

        Runs the plan's ladder of budgets in order and stops at the first
        budget the next one shows to be enough; a run that diverges or ends
        at chance halves the base rate (at most the plan's max_halvings
        times, default once) and starts the ladder again (`runs.budget_ladders` reads
        the same rule back from the archive).
        """
        pilot = self.plan["budget_pilot"]
        for batch_size, budgets in pilot["ladders"].items():
            rate = float(pilot["base_learning_rate"])
            for _ in range(pilot.get("max_halvings", 1) + 1):
                ladder = []
                for epochs in budgets:
                    outcome = self.outcome(self.spec(
                        "budget", pilot["model"], int(batch_size),
                        pilot["method"], pilot["config"], rate,
                        round(pilot["warmup_fraction"] * epochs, 6),
                        self.plan["tuning_seed"], epochs))
                    ladder.append((epochs, outcome))
                    if runs_lib.failed_or_chance(outcome) or (
                            runs_lib.budget_choice(
                                ladder, pilot["loss_ratio"],
                                pilot["accuracy_points"])[1]):
                        break
                if not runs_lib.failed_or_chance(ladder[-1][1]):
                    break
                rate /= 2
        return runs_lib.budget_ladders(
            self.plan, runs_lib.load_archived(self.args.archive_dir))

    def selected(self, method):
        """Whether --methods includes `method` (ablations follow CLARS)."""
        return not self.args.methods or method in self.args.methods

    def compare(self):
        """Per batch size: tune every method, then its fresh seeds.

        A method may be limited to some batch sizes (`batch_sizes`), run
        its own number of seeds (`seeds`, none for a tuning-only arm),
        start at a later batch size from its chosen rate at an earlier one
        (the plan's `scaled_grid`), or be a selection: the best tuning run
        among `select_from` at the selection's batch size, rerun with
        fresh seeds there and tuned for rate alone at the others.
        """
        plan = self.plan["comparison"]
        chosen_at = {}
        for batch_size in plan["batch_sizes"]:
            epochs = per_batch_size(plan["epochs"], batch_size)
            main_warmup = (round(plan["warmup_fraction"] * epochs, 6)
                           if "warmup_fraction" in plan
                           else plan["warmup_epochs"])
            chosen = chosen_at[batch_size] = {}
            read = self.read_at[batch_size] = {}
            for method, spec in plan["methods"].items():
                if "select_from" in spec or not self.runs_at(
                        method, spec, batch_size, for_selection=True):
                    continue
                grid = self.grid(method, spec, batch_size, chosen_at)
                if grid is None:
                    continue
                if self.runs_at(method, spec, batch_size):
                    self.tune_method(chosen, method, spec, batch_size, epochs,
                                     main_warmup, grid)
                else:
                    self.read_tuning(read, method, spec, batch_size, epochs,
                                     main_warmup, grid)
            for method, spec in plan["methods"].items():
                if "select_from" in spec and self.runs_at(method, spec,
                                                          batch_size):
                    self.select(chosen_at, method, spec, batch_size, epochs,
                                main_warmup)
            if "sgd_warmup" in chosen:
                for warmup in plan.get("warmup_variants", ()):
                    self.outcome(self.spec(
                        "compare", plan["model"], batch_size, "sgd_warmup",
                        plan["methods"]["sgd_warmup"]["config"],
                        chosen["sgd_warmup"]["rate"], warmup,
                        self.plan["tuning_seed"], epochs))
            if "clars" in chosen:
                for name, ablation in plan.get("ablations", {}).items():
                    chosen[name] = dict(chosen["clars"],
                                        overrides=ablation["overrides"])
            for method, choice in chosen.items():
                if choice.get("seeds_of"):
                    continue
                spec = plan["methods"].get(method, {})
                for index, fresh in enumerate(spec.get("seeds",
                                                       plan["seeds"])):
                    diagnostics = (index == 0 and "clars" in method)
                    self.outcome(self.spec(
                        "compare", plan["model"], batch_size, method,
                        choice["config"], choice["rate"], choice["warmup"],
                        fresh, epochs, splits="validation+test",
                        extra=list(choice["overrides"]) + ([
                            "train.diagnostics_every_steps="
                            f"{plan['diagnostics_every_steps']}"]
                            if diagnostics else [])))

    def extend(self):
        """The plan's seed extension, once every primary arm has its seeds.

        A primary comparison with all the plan's seeds in whose 95 %
        half-width is above the rule's gets, for both its arms, the seeds
        its observed spread needs (at most the rule's max_seeds), numbered
        on from the plan's. Decided on the spread alone, never the mean.
        """
        from experiments import fourth_report

        plan = self.plan["comparison"]
        rule = plan["seed_extension"]
        outcomes = runs_lib.load_archived(self.args.archive_dir)
        for row in fourth_report.comparisons(self.plan, outcomes):
            if (row["family"] != "primary" or not row["complete"]
                    or row["half_width"] <= rule["half_width_points"]):
                continue
            chosen = fourth_report.chosen_runs(self.plan, outcomes,
                                               row["batch_size"])
            for method in (row["first"], row["second"]):
                run = chosen[method]
                for seed in range(max(plan["seeds"]) + 1,
                                  min(row["seeds_needed"],
                                      rule["max_seeds"]) + 1):
                    self.outcome(self.spec(
                        "compare", plan["model"], row["batch_size"],
                        run.record["method"], run.record["config"],
                        run.record["base_learning_rate"],
                        run.record["warmup_epochs"], seed,
                        run.record["epochs"], splits="validation+test",
                        extra=fourth_report.arm_settings(run)))

    def runs_at(self, method, spec, batch_size, for_selection=False):
        """Whether `method` is tuned here at `batch_size`.

        With `for_selection`, also a method outside --methods that a
        selected selection arm chooses from: its tuning is read from the
        archive (read_tuning), never run, since another process runs it.
        """
        selected = self.selected(method) or (for_selection and any(
            method in other.get("select_from", ()) and self.selected(name)
            for name, other in self.plan["comparison"]["methods"].items()))
        return selected and batch_size in spec.get(
            "batch_sizes", self.plan["comparison"]["batch_sizes"])

    def read_tuning(self, read, method, spec, batch_size, epochs,
                    main_warmup, grid):
        """Puts `method`'s tuning, as its finished runs settle it, in `read`.

        Runs nothing: while a run the tuning calls for is not finished
        (the process whose --methods hold the method runs it), `method`
        stays out of `read` and selections from it wait.
        """
        planned, dry_run = self.planned, self.dry_run
        self.planned, self.dry_run = [], True
        try:
            self.tune_method(read, method, spec, batch_size, epochs,
                             main_warmup, grid)
            settled = not self.planned
        finally:
            self.planned, self.dry_run = planned, dry_run
        if not settled:
            read.pop(method, None)
            print(f"[study] {method} at batch {batch_size} (outside "
                  "--methods) is not tuned yet, so the selections from it "
                  "wait; run it, or add it to --methods.", flush=True)

    def grid(self, method, spec, batch_size, chosen_at):
        """The method's first grid at `batch_size`, or None if not yet known.

        With the plan's `scaled_grid` every batch size after the one it
        names starts from the method's chosen rate there, times each factor
        (3 significant digits); a method not chosen there has no grid yet.
        """
        scaled = self.plan["comparison"].get("scaled_grid")
        if not scaled or batch_size == scaled["from"]:
            return spec["grid"]
        base = {**self.read_at.get(scaled["from"], {}),
                **chosen_at.get(scaled["from"], {})}.get(method)
        if base is None:
            return None
        return [float(f"{base['rate'] * factor:.3g}")
                for factor in scaled["factors"]]

    def tune_method(self, chosen, method, spec, batch_size, epochs,
                    main_warmup, grid, config=None, overrides=None):
        plan = self.plan["comparison"]
        warmup = main_warmup if spec["warmup"] else 0.0
        config = config or spec["config"]
        overrides = list(spec.get("overrides", ()) if overrides is None
                         else overrides)
        best = self.tune(
            lambda rate: self.spec("compare", plan["model"], batch_size,
                                   method, config, rate, warmup,
                                   self.plan["tuning_seed"], epochs,
                                   extra=overrides),
            grid, plan.get("max_extensions"))
        if best is not None:
            chosen[method] = {"rate": best.record["base_learning_rate"],
                              "warmup": warmup, "config": config,
                              "overrides": overrides, "outcome": best}

    def select(self, chosen_at, method, spec, batch_size, epochs,
               main_warmup):
        """The selection arm: its candidates' best at `spec["at"]`.

        Waits until every candidate is tuned there. Where the winner runs
        fresh seeds of its own, the selection reuses them (`seeds_of`);
        at other batch sizes it is tuned for rate with the winner's
        settings, unless the winner is tuned there itself.
        """
        at = {**self.read_at.get(spec["at"], {}),
              **chosen_at.get(spec["at"], {})}
        if any(candidate not in at for candidate in spec["select_from"]):
            return
        winner = max(spec["select_from"],
                     key=lambda candidate: at[candidate]["outcome"].score())
        methods = self.plan["comparison"]["methods"]
        has_seeds = bool(methods[winner].get(
            "seeds", self.plan["comparison"]["seeds"]))
        chosen = chosen_at[batch_size]
        here = {**self.read_at.get(batch_size, {}), **chosen}
        if batch_size == spec["at"]:
            chosen[method] = dict(at[winner], seeds_of=(
                winner if has_seeds else None))
        elif winner in here:
            chosen[method] = dict(here[winner], seeds_of=winner)
        else:
            grid = self.grid(method, spec, batch_size, chosen_at)
            if grid is not None:
                self.tune_method(chosen, method, dict(
                    spec, warmup=methods[winner]["warmup"]), batch_size,
                    epochs, main_warmup, grid, methods[winner]["config"],
                    at[winner]["overrides"])


def per_batch_size(value, batch_size):
    """A plan value given once or per batch size ({batch size: value})."""
    return value[batch_size] if isinstance(value, dict) else value


def sample_finished_run(archive_dir, seed):
    """One finished run of the archive, drawn with `seed`, or None.

    The draw is over the run ids in sorted order, so the same archive and
    seed give the same run on any machine.
    """
    finished = sorted((o for o in runs_lib.load_archived(archive_dir).values()
                       if o.status == "done"), key=lambda o: o.run_id)
    return random.Random(seed).choice(finished) if finished else None


def check(args):
    """The check stage: reruns a sampled finished run; 0 when identical."""
    outcome = sample_finished_run(args.archive_dir, args.check_seed)
    if outcome is None:
        sys.exit(f"[study] --stage check: no finished run in "
                 f"{args.archive_dir} to rerun; run a stage first.")
    argv = [outcome.directory,
            "--work_dir", os.path.join(args.work_dir, "rerun_check")]
    command = "python3 -m experiments.rerun_check " + " ".join(
        shlex.quote(a) for a in argv)
    if args.dry_run:
        print(command)
        return 0
    print(f"[study] rerun check of {outcome.run_id} (drawn with "
          f"--check_seed {args.check_seed}):\n        {command}", flush=True)
    verdict = dict(rerun_check.check(rerun_check.parse_args(argv)),
                   command=command, check_seed=args.check_seed)
    path = os.path.join(os.path.dirname(os.path.normpath(args.archive_dir)),
                        RERUN_CHECK)
    runs_lib.write_json(path, verdict)
    difference = (verdict.get("first_step_difference")
                  or verdict.get("first_epoch_difference"))
    print(f"[study] {outcome.run_id}: "
          + ("bit-identical" if verdict["identical"] else
             f"not identical (first difference: {difference}; status "
             f"{verdict['rerun_status']})")
          + f"; written to {path}.", flush=True)
    return 0 if verdict["identical"] else 1


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--stage", choices=("budget", "pilot", "compare", "extend", "check"),
                        default="pilot")
    parser.add_argument("--plan", default=PLAN)
    parser.add_argument("--work_dir", default=WORK_DIR)
    parser.add_argument("--archive_dir", default=ARCHIVE_DIR)
    parser.add_argument("--max_hours", type=float, default=0.0,
                        help="stop cleanly before a run that would end past "
                             "this many hours (0: no limit)")
    parser.add_argument("--force", action="store_true",
                        help="run the comparison even without a pilot gap")
    parser.add_argument("--retry_failed", action="store_true",
                        help="rerun diverged runs too")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands of the runs still to do")
    parser.add_argument("--methods", type=lambda text: text.split(","),
                        default=[],
                        help="comma-separated pilot or comparison methods "
                             "to run (default: all); CLARS's ablations and "
                             "SGD + warmup's warmup variants follow their "
                             "method. Two study processes with disjoint "
                             "methods can share one archive")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per trainer run (default: all)")
    parser.add_argument("--check_seed", type=int, default=0,
                        help="--stage check: seed of the draw of the run to "
                             "rerun")
    parser.add_argument("--trainer", default="trainers.train",
                        help=argparse.SUPPRESS)  # tests use a stand-in
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.chdir(runs_lib.REPO_ROOT)
    plan = load_plan(args.plan)
    known = ["sgd_warmup", "sgd_nowarmup",
             *plan.get("comparison", {}).get("methods", {})]
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        sys.exit(f"[study] --methods: unknown method(s) {', '.join(unknown)}; "
                 f"the plan's are {', '.join(dict.fromkeys(known))}.")
    study = Study(plan, args)
    runs_lib.interrupt_on_sigterm()
    if args.stage == "check":
        return check(args)
    try:
        if args.stage == "budget":
            findings = study.budget()
        elif args.stage == "pilot":
            findings = study.pilot()
        elif args.stage == "extend":
            study.extend()
        else:
            # The pilot's findings from the archive alone (a plan without
            # an SGD pilot has made warmup's effect one of its comparisons).
            reader = Study(plan, argparse.Namespace(**dict(vars(args),
                                                           dry_run=True)))
            verdicts = reader.pilot() if "pilot" in plan else {}
            if "pilot" in plan and not (args.force or args.dry_run or any(
                    v and v["shows"] for v in verdicts.values())):
                sys.exit("[study] the pilot shows no warmup gap (see "
                         "experiments/warmup_results/results.md); the "
                         "comparison could not test the claim. --force "
                         "runs it anyway.")
            study.compare()
    except OutOfTime:
        print(f"[study] stopped before a run that would end past "
              f"--max_hours={args.max_hours}; run the same command again "
              "to continue.", flush=True)
        return 3
    except KeyboardInterrupt:
        sys.exit("[study] interrupted; run the same command again to "
                 "resume.")
    except (TrainerCannotStart, RunsKeepFailing) as error:
        sys.exit(str(error))
    if args.dry_run:
        print("\n".join(study.planned))
        print(f"# {len(study.planned)} runs to do as far as the archived "
              "results decide (more grid extensions and the seed runs "
              "follow from results).")
        return 0
    if args.stage == "budget":
        for batch_size, choice in findings.items():
            print(f"[study] budget, batch {batch_size}: " + (
                "no finished run." if choice["epochs"] is None else
                f"{choice['epochs']} epochs at base rate {choice['rate']:g} "
                + ("(doubling it no longer helps by the plan's rule)."
                   if choice["flattened"] else
                   "(the ladder's last finished budget: not flattened).")),
                flush=True)
    if args.stage == "pilot":
        for model, verdict in findings.items():
            print(f"[study] pilot {model}: " + (
                "no finished runs of both methods." if verdict is None else
                f"best SGD + warmup minus best SGD without warmup = "
                f"{verdict['gap']:+.1f} points of validation accuracy; "
                f"diverged or at chance: {verdict['bad_warm']} vs "
                f"{verdict['bad_cold']} of {len(verdict['shared'])} rates; "
                f"warmup gap shown: {verdict['shows']}."), flush=True)
    print("[study] stage finished; python3 -m experiments.warmup_report "
          "writes the report.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
