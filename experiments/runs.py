"""Trainer runs of a study: one subprocess each, resumable, archived.

Shared by `experiments.warmup_study` (which starts runs) and
`experiments.warmup_report` (which only reads their archived files); it
imports neither.

A run lives in `WORK_DIR/<run_id>/` (checkpoints and all, out of git); after
every attempt its small files (`COPIED_FILES`) and the study's `run.json`
go to `ARCHIVE_DIR/<run_id>/`, which is committed: the report rebuilds
from there.
"""

import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Copied from the model dir after every attempt; run.json is written there.
COPIED_FILES = ("results.json", "steps.jsonl", "train.log",
                "diagnostics.jsonl")
DIVERGENCE_MARKER = "Non-finite gradient"


def _interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm():
    """A SIGTERM stops a study as Ctrl-C does: its current run is marked
    interrupted (the same command resumes it) and its trainer stopped."""
    signal.signal(signal.SIGTERM, _interrupt)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_json(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.partial"
    with open(staging, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
    os.replace(staging, path)


# Files whose change can change what a trainer run computes; results, logs
# and docs written beside them (a study's own archive among them) cannot.
CODE_PATTERNS = ("*.py", "*.yaml", "*.yml", "*.cfg", "*.toml")


def _git(code_root, *arguments):
    """`git -C code_root arguments...`'s output, or None outside a checkout."""
    try:
        return subprocess.run(["git", "-C", code_root, *arguments],
                              capture_output=True, text=True, check=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def code_version(code_root=REPO_ROOT):
    """The commit a run's code is at, and whether the code differs from it.

    Returns:
        dict with commit (None outside a git checkout), dirty (whether a
        tracked or untracked code file, `CODE_PATTERNS`, differs from the
        commit; a rerun at the commit alone may then differ) and
        changed_files (those files, at most 20).
    """
    commit = _git(code_root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "changed_files": []}
    status = _git(code_root, "status", "--porcelain", "--untracked-files=all",
                  "--", *CODE_PATTERNS) or ""
    changed = sorted(line[3:] for line in status.splitlines() if line)
    return {"commit": commit.strip(), "dirty": bool(changed),
            "changed_files": changed[:20]}


# Instruction sets that decide which oneDNN and Eigen kernels run, and so
# the order of their floating-point sums.
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
# Environment variables that change TensorFlow's kernels or threads.
NUMERICS_VARIABLES = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA",
                      "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                      "OMP_NUM_THREADS")


def _cpu():
    """(model name, the `_CPU_FLAGS` it has) of the first CPU in
    /proc/cpuinfo; the machine type alone where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return platform.machine(), []
    info = {key.strip(): value.strip() for key, value in (
        line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = set(info.get("flags", "").split())
    return (info.get("model name") or platform.machine(),
            [flag for flag in _CPU_FLAGS if flag in flags])


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment():
    """What besides the code and the thread count (kept beside it in each
    attempt) decides a run's floating-point results: the library versions,
    the CPU (oneDNN picks its kernels per instruction set) and the
    variables that choose kernels or threads."""
    model, flags = _cpu()
    return {"python": platform.python_version(),
            "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
            "keras": _version("keras"), "numpy": _version("numpy"),
            "cpu": model, "cpu_flags": flags, "cores": os.cpu_count(),
            "variables": {name: os.environ[name] for name in
                          NUMERICS_VARIABLES if name in os.environ}}


def format_rate(rate):
    return f"{float(rate):g}"


def run_id(stage, batch_size, method, rate, warmup_epochs, epochs, seed):
    return (f"{stage}/b{batch_size}/{method}/lr{format_rate(rate)}"
            f"_w{format_rate(warmup_epochs)}_e{epochs}_s{seed}")


class Run:
    """One trainer run: its command, its files and its status.

    Args:
        spec: dict with run_id, config (a YAML path), overrides (list of
            `key=value`) and anything else worth keeping in run.json
            (method, rate, seed, ...).
        work_dir: where model dirs go (out of git).
        archive_dir: where the small files are copied (committed).
        trainer: the trainer module, run as `python -m trainer`.
        threads: CPU threads for TensorFlow's and oneDNN's op pools (0:
            TensorFlow's default, every core); kept in run.json.
        code_root: the checkout whose code runs (its trainer, on
            PYTHONPATH); its commit is kept in run.json. A rerun of an old
            run passes a checkout of the run's commit.
    """

    def __init__(self, spec, work_dir, archive_dir, trainer="trainers.train",
                 threads=0, code_root=REPO_ROOT):
        self.spec = spec
        self.threads = threads
        self.code_root = code_root
        self.run_id = spec["run_id"]
        self.model_dir = os.path.join(work_dir, self.run_id)
        self.archive = os.path.join(archive_dir, self.run_id)
        self.argv = ["python3", "-m", trainer,
                     f"--config_file={spec['config']}",
                     f"--model_dir={self.model_dir}", "--mode=train",
                     f"--params_override={','.join(spec['overrides'])}"]
        self.command = " ".join(shlex.quote(a) for a in self.argv)

    def record(self):
        return read_json(os.path.join(self.archive, "run.json")) or {}

    def status(self):
        """'done', 'diverged', 'failed', 'interrupted' or 'pending'."""
        return self.record().get("status", "pending")

    def execute(self):
        """Runs (or resumes) the trainer and archives its files."""
        os.makedirs(self.model_dir, exist_ok=True)
        record = self.record()
        attempts = record.get("attempts", [])
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(
                       p for p in (self.code_root,
                                   os.environ.get("PYTHONPATH")) if p))
        if self.threads:
            # Two study processes side by side each get their own core
            # instead of both trainers spreading over every core.
            env.update(TF_NUM_INTRAOP_THREADS=str(self.threads),
                       OMP_NUM_THREADS=str(self.threads))
        log_path = os.path.join(self.model_dir, "train.log")
        code = code_version(self.code_root)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(log_path, "a", encoding="utf-8") as log:
            offset = log.tell()
            log.write(f"\n=== {started} {self.command}\n")
            log.flush()
            # The study's own interpreter, not whatever python3 is on PATH.
            process = subprocess.Popen([sys.executable] + self.argv[1:],
                                       cwd=self.code_root, stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
            try:
                returncode = process.wait()
            except BaseException:
                process.terminate()
                process.wait()
                attempts.append({"started": started, "status": "interrupted",
                                 "seconds": round(time.time() - start, 1),
                                 "code": code})
                self._save(attempts, "interrupted", None, "")
                raise
        seconds = time.time() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime
                                                    - before.ru_stime)
        with open(log_path, encoding="utf-8", errors="replace") as log:
            log.seek(offset)
            lines = log.read().splitlines()
        error = next((line[len("error:"):].strip() for line in reversed(lines)
                      if line.startswith("error:")), "")
        if returncode == 0:
            status = "done"
        elif DIVERGENCE_MARKER in error:
            status = "diverged"
        else:
            status = "failed"
            error = error or (lines[-1].strip() if lines else "")
        attempts.append({"started": started, "seconds": round(seconds, 1),
                         "cpu_seconds": round(cpu, 1),
                         "threads": self.threads or "default",
                         "returncode": returncode, "status": status,
                         "code": code, "environment": environment()})
        self._save(attempts, status, returncode, error)
        return status, seconds

    def _save(self, attempts, status, returncode, error):
        os.makedirs(self.archive, exist_ok=True)
        for name in COPIED_FILES:
            source = os.path.join(self.model_dir, name)
            if os.path.exists(source):
                shutil.copyfile(source, os.path.join(self.archive, name))
        write_json(os.path.join(self.archive, "run.json"), dict(
            self.spec, command=self.command, status=status,
            returncode=returncode, error=error, attempts=attempts,
            wall_seconds=round(sum(a["seconds"] for a in attempts), 1),
            cpu_seconds=round(sum(a.get("cpu_seconds", 0)
                                  for a in attempts), 1)))


CHANCE = 0.15  # validation accuracy at or below this: no learning (10 classes)


def failed_or_chance(outcome):
    return outcome.status == "diverged" or (
        outcome.validation_accuracy is not None
        and outcome.validation_accuracy <= CHANCE)


def best(outcomes):
    """Highest validation accuracy (then lowest training loss), or None."""
    scored = [o for o in outcomes if o.score() is not None]
    return max(scored, key=lambda o: o.score()) if scored else None


def pilot_verdict(warm, cold, gap_points, tuning_seed=0):
    """Is SGD without warmup (`cold`) clearly worse than with (`warm`)?

    Rates are chosen on the `tuning_seed` runs; the gap is the difference
    of the mean validation accuracy over every seed run at the two chosen
    rates. Yes when the gap is more than `gap_points`, or when no-warmup
    diverges or ends at chance at more of the shared tuning rates while its
    mean is not above warmup's by more than `gap_points` (a no-warmup best
    well above warmup's means a lower rate does what warmup does).

    Returns:
        dict with best_warm, best_cold (tuning runs), gap (points), seeds
        (runs averaged per method), shared (rates), bad_warm, bad_cold and
        shows; None without a finished tuning run of each.
    """
    warm_tuning = [o for o in warm if o.record["seed"] == tuning_seed]
    cold_tuning = [o for o in cold if o.record["seed"] == tuning_seed]
    best_warm, best_cold = best(warm_tuning), best(cold_tuning)
    if best_warm is None or best_cold is None:
        return None

    def mean_at_best(group, chosen):
        rate = chosen.record["base_learning_rate"]
        values = [o.validation_accuracy for o in group
                  if o.record["base_learning_rate"] == rate
                  and o.validation_accuracy is not None]
        return sum(values) / len(values), len(values)

    warm_by = {o.record["base_learning_rate"]: o for o in warm_tuning}
    cold_by = {o.record["base_learning_rate"]: o for o in cold_tuning}
    shared = sorted(set(warm_by) & set(cold_by))
    bad_warm = sum(failed_or_chance(warm_by[r]) for r in shared)
    bad_cold = sum(failed_or_chance(cold_by[r]) for r in shared)
    (warm_mean, warm_n), (cold_mean, cold_n) = (
        mean_at_best(warm, best_warm), mean_at_best(cold, best_cold))
    gap = 100 * (warm_mean - cold_mean)
    shows = gap > gap_points or (bad_cold > bad_warm and gap > -gap_points)
    return {"best_warm": best_warm, "best_cold": best_cold, "gap": gap,
            "seeds": (warm_n, cold_n), "shared": shared,
            "bad_warm": bad_warm, "bad_cold": bad_cold, "shows": shows}


def budget_choice(ladder, loss_ratio, accuracy_points):
    """The smallest budget of a doubling ladder past which training flattens.

    Args:
        ladder: [(epochs, Outcome)] in increasing epochs, each budget twice
            the one before it; runs that did not finish are skipped.
        loss_ratio: a budget is enough when the run at twice it ends with a
            training loss at most this many times lower...
        accuracy_points: ...and a validation accuracy at most this many
            points higher.

    Returns:
        (epochs, flattened): the first enough budget and True; the largest
        finished budget and False when none is enough; (None, False) when
        no run finished above chance.
    """
    finished = [(epochs, outcome) for epochs, outcome in ladder
                if outcome.status == "done" and not failed_or_chance(outcome)]
    for (epochs, shorter), (doubled, longer) in zip(finished, finished[1:]):
        if doubled == 2 * epochs and (
                shorter.train_loss <= loss_ratio * longer.train_loss
                and 100 * (longer.validation_accuracy
                           - shorter.validation_accuracy) <= accuracy_points):
            return epochs, True
    return (finished[-1][0], False) if finished else (None, False)


def budget_ladders(plan, outcomes):
    """The budget pilot's archived ladders and choices, by batch size.

    Returns:
        {batch_size: {"rate": the base rate the choice reads (the plan's,
        halved after each rate where a run diverged or ended at chance,
        at most the plan's max_halvings times, default once), "ladder": [(epochs, Outcome)], "epochs": chosen budget,
        "flattened": bool}}; runs not in the archive are absent from the
        ladder.
    """
    pilot = plan["budget_pilot"]
    found = {}
    for outcome in outcomes.values():
        record = outcome.record
        if record.get("stage") == "budget":
            found[(record["batch_size"], record["base_learning_rate"],
                   record["epochs"])] = outcome
    choices = {}
    for batch_size, budgets in pilot["ladders"].items():
        batch_size = int(batch_size)
        rate = float(pilot["base_learning_rate"])
        for _ in range(pilot.get("max_halvings", 1)):
            if not any((batch_size, rate, e) in found
                       and failed_or_chance(found[(batch_size, rate, e)])
                       for e in budgets):
                break
            rate /= 2
        ladder = [(e, found[(batch_size, rate, e)]) for e in budgets
                  if (batch_size, rate, e) in found]
        epochs, flattened = budget_choice(ladder, pilot["loss_ratio"],
                                          pilot["accuracy_points"])
        choices[batch_size] = {"rate": rate, "ladder": ladder,
                               "epochs": epochs, "flattened": flattened}
    return choices


def load_archived(archive_dir):
    """Every archived run: {run_id: Outcome} (no trainer needed)."""
    outcomes = {}
    for root, _, files in os.walk(archive_dir):
        if "run.json" in files:
            outcome = Outcome(root)
            outcomes[outcome.run_id] = outcome
    return outcomes


class Outcome:
    """What an archived run measured, read from its files."""

    def __init__(self, directory):
        self.directory = directory
        self.record = read_json(os.path.join(directory, "run.json")) or {}
        self.run_id = self.record.get("run_id", directory)
        self.results = read_json(os.path.join(directory, "results.json")) or {}
        self.status = self.record.get("status", "pending")

    def _last(self, key):
        epochs = self.results.get("epochs") or []
        return epochs[-1].get(key) if epochs else None

    @property
    def validation_accuracy(self):
        return self._last("validation_accuracy") if self.status == "done" \
            else None

    @property
    def test_accuracy(self):
        return self._last("eval_accuracy") if self.status == "done" else None

    @property
    def train_loss(self):
        return self._last("train_loss") if self.status == "done" else None

    def score(self):
        """Ranking key: validation accuracy, then lower training loss."""
        accuracy = self.validation_accuracy
        if accuracy is None:
            return None
        loss = self.train_loss
        return (accuracy, -loss if loss is not None and math.isfinite(loss)
                else -math.inf)

    def step_losses(self):
        """{step: training loss} from the trainer's steps.jsonl."""
        return {record["step"]: record["loss"]
                for record in self._json_lines("steps.jsonl")}

    def total_steps(self):
        steps = self.results.get("steps_per_epoch")
        epochs = ((self.results.get("config") or {}).get("train")
                  or {}).get("epochs")
        return steps * epochs if steps and epochs else None

    def early_loss(self, fraction=0.2):
        """Mean training loss over the first `fraction` of the steps."""
        total, losses = self.total_steps(), self.step_losses()
        if not total or not losses:
            return None
        early = [loss for step, loss in losses.items()
                 if step <= max(1, round(fraction * total))]
        if not early:
            return None
        return sum(early) / len(early)

    def steps_to(self, target):
        """First step whose validation accuracy reaches `target`, or None."""
        for entry in self.results.get("epochs") or []:
            if (entry.get("validation_accuracy") or 0.0) >= target:
                return entry["step"]
        return None

    def diagnostics(self):
        return self._json_lines("diagnostics.jsonl")

    def _json_lines(self, name):
        path = os.path.join(self.directory, name)
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
