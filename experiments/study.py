r"""Runs the small-scale reproduction study of CLARS's claim, then the report.

    python3 -m experiments.study                  # the full study (~2 h, README)
    python3 -m experiments.study --quick          # a smoke test (minutes)
    python3 -m experiments.study --dry_run        # print the runs, run nothing

On Fashion-MNIST with ResNet-8 at large batches, four methods share model,
epochs and poly(2) decay: CLARS without warmup, SGD + gradual warmup, LARS +
warmup and SGD without warmup. Each is tuned over its grid of base learning
rates (configs/study/study.yaml) with the first seed; the best rate per
method and batch size is then rerun with the other seeds. Every run is one
`python3 -m trainers.train --mode=train_and_eval` subprocess, one at a time,
in OUTPUT_DIR/b<batch>/<method>/lr<rate>_s<seed>/. Each run directory gets a
`run.json` (the exact command, status, wall time) next to the trainer's
`results.json`; a run whose results.json has a `final` entry, or that
diverged, is skipped when the study is started again, so a killed study
resumes (the interrupted run continues from its last checkpoint).
"""

import argparse
import datetime
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PLAN = os.path.join("configs", "study", "study.yaml")
DEFAULT_REPORT_DIR = os.path.join("experiments", "results")
# Messages with which the trainer stops a run whose values became non-finite.
DIVERGENCE_MARKERS = ("Non-finite gradient", "Training loss became",
                      "non-finite", "became nan", "became inf")


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def _write_json(path, content):
    staging = f"{path}.partial-{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
    os.replace(staging, path)


def read_json(path):
    """The JSON content of `path`, or None if missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def format_rate(rate):
    """A short, exact, path-safe spelling of a learning rate (0.1 -> '0.1')."""
    return format(float(rate), "g")


def _int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m experiments.study",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None,
                        help="Where the runs go (default runs/study; with "
                        "--quick runs/study_quick).")
    parser.add_argument("--batch_sizes", type=_int_list, default=None,
                        help="Comma-separated global batch sizes (default "
                        "from the plan: 4096,8192).")
    parser.add_argument("--epochs", type=int, default=None,
                        help="Epochs of every run (default from the plan).")
    parser.add_argument("--seeds", type=_int_list, default=None,
                        help="Comma-separated seeds; the first tunes, the "
                        "others rerun the best rate (default from the plan).")
    parser.add_argument("--methods", default=None,
                        help="Comma-separated subset of the plan's methods.")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke test: 1 epoch cut to a few steps, the "
                        "middle rate of each grid, one seed.")
    parser.add_argument("--data_dir", default=None,
                        help="tensorflow-datasets directory (default tfds's).")
    parser.add_argument("--plan", default=DEFAULT_PLAN,
                        help="Study plan YAML (default %(default)s).")
    parser.add_argument("--report_dir", default=None,
                        help="Where the report goes (default "
                        f"{DEFAULT_REPORT_DIR}; with --quick "
                        "OUTPUT_DIR/report, out of git).")
    parser.add_argument("--retry_failed", action="store_true",
                        help="Run diverged runs again too (failed and "
                        "interrupted runs are always resumed).")
    parser.add_argument("--dry_run", action="store_true",
                        help="Print the tuning commands and the run count.")
    parser.add_argument("--no_report", action="store_true",
                        help="Do not write the report at the end.")
    return parser.parse_args(argv)


def load_plan(args):
    """The plan file with the command line's overrides applied."""
    with open(os.path.join(REPO_ROOT, args.plan), encoding="utf-8") as f:
        plan = yaml.safe_load(f)
    quick = plan.pop("quick", {}) or {}
    plan["quick"] = bool(args.quick)
    plan["max_steps"] = 0
    if args.quick:
        plan["epochs"] = quick.get("epochs", 1)
        plan["max_steps"] = quick.get("max_steps", 3)
        plan["seeds"] = quick.get("seeds", plan["seeds"][:1])
        plan["diagnostics_points"] = quick.get("diagnostics_points", 1)
        for method in plan["methods"].values():
            grid = method["grid"]
            method["grid"] = [grid[len(grid) // 2]]
            method.pop("beyond_edges", None)
    if args.batch_sizes:
        plan["batch_sizes"] = args.batch_sizes
    if args.epochs:
        plan["epochs"] = args.epochs
    if args.seeds:
        plan["seeds"] = args.seeds
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in plan["methods"]]
        if unknown:
            sys.exit(f"error: unknown method(s) {unknown}; the plan has "
                     f"{', '.join(plan['methods'])}.")
        plan["methods"] = {m: plan["methods"][m] for m in wanted}
    warmup = float(plan["warmup_epochs"])
    if warmup >= plan["epochs"]:
        warmup = plan["epochs"] / 2
        print(f"[study] warmup_epochs {plan['warmup_epochs']} is not shorter "
              f"than the {plan['epochs']} epoch(s); using {warmup}.")
    plan["warmup_epochs_used"] = warmup
    return plan


def diagnostics_every(plan, batch_size):
    """Steps between CLARS diagnostics: about `diagnostics_points` per run."""
    steps = plan["epochs"] * (60000 // batch_size)  # Fashion-MNIST train
    if plan["max_steps"]:
        steps = min(steps, plan["max_steps"])
    return max(1, round(steps / max(1, plan["diagnostics_points"])))


class Run:
    """One trainer invocation of the study."""

    def __init__(self, plan, output_dir, data_dir, batch_size, method, rate,
                 seed, role):
        spec = plan["methods"][method]
        self.method, self.batch_size, self.seed, self.role = (
            method, batch_size, seed, role)
        self.rate = float(rate)
        self.run_id = f"b{batch_size}/{method}/lr{format_rate(rate)}_s{seed}"
        self.model_dir = os.path.join(output_dir, f"b{batch_size}", method,
                                      f"lr{format_rate(rate)}_s{seed}")
        overrides = [
            f"train.global_batch_size={batch_size}",
            f"train.epochs={plan['epochs']}",
            f"train.seed={seed}",
            f"optimizer.base_learning_rate={format_rate(rate)}",
            f"optimizer.warmup_epochs="
            f"{plan['warmup_epochs_used'] if spec['warmup'] else 0.0}",
            "train.eval_every_epochs=1",
        ]
        if plan["max_steps"]:
            overrides.append(f"train.max_steps={plan['max_steps']}")
        if spec.get("diagnostics"):
            overrides.append("train.diagnostics_every_steps="
                             f"{diagnostics_every(plan, batch_size)}")
        self.argv = [
            "python3", "-m", "trainers.train",
            f"--config_file={spec['config']}",
            f"--model_dir={self.model_dir}",
            "--mode=train_and_eval",
            f"--params_override={','.join(overrides)}",
        ]
        if data_dir:
            self.argv.append(f"--data_dir={data_dir}")
        self.command = " ".join(shlex.quote(a) for a in self.argv)
        self.expected = {"epochs": plan["epochs"],
                         "max_steps": plan["max_steps"]}
        self.meta = {"run_id": self.run_id, "method": method,
                     "label": spec.get("label", method),
                     "batch_size": batch_size, "base_learning_rate": self.rate,
                     "seed": seed, "role": role,
                     "config_file": spec["config"], "command": self.command,
                     "argv": self.argv, "cwd": REPO_ROOT}

    @property
    def results_path(self):
        return os.path.join(self.model_dir, "results.json")

    @property
    def run_json_path(self):
        return os.path.join(self.model_dir, "run.json")

    def results(self):
        return read_json(os.path.join(REPO_ROOT, self.results_path))

    def record(self):
        return read_json(os.path.join(REPO_ROOT, self.run_json_path)) or {}

    def status(self):
        results = self.results()
        train = ((results or {}).get("config") or {}).get("train") or {}
        for key, value in self.expected.items():
            if key in train and train[key] != value:
                sys.exit(f"error: {self.model_dir} holds a run with "
                         f"train.{key}={train[key]}, this study asks for "
                         f"{value}; pass another --output_dir.")
        if results and results.get("final"):
            return "done"
        return self.record().get("status", "pending")

    def final_accuracy(self):
        results = self.results() or {}
        final = results.get("final") or {}
        return final.get("eval_accuracy")

    def execute(self):
        """Runs the trainer, streaming its output into train.log."""
        model_dir = os.path.join(REPO_ROOT, self.model_dir)
        os.makedirs(model_dir, exist_ok=True)
        record = self.record()
        attempts = record.get("attempts", [])
        meta = dict(self.meta, status="running", attempts=attempts)
        _write_json(os.path.join(REPO_ROOT, self.run_json_path), meta)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONUNBUFFERED="1")
        # The trainer's own python, not whatever `python3` is first on PATH.
        argv = [sys.executable] + self.argv[1:]
        log_path = os.path.join(model_dir, "train.log")
        start = time.time()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = _now()
        with open(log_path, "a", encoding="utf-8") as log:
            offset = log.tell()  # this attempt's output starts here
            log.write(f"\n=== {started} {self.command}\n")
            log.flush()
            process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
            try:
                returncode = process.wait()
            except BaseException:
                # Stopped (Ctrl-C, SIGTERM): stop the trainer too, so that
                # it does not keep the run directory locked; a restarted
                # study resumes the run from its last checkpoint.
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                attempts.append({"started": started,
                                 "seconds": round(time.time() - start, 1),
                                 "status": "interrupted"})
                meta.update(status="interrupted", attempts=attempts)
                _write_json(os.path.join(REPO_ROOT, self.run_json_path),
                            meta)
                raise
        seconds = time.time() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU time does not depend on other jobs sharing the machine.
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime
                                                   - usage.ru_stime)
        error = ""
        with open(log_path, encoding="utf-8", errors="replace") as log:
            log.seek(offset)
            lines = log.read().splitlines()
        for line in reversed(lines):
            if line.startswith("error:"):
                error = line[len("error:"):].strip()
                break
        results = self.results()
        if returncode == 0 and results and results.get("final"):
            status = "done"
        elif any(marker in error for marker in DIVERGENCE_MARKERS):
            status = "diverged"
        else:
            status = "failed"
            if not error and lines:
                error = lines[-1].strip()
        attempts.append({"started": started, "seconds": round(seconds, 1),
                         "cpu_seconds": round(cpu, 1),
                         "returncode": returncode, "status": status})
        meta.update(status=status, returncode=returncode, error=error,
                    wall_seconds=round(sum(a["seconds"] for a in attempts), 1),
                    cpu_seconds=round(sum(a.get("cpu_seconds", 0)
                                          for a in attempts), 1),
                    finished=_now(), attempts=attempts)
        _write_json(os.path.join(REPO_ROOT, self.run_json_path), meta)
        return status, seconds


class Study:
    """Runs the plan in order: per batch size, tuning runs, then seeds."""

    def __init__(self, plan, args, output_dir):
        self.plan, self.args, self.output_dir = plan, args, output_dir
        self.started = time.time()
        self.seconds_done = []
        self.manifest_path = os.path.join(REPO_ROOT, output_dir, "study.json")
        self.manifest = read_json(self.manifest_path) or {}
        self.manifest.update({
            "command": " ".join(["python3", "-m", "experiments.study"]
                                + [shlex.quote(a) for a in sys.argv[1:]]),
            "plan": plan,
            "updated": _now(),
        })
        self.manifest.setdefault("started", _now())
        self.manifest.setdefault("tuning", {})

    def make_run(self, batch_size, method, rate, seed, role):
        return Run(self.plan, self.output_dir, self.args.data_dir,
                   batch_size, method, rate, seed, role)

    def save_manifest(self):
        os.makedirs(os.path.dirname(self.manifest_path), exist_ok=True)
        self.manifest["updated"] = _now()
        _write_json(self.manifest_path, self.manifest)

    def total_runs(self):
        """Runs of the stated grids and seed reruns (edge runs not counted)."""
        per_batch = sum(len(m["grid"]) + len(self.plan["seeds"]) - 1
                        for m in self.plan["methods"].values())
        return per_batch * len(self.plan["batch_sizes"])

    def possible_edge_runs(self):
        return len(self.plan["batch_sizes"]) * sum(
            1 for m in self.plan["methods"].values() if m.get("beyond_edges"))

    def execute(self, run, index, label=None):
        """Runs `run` unless done; `index` counts the stated grid's runs."""
        label = label or f"{index}/{self.total_runs()}"
        status = run.status()
        skip = ("done",) if self.args.retry_failed else (
            "done", "diverged")
        if status in skip:
            print(f"[study] {label} {run.run_id}: "
                  f"{status}, skipped.", flush=True)
            return
        print(f"[study] {label} {run.run_id}: running\n"
              f"        {run.command}", flush=True)
        status, seconds = run.execute()
        self.seconds_done.append(seconds)
        remaining = max(0, self.total_runs() - index)
        mean = sum(self.seconds_done) / len(self.seconds_done)
        accuracy = run.final_accuracy()
        print(f"[study] {run.run_id}: {status} in {seconds:.0f} s"
              + (f", test accuracy {accuracy:.4f}" if accuracy is not None
                 else f" ({run.record().get('error', '')})")
              + f"; elapsed {(time.time() - self.started) / 60:.1f} min, "
              f"about {remaining * mean / 60:.0f} min left if the remaining "
              f"{remaining} runs take as long.", flush=True)

    def run(self):
        plan, seeds = self.plan, self.plan["seeds"]
        index = 0
        for batch_size in plan["batch_sizes"]:
            tuning = self.manifest["tuning"].setdefault(str(batch_size), {})
            for method, spec in plan["methods"].items():
                runs = [self.make_run(batch_size, method, rate, seeds[0],
                                      "tuning") for rate in spec["grid"]]
                for run in runs:
                    index += 1
                    self.execute(run, index)
                self.save_manifest()
                best = best_run(runs)
                edge_rate = rate_beyond_edge(spec, best)
                if edge_rate is not None:
                    edge_run = self.make_run(batch_size, method, edge_rate,
                                             seeds[0], "edge")
                    print(f"[study] b{batch_size}/{method}: best rate "
                          f"{format_rate(best.rate)} is at the grid's edge; "
                          f"trying {format_rate(edge_rate)} beyond it.",
                          flush=True)
                    self.execute(edge_run, index, label="beyond the edge:")
                    runs.append(edge_run)
                    best = best_run(runs)
                tuning[method] = {
                    "grid": {format_rate(r.rate): {
                        "status": r.status(), "final_accuracy":
                        r.final_accuracy(), "run_id": r.run_id}
                        for r in sorted(runs, key=lambda r: r.rate)},
                    "beyond_edge": edge_rate,
                    "best_learning_rate": best.rate if best else None,
                }
                self.save_manifest()
                if best is None:
                    print(f"[study] b{batch_size}/{method}: no tuning run "
                          "finished; no seed reruns.", flush=True)
                    index += len(seeds) - 1
                    continue
                for seed in seeds[1:]:
                    index += 1
                    self.execute(self.make_run(batch_size, method, best.rate,
                                               seed, "seed"), index)
                self.save_manifest()
        self.manifest["finished"] = _now()
        self.save_manifest()


def best_run(runs):
    """The run with the highest final test accuracy, or None."""
    scored = [(run.final_accuracy(), run) for run in runs
              if run.final_accuracy() is not None]
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


def rate_beyond_edge(spec, best):
    """The plan's rate beyond the grid edge where `best` landed, or None.

    A best rate at an edge of the grid says only that the optimum may lie
    outside it; every method gets the same rule: one more rate, a grid step
    past that edge (`beyond_edges: [below, above]` in the plan).
    """
    edges = spec.get("beyond_edges")
    grid = [float(rate) for rate in spec["grid"]]
    if not edges or best is None or len(grid) < 2:
        return None
    if abs(best.rate - min(grid)) <= 1e-9 * best.rate:
        return float(edges[0])
    if abs(best.rate - max(grid)) <= 1e-9 * best.rate:
        return float(edges[1])
    return None


def _stop(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    os.chdir(REPO_ROOT)
    plan = load_plan(args)
    output_dir = args.output_dir or (
        os.path.join("runs", "study_quick") if args.quick
        else os.path.join("runs", "study"))
    study = Study(plan, args, output_dir)
    if args.dry_run:
        for batch_size in plan["batch_sizes"]:
            for method, spec in plan["methods"].items():
                for rate in spec["grid"]:
                    print(study.make_run(batch_size, method, rate,
                                         plan["seeds"][0], "tuning").command)
                if spec.get("beyond_edges"):
                    below, above = spec["beyond_edges"]
                    print(f"# if the best is at an edge: {method} at "
                          f"b{batch_size} with rate {format_rate(below)} "
                          f"or {format_rate(above)}")
                for seed in plan["seeds"][1:]:
                    print(f"# then {method} at b{batch_size}, best rate, "
                          f"seed {seed}")
        print(f"# {study.total_runs()} runs, and up to "
              f"{study.possible_edge_runs()} more beyond grid edges")
        return
    signal.signal(signal.SIGTERM, _stop)
    print(f"[study] {study.total_runs()} runs (and up to "
          f"{study.possible_edge_runs()} beyond grid edges) into "
          f"{output_dir}: batch sizes "
          f"{plan['batch_sizes']}, {plan['epochs']} epoch(s)"
          + (f" cut to {plan['max_steps']} steps" if plan["max_steps"] else "")
          + f", seeds {plan['seeds']}, methods "
          f"{', '.join(plan['methods'])}.", flush=True)
    for batch_size in plan["batch_sizes"]:  # refuses a mismatched output_dir
        for method, spec in plan["methods"].items():
            for rate in spec["grid"]:
                study.make_run(batch_size, method, rate, plan["seeds"][0],
                               "tuning").status()
    study.save_manifest()
    try:
        study.run()
    except KeyboardInterrupt:
        sys.exit("[study] interrupted; start the same command again to "
                 "resume.")
    print(f"[study] all runs handled in "
          f"{(time.time() - study.started) / 60:.1f} min.", flush=True)
    if not args.no_report:
        from experiments import report
        report_argv = [f"--output_dir={output_dir}"]
        if args.report_dir:
            report_argv.append(f"--report_dir={args.report_dir}")
        report.main(report_argv)


if __name__ == "__main__":
    main()
