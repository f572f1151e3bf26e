r"""Reruns an archived study run and says whether it came out bit-identical.

    python3 -m experiments.rerun_check \
        experiments/gate_results/runs/pilot/sigmoid_mlp/b2048/sgd_nowarmup/lr0.00884_w0_e5_s1
    python3 -m experiments.rerun_check RUN_DIR --commit d24d902
    python3 -m experiments.rerun_check RUN_DIR --twice --max_steps 30 \
        --checkpoint_every 5

Without --twice: runs the run's own command (from its run.json) into a
fresh model dir with the run's thread count, at the commit its run.json
records (a temporary git worktree), then compares its steps.jsonl step by
step and its results.json epoch by epoch with the archived ones. Runs
archived before run.json kept a commit are rerun with this checkout (said
so; `--commit` picks another). Step records converted from an old
train.log hold the 4 digits the log printed: they are compared at that
precision, the per-epoch numbers exactly.

With --twice: runs the same command twice from scratch (this checkout, or
--commit), with a checkpoint every --checkpoint_every steps and optionally
only the first --max_steps steps, and compares the two runs' step records,
epochs and every tensor of every checkpoint: the first checkpoint that
differs, and each of its variables that differ and by how much, say where
the runs part.

Either way the wall-clock throughput (images/s) is left out, the first
difference is printed, and the exit code is 0 only when the runs are
identical. Paired seeds are exactly paired only when they are
(`train.deterministic=true`).
"""

import argparse
import contextlib
import decimal
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from experiments import runs as runs_lib

# Wall-clock figures (throughput, the per-epoch seconds), different in
# every run.
TIMING_FIELDS = ("images_per_second", "seconds")
# A step record whose floats all have at most this many significant digits
# was converted from a train.log line (4 printed digits), not written by the
# trainer (17 digits, float repr).
PRINTED_DIGITS = 8
_STEP_LINE = re.compile(r"step (\d+)/\d+ epoch (\S+) loss (\S+) "
                        r"accuracy (\S+) lr (\S+) (\S+) images/s")
_CHECKPOINT_STEP = re.compile(r"ckpt-(\d+)\.index$")


def step_records(directory):
    """{step: record} from steps.jsonl, else from train.log's step lines.

    Trainers before steps.jsonl (and the archived runs converted from their
    logs) printed the same fields, rounded, on the console; a resumed step
    keeps its last line.
    """
    path = os.path.join(directory, "steps.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return {record["step"]: record for record in
                    (json.loads(line) for line in f if line.strip())}
    log = os.path.join(directory, "train.log")
    if not os.path.exists(log):
        return {}
    with open(log, encoding="utf-8", errors="replace") as f:
        matches = _STEP_LINE.finditer(f.read())
        return {int(m[1]): {"step": int(m[1]), "epoch": float(m[2]),
                            "loss": float(m[3]), "accuracy": float(m[4]),
                            "learning_rate": float(m[5])} for m in matches}


def _significant_digits(value):
    return len(decimal.Decimal(repr(value)).normalize().as_tuple().digits)


def is_printed(records):
    """Whether every float in `records` has few digits: a converted log."""
    floats = [value for record in records.values() for key, value in
              record.items() if isinstance(value, float)
              and key not in TIMING_FIELDS]
    return bool(floats) and all(_significant_digits(value) <= PRINTED_DIGITS
                                for value in floats)


def _as_printed(value, like):
    """`value` rounded to the decimal places `like` was printed with."""
    if not isinstance(value, float) or not isinstance(like, float):
        return value
    places = max(0, -decimal.Decimal(repr(like)).as_tuple().exponent)
    return float(f"{value:.{places}f}")


def _same(before, after, printed):
    """Equal values; with `printed`, equal as the coarser one was printed."""
    if printed and (_as_printed(after, before) == before
                    or _as_printed(before, after) == after):
        return True
    numbers = {int, float}
    return before == after and (type(before) is type(after) or {
        type(before), type(after)} <= numbers)


def _first_field_difference(archived, rerun, printed=False):
    """(field, archived value, rerun value) of the first field that differs.

    Both records' fields are compared (timings left out); a field only one
    has differs with None on the other side, except in records printed to
    a log, which carried fewer fields than steps.jsonl.
    """
    fields = list(dict.fromkeys([*archived, *rerun]))
    if printed:
        fields = [field for field in fields
                  if field in archived and field in rerun]
    for field in fields:
        if field in TIMING_FIELDS:
            continue
        before, after = archived.get(field), rerun.get(field)
        if not _same(before, after, printed):
            return field, before, after
    return None


def first_step_difference(archived, rerun, printed=False):
    """The first step whose record differs, or None.

    Args:
        archived, rerun: {step: record}, as `step_records` reads them.
        printed: compare at the precision the records were printed with
            (a converted log, either side) instead of exactly.

    Returns:
        dict with step, field, archived and rerun (the values; None where
        a run has no such step or field), or None when every step matches.
    """
    for step in sorted(set(archived) | set(rerun)):
        if step not in archived or step not in rerun:
            return {"step": step, "field": "step",
                    "archived": step if step in archived else None,
                    "rerun": step if step in rerun else None}
        found = _first_field_difference(archived[step], rerun[step], printed)
        if found:
            field, before, after = found
            return {"step": step, "field": field, "archived": before,
                    "rerun": after}
    return None


def first_epoch_difference(archived, rerun):
    """The first results.json epoch entry that differs, exactly, or None.

    Args:
        archived, rerun: the `epochs` lists of two results.json files.

    Returns:
        dict with epoch, field, archived and rerun, or None.
    """
    for index in range(max(len(archived), len(rerun))):
        if index >= len(archived) or index >= len(rerun):
            return {"epoch": index + 1, "field": "epoch",
                    "archived": index + 1 if index < len(archived) else None,
                    "rerun": index + 1 if index < len(rerun) else None}
        found = _first_field_difference(archived[index], rerun[index])
        if found:
            field, before, after = found
            return {"epoch": archived[index].get("epoch", index + 1),
                    "field": field, "archived": before, "rerun": after}
    return None


def checkpoint_steps(model_dir):
    """{step: checkpoint prefix} of a trainer's model dir."""
    found = {}
    for index in glob.glob(os.path.join(model_dir, "checkpoints",
                                        "ckpt-*.index")):
        match = _CHECKPOINT_STEP.search(index)
        if match:
            found[int(match[1])] = index[:-len(".index")]
    return found


def tensor_difference(first, second):
    """How two saved tensors differ: None when bit-identical.

    Returns:
        dict with elements (how many differ, of how many) and
        max_abs_difference (None for non-numeric tensors), or for
        different shapes the two shapes.
    """
    import numpy as np

    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.dtype != second.dtype:
        return {"shapes": [list(first.shape), list(second.shape)],
                "dtypes": [str(first.dtype), str(second.dtype)]}
    if first.dtype.kind in "fc":
        # Bit patterns: NaN equals NaN, 0.0 differs from -0.0.
        differ = (first.view(f"u{first.dtype.itemsize}")
                  != second.view(f"u{second.dtype.itemsize}"))
    else:
        differ = first != second
    count = int(np.count_nonzero(differ))
    if not count:
        return None
    largest = None
    if first.dtype.kind in "fiu":
        gaps = np.abs(first.astype("float64") - second.astype("float64"))
        largest = float(np.nanmax(np.where(differ, gaps, 0.0)))
    return {"elements": f"{count} of {first.size}",
            "max_abs_difference": largest}


def saved_tensors(reader):
    """{checkpoint key: variable name} of a checkpoint, in the order of its
    object graph; the name is the one the variable was created with, e.g.
    dense1/kernel (a trainer's model variable is saved under an optimizer
    path)."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return {attribute.checkpoint_key: attribute.full_name or
            attribute.checkpoint_key for node in graph.nodes
            for attribute in node.attributes}


def first_checkpoint_difference(first_dir, second_dir):
    """The first checkpoint (by step) with a tensor that differs, or None.

    Every tensor saved (the model's variables, the optimizer's slots and
    iteration count, the epoch's running sums) is compared bit for bit.

    Returns:
        (checkpoints compared, difference): difference is a dict with the
        step, how many of its tensors differ, and each of those by name
        with how it differs (`tensor_difference`); or None.
    """
    from trainers import startup
    with startup.quiet_tensorflow_import(sys.argv):
        import tensorflow as tf

    first, second = checkpoint_steps(first_dir), checkpoint_steps(second_dir)
    for compared, step in enumerate(sorted(set(first) | set(second)), 1):
        if step not in first or step not in second:
            return compared, {"step": step,
                              "difference": "checkpoint in one run only"}
        readers = [tf.train.load_checkpoint(prefix)
                   for prefix in (first[step], second[step])]
        names = [saved_tensors(reader) for reader in readers]
        differing = {}
        for key in dict.fromkeys([*names[0], *names[1]]):
            if key not in names[0] or key not in names[1]:
                difference = "in one checkpoint only"
            else:
                difference = tensor_difference(readers[0].get_tensor(key),
                                               readers[1].get_tensor(key))
            if difference:
                differing[names[0].get(key) or names[1][key]] = difference
        if differing:
            return compared, {
                "step": step,
                "tensors_differing": f"{len(differing)} of {len(names[0])}",
                "tensors": differing}
    return len(first), None


def _git(*arguments, repo=None):
    return subprocess.run(["git", "-C", repo or runs_lib.REPO_ROOT,
                           *arguments], capture_output=True, text=True,
                          check=True).stdout.strip()


def trainer_of(record):
    """The trainer module the archived command ran (`python3 -m MODULE`)."""
    argv = shlex.split(record.get("command", ""))
    return (argv[argv.index("-m") + 1] if "-m" in argv[:-1]
            else "trainers.train")


def recorded_code(record):
    """The commit a run's run.json records, a note, and the commits seen.

    Returns:
        (commit or None, note): the note says what a rerun at that commit
        can and cannot show (uncommitted changes, attempts at several
        commits, no commit recorded).
    """
    codes = [attempt["code"] for attempt in record.get("attempts", [])
             if attempt.get("code")]
    commits = list(dict.fromkeys(code["commit"] for code in codes
                                 if code.get("commit")))
    if not commits:
        return None, "its run.json records no commit"
    note = f"at its recorded commit {commits[0][:12]}"
    if len(commits) > 1:
        note += (f" (resumed at {', '.join(c[:12] for c in commits[1:])}: "
                 "its attempts ran different code)")
    dirty = sorted({name for code in codes if code.get("dirty")
                    for name in code.get("changed_files", [])})
    if dirty:
        note += (" (it ran with uncommitted changes to "
                 f"{', '.join(dirty)}, which a rerun cannot restore)")
    return commits[0], note


def archiving_commit_guess(run_dir, record, repo=None):
    """For a run with no recorded commit: the last commit before its start
    on the history of the commit that archived it (the study's branch, not
    necessarily this one's), or None. The run may have had uncommitted
    changes on top of it."""
    repo = repo or runs_lib.REPO_ROOT
    started = (record.get("attempts") or [{}])[0].get("started")
    try:
        path = os.path.relpath(os.path.abspath(os.path.join(
            run_dir, "run.json")), repo)
        archived_by = _git("log", "--diff-filter=A", "--format=%H", "-1",
                           "--", path, repo=repo)
        if not (archived_by and started):
            return None
        return _git("log", "-1", f"--before={started}", "--format=%H",
                    archived_by, repo=repo) or None
    except (OSError, subprocess.CalledProcessError):
        return None


@contextlib.contextmanager
def checkout(commit, repo=None):
    """A temporary git worktree of `repo` (this one) at `commit`, removed
    afterwards; None: this checkout itself."""
    repo = repo or runs_lib.REPO_ROOT
    if commit is None:
        yield repo
        return
    directory = tempfile.mkdtemp(prefix="rerun_code_")
    try:
        _git("worktree", "add", "--detach", directory, commit, repo=repo)
    except subprocess.CalledProcessError as error:
        shutil.rmtree(directory, ignore_errors=True)
        sys.exit(f"--commit {commit}: git cannot check it out "
                 f"({error.stderr.strip()}); pass a commit of this "
                 "repository.")
    try:
        yield directory
    finally:
        _git("worktree", "remove", "--force", directory, repo=repo)


def _execute(record, work_dir, name, threads, code_root):
    run = runs_lib.Run(dict(record, run_id=name), work_dir,
                       os.path.join(work_dir, "archive"),
                       trainer=trainer_of(record), threads=threads,
                       code_root=code_root)
    # From scratch: a model dir left by an earlier check would be resumed.
    for previous in (run.model_dir, run.archive):
        shutil.rmtree(previous, ignore_errors=True)
    print(f"[rerun_check] {name}: {run.command}", file=sys.stderr, flush=True)
    status, seconds = run.execute()
    return run, status, seconds


def environment_differences(archived_record, rerun_record):
    """What the rerun's recorded environment and threads changed.

    Returns:
        {field: {"archived": value, "rerun": value}}, or None when the
        archived run recorded no environment.
    """
    def last(record):
        attempts = [a for a in record.get("attempts", [])
                    if a.get("status") == "done"] or [{}]
        return attempts[-1]

    before, after = last(archived_record), last(rerun_record)
    if "environment" not in before:
        return None
    fields = {"threads": (before.get("threads"), after.get("threads"))}
    for key in dict.fromkeys([*before["environment"],
                              *after.get("environment", {})]):
        fields[key] = (before["environment"].get(key),
                       after.get("environment", {}).get(key))
    return {key: {"archived": old, "rerun": new}
            for key, (old, new) in fields.items() if old != new}


def _this_checkout():
    code = runs_lib.code_version()
    if code["commit"] is None:
        return "with this copy (not a git checkout)"
    return (f"with this checkout ({code['commit'][:12]}"
            + (f", uncommitted changes to {', '.join(code['changed_files'])}"
               if code["dirty"] else "") + ")")


def compare_with_archive(archived, args, work_dir, threads):
    """Reruns `archived` once and compares it with its archived files."""
    commit, note = recorded_code(archived.record)
    if args.commit:
        commit, note = args.commit, f"at --commit {args.commit}"
    elif commit is None:
        guess = archiving_commit_guess(args.archived_run, archived.record)
        note = (f"{_this_checkout()}: its run.json records no commit "
                "(archived before runs recorded one), so a difference may "
                "come from code changed since it ran")
        print(f"[rerun_check] {archived.run_id}: rerun {note}. --commit "
              "COMMIT reruns it at another"
              + (f"; the last commit before it started on the branch that "
                 f"archived it is {guess[:12]} (--commit {guess[:12]})"
                 if guess else "") + ".", file=sys.stderr, flush=True)
    with checkout(commit) as code_root:
        run, status, seconds = _execute(archived.record, work_dir, "rerun",
                                        threads, code_root)
    rerun = runs_lib.Outcome(run.archive)
    before, after = step_records(archived.directory), step_records(
        rerun.directory)
    printed = is_printed(before) or is_printed(after)
    step = first_step_difference(before, after, printed)
    epoch = first_epoch_difference(archived.results.get("epochs") or [],
                                   rerun.results.get("epochs") or [])
    environment = environment_differences(archived.record, rerun.record)
    return {"run": archived.run_id, "code": note, "rerun_status": status,
            "seconds": round(seconds),
            "environment_differences": (
                "not recorded by the archived run (CPU, library versions): "
                "a difference may come from the machine" if environment is None
                else environment),
            "identical": status == "done" and not step and not epoch,
            "steps_compared": len(before),
            "step_precision": ("as printed in train.log (converted)"
                               if printed else "exact"),
            "first_step_difference": step,
            "first_epoch_difference": epoch,
            "archived_last_epoch": (archived.results.get("epochs")
                                    or [None])[-1],
            "rerun_last_epoch": (rerun.results.get("epochs") or [None])[-1]}


def compare_twice(archived, args, work_dir, threads):
    """Runs `archived`'s command twice from scratch and compares the two."""
    extra = [f"train.checkpoint_every_steps={args.checkpoint_every}",
             # Every checkpoint kept, so that each can be compared.
             "train.checkpoints_to_keep=1000000"]
    if args.max_steps:
        extra.append(f"train.max_steps={args.max_steps}")
    spec = dict(archived.record,
                overrides=list(archived.record["overrides"]) + extra)
    note = (f"at --commit {args.commit}" if args.commit else
            _this_checkout())
    with checkout(args.commit) as code_root:
        executed = [_execute(spec, work_dir, name, threads, code_root)
                    for name in ("first", "second")]
    (first, *_), (second, *_) = executed
    statuses = [status for _, status, _ in executed]
    outcomes = [runs_lib.Outcome(run.archive) for run in (first, second)]
    step = first_step_difference(*[step_records(o.directory)
                                   for o in outcomes])
    epoch = first_epoch_difference(*[o.results.get("epochs") or []
                                     for o in outcomes])
    compared, tensors = first_checkpoint_difference(first.model_dir,
                                                    second.model_dir)
    return {"run": archived.run_id, "code": note, "twice": True,
            "max_steps": args.max_steps or None,
            "checkpoint_every": args.checkpoint_every,
            "statuses": statuses,
            "seconds": [round(seconds) for *_, seconds in executed],
            "identical": (statuses == ["done", "done"] and not step
                          and not epoch and not tensors and compared > 0),
            "checkpoints_compared": compared,
            "first_step_difference": step,
            "first_epoch_difference": epoch,
            "first_checkpoint_difference": tensors}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("archived_run", help="a directory holding run.json")
    parser.add_argument("--work_dir", default=None,
                        help="where the reruns go, kept; its rerun/, first/, "
                             "second/ and archive/ are replaced (default: a "
                             "temp dir, removed)")
    parser.add_argument("--commit", default=None,
                        help="rerun at this commit (a temporary git "
                             "worktree) instead of the recorded one or, "
                             "with --twice, this checkout")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the run's own; for a run "
                             "with TensorFlow's default, its machine's "
                             "cores where recorded)")
    parser.add_argument("--twice", action="store_true",
                        help="run the command twice from scratch and "
                             "compare the two, checkpoints included")
    parser.add_argument("--checkpoint_every", type=int, default=10,
                        help="with --twice: steps between checkpoints")
    parser.add_argument("--max_steps", type=int, default=0,
                        help="with --twice: stop after this many steps (0: "
                             "the whole run)")
    parser.add_argument("--output", default=None,
                        help="also write the verdict to this JSON file")
    args = parser.parse_args(argv)
    if args.checkpoint_every < 1 or args.max_steps < 0:
        parser.error("--checkpoint_every must be >= 1 and --max_steps >= 0.")
    return args


def check(args):
    """The verdict (a dict) of one rerun check; see the module docstring."""
    archived = runs_lib.Outcome(args.archived_run)
    if archived.status != "done":
        sys.exit(f"{args.archived_run}: status {archived.status!r}; only a "
                 "finished run can be compared.")
    work_dir = os.path.abspath(args.work_dir or tempfile.mkdtemp(
        prefix="rerun_check_"))
    threads = args.threads
    if threads is None:
        # TensorFlow's default is a thread per core: the archived machine's
        # count where it was recorded, so the sums split the same way.
        attempt = archived.record["attempts"][-1]
        threads = attempt.get("threads")
        if not isinstance(threads, int):
            threads = (attempt.get("environment") or {}).get("cores") or 0
    compare = compare_twice if args.twice else compare_with_archive
    try:
        verdict = compare(archived, args, work_dir, threads)
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    verdict.update(threads=threads or "default",
                   environment=runs_lib.environment())
    return verdict


def main(argv=None):
    args = parse_args(argv)
    verdict = check(args)
    text = json.dumps(verdict, indent=1)
    print(text)
    if args.output:
        runs_lib.write_json(args.output, verdict)
    return 0 if verdict["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
