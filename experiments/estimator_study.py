r"""Which gradient-norm estimator should the trainer use by default?

    python3 -m experiments.estimator_study --arms loop --threads 1
    python3 -m experiments.estimator_study --arms one_pass --threads 1
    python3 -m experiments.estimator_study --arms one_pass --seeds 4,5 ...
    python3 -m experiments.estimator_study --report

The plan (configs/estimator_study/plan.yaml, written before the runs) fixes
the setting, the eta grid, the seeds and the decision rule. Each arm (an
estimator) is tuned on the tuning seed's final validation accuracy over the
eta grid, extended past an edge where the best sits; then the fresh seeds
run at the chosen eta with validation and test evaluation. The two arms
can run in two processes side by side, and a tuned arm's seeds split over
processes with disjoint `--seeds`; the same command resumes where it
stopped (runs are `experiments.runs.Run`s: trainer subprocesses in
`--work_dir`, small files archived in `--archive_dir`, committed).

`--report` reads only the archive and the plan's cost file and writes
`results.md` beside the archive: the tuning table, the fresh seeds, the
paired difference of test accuracy with its 95 % interval, and the plan's
decision.
"""

import argparse
import json
import os
import sys

import yaml

from experiments import runs as runs_lib
from experiments import warmup_report

WORK_DIR = "runs/estimator_study"
RESULTS_DIR = "experiments/estimator_results"
PLAN = "configs/estimator_study/plan.yaml"


def load_plan(path):
    with open(os.path.join(runs_lib.REPO_ROOT, path), encoding="utf-8") as f:
        return yaml.safe_load(f)


def run_spec(plan, arm, eta, seed, final):
    splits = "validation+test" if final else "validation"
    return {
        "run_id": f"{arm}/eta{runs_lib.format_rate(eta)}_s{seed}",
        "arm": arm, "eta": eta, "seed": seed, "config": plan["config"],
        "overrides": [*plan["overrides"], *plan["arms"][arm]["overrides"],
                      f"clars.trust_coefficient={eta}", f"train.seed={seed}",
                      f"train.eval_splits={splits}"],
    }


def next_eta(etas, best_eta):
    """The eta one grid step past the edge where the best sits, or None."""
    etas = sorted(etas)
    if len(etas) < 2 or best_eta not in (etas[0], etas[-1]):
        return None
    step = etas[1] / etas[0]
    return (etas[0] / step if best_eta == etas[0] else etas[-1] * step)


def chosen_eta(plan, outcomes):
    """(eta chosen on the tuning seed, eta to run next or None)."""
    tuning = [o for o in outcomes if o.record["seed"] == plan["tuning_seed"]]
    by_eta = {o.record["eta"]: o for o in tuning}
    missing = [eta for eta in plan["grid"] if eta not in by_eta
               or by_eta[eta].status not in ("done", "diverged")]
    if missing:
        return None, missing[0]
    top = runs_lib.best(tuning)
    if top is None:
        return None, None
    beyond = next_eta(by_eta, top.record["eta"])
    if beyond is not None:
        side = [eta for eta in by_eta if (eta < min(plan["grid"])) ==
                (beyond < min(plan["grid"])) and eta not in plan["grid"]]
        if len(side) < plan["max_extensions"]:
            return None, float(f"{beyond:.3g}")
    return top.record["eta"], None


class Study:
    def __init__(self, plan, args):
        self.plan, self.args = plan, args
        self.archive_dir = os.path.join(args.results_dir, "runs")

    def _outcomes(self, arm):
        return [o for o in runs_lib.load_archived(self.archive_dir).values()
                if o.record.get("arm") == arm]

    def _execute(self, spec):
        run = runs_lib.Run(spec, self.args.work_dir, self.archive_dir,
                           threads=self.args.threads)
        if run.status() in ("done", "diverged"):
            return
        print(f"[estimator] {run.run_id}: {run.command}", flush=True)
        status, seconds = run.execute()
        print(f"[estimator] {run.run_id}: {status} in {seconds:.0f} s",
              flush=True)
        if status == "failed":
            # A crash is not an outcome of the setting: running on would
            # retry the same tuning run forever, or skip a paired seed.
            sys.exit(f"[estimator] {run.run_id} failed: "
                     f"{run.record().get('error') or 'no error line'}. "
                     f"Its log is {run.model_dir}/train.log; fix the cause "
                     f"and rerun this command, which resumes the run.")

    def run_arm(self, arm):
        seeds = self.args.seeds or self.plan["seeds"]
        while True:
            eta, pending = chosen_eta(self.plan, self._outcomes(arm))
            if pending is None:
                break
            if self.args.seeds:
                # Two processes tuning one arm would run the same run.
                sys.exit(f"[estimator] {arm}: --seeds needs the arm's "
                         f"tuning finished; run it without --seeds first.")
            self._execute(run_spec(self.plan, arm, pending,
                                   self.plan["tuning_seed"], final=False))
        if eta is None:
            sys.exit(f"[estimator] {arm}: no tuning run finished.")
        for seed in seeds:
            self._execute(run_spec(self.plan, arm, eta, seed, final=True))


def _cost_ratio(path):
    """Median step-time ratio one-pass / loop from the benchmark's JSON."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        timing = json.load(f)["timing"]
    loop = next(row for name, row in timing.items()
                if name.startswith("clars_s"))
    one_pass = next(row for name, row in timing.items()
                    if name.startswith("one_pass_s"))
    return one_pass["median_ratio"] / loop["median_ratio"]


def report(plan, results_dir):
    archived = runs_lib.load_archived(os.path.join(results_dir, "runs"))
    lines = [f"# {plan['title']}: results", "",
             "Written by `python3 -m experiments.estimator_study --report` "
             "from the archived runs (each run's command is in its "
             "run.json) and the plan configs/estimator_study/plan.yaml. "
             "eta is chosen on validation accuracy (seed "
             f"{plan['tuning_seed']}); test accuracy comes only from the "
             "fresh seeds.", "", "## Tuning", "",
             "| eta | " + " | ".join(plan["arms"][a]["label"]
                                    for a in plan["arms"]) + " |",
             "|---|" + "---|" * len(plan["arms"])]
    by_arm = {arm: [o for o in archived.values() if o.record.get("arm") == arm]
              for arm in plan["arms"]}
    chosen = {arm: chosen_eta(plan, outcomes)[0]
              for arm, outcomes in by_arm.items()}
    etas = sorted({o.record["eta"] for o in archived.values()
                   if o.record["seed"] == plan["tuning_seed"]})
    for eta in etas:
        cells = []
        for arm, outcomes in by_arm.items():
            run = next((o for o in outcomes if o.record["eta"] == eta
                        and o.record["seed"] == plan["tuning_seed"]), None)
            accuracy = run and run.validation_accuracy
            cells.append("not run" if run is None else
                         run.status if accuracy is None else
                         f"{100 * accuracy:.1f} %"
                         + (" **chosen**" if chosen[arm] == eta else ""))
        lines.append(f"| {runs_lib.format_rate(eta)} | " + " | ".join(cells)
                     + " |")
    lines += ["", "## Fresh seeds at the chosen eta", "",
              "| seed | " + " | ".join(f"{plan['arms'][a]['label']} "
                                       f"(eta {chosen[a]}): test %"
                                       for a in plan["arms"]) + " |",
              "|---|" + "---|" * len(plan["arms"])]
    test = {arm: {o.record["seed"]: o.test_accuracy for o in outcomes
                  if o.record["eta"] == chosen[arm]
                  and o.record["seed"] in plan["seeds"]
                  and o.test_accuracy is not None}
            for arm, outcomes in by_arm.items()}
    for seed in plan["seeds"]:
        lines.append(f"| {seed} | " + " | ".join(
            f"{100 * test[a][seed]:.2f}" if seed in test[a] else "-"
            for a in plan["arms"]) + " |")
    paired = sorted(set(test["one_pass"]) & set(test["loop"]))
    differences = [100 * (test["one_pass"][s] - test["loop"][s])
                   for s in paired]
    interval = warmup_report.paired_interval(differences)
    ratio = _cost_ratio(os.path.join(runs_lib.REPO_ROOT, plan["cost_file"]))
    lines += ["", "## Decision", ""]
    if interval is None or len(paired) < len(plan["seeds"]):
        lines.append(f"Not decided: {len(paired)} of {len(plan['seeds'])} "
                     "seeds paired so far.")
    else:
        mean, _, low, high = interval
        margin = plan["margin_points"]
        non_inferior = low > -margin
        lines.append(
            f"- One-pass minus loop, test accuracy paired by seed: mean "
            f"{mean:+.2f} points, 95 % interval [{low:+.2f}, {high:+.2f}] "
            f"({len(paired) - 1} degrees of freedom). (a) no worse within "
            f"{margin:g} point: {'shown' if non_inferior else 'not shown'}.")
        lines.append(
            "- (b) step cost one-pass / loop: " + (
                "not measured (no cost file)" if ratio is None else
                f"{ratio:.2f} (`{plan['cost_file']}`)") + ".")
        cheaper = ratio is not None and ratio < 1
        lines.append(
            "- **Decision: " + (
                f"one-pass becomes the trainer's default, eta "
                f"{chosen['one_pass']}**." if non_inferior and cheaper else
                "the loop stays the trainer's default**: " + (
                    "(a) is not shown" if not non_inferior else
                    "(b) is not shown") + "."))
    path = os.path.join(results_dir, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--plan", default=PLAN)
    parser.add_argument("--arms", type=lambda text: text.split(","),
                        default=[], help="arms to run (default: all)")
    parser.add_argument("--report", action="store_true",
                        help="only write results.md from the archive")
    parser.add_argument("--work_dir", default=WORK_DIR)
    parser.add_argument("--results_dir", default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per trainer run (default: all)")
    parser.add_argument("--seeds", type=lambda text: [
        int(seed) for seed in text.split(",")], default=[],
        help="only these of the plan's fresh seeds, to split a tuned arm "
             "over processes (default: all)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.chdir(runs_lib.REPO_ROOT)
    plan = load_plan(args.plan)
    if args.report:
        print(report(plan, args.results_dir))
        return 0
    unknown = set(args.arms) - set(plan["arms"])
    if unknown:
        sys.exit(f"[estimator] --arms: unknown arm(s) {sorted(unknown)}; "
                 f"the plan's are {', '.join(plan['arms'])}.")
    unknown = set(args.seeds) - set(plan["seeds"])
    if unknown:
        sys.exit(f"[estimator] --seeds: {sorted(unknown)} not in the plan's "
                 f"fresh seeds {plan['seeds']}.")
    study = Study(plan, args)
    runs_lib.interrupt_on_sigterm()
    try:
        for arm in args.arms or plan["arms"]:
            study.run_arm(arm)
    except KeyboardInterrupt:
        sys.exit("[estimator] interrupted; run the same command again to "
                 "resume.")
    print("[estimator] done; --report writes the results.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
