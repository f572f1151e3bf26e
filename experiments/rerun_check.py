r"""Reruns an archived study run and says whether it came out bit-identical.

    python3 -m experiments.rerun_check \
        experiments/gate_results/runs/pilot/sigmoid_mlp/b2048/sgd_nowarmup/lr0.00884_w0_e5_s1

Runs the run's own command (from its run.json) into a fresh model dir under
`--work_dir` with the run's thread count, then compares every per-epoch
number of the new results.json (losses, accuracies, steps; all but the
images/s and seconds, timings) with the archived one for exact equality. Paired seeds
are exactly paired only when this holds (`train.deterministic=true`).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

from experiments import runs as runs_lib


def _numbers(epochs):
    """Per-epoch entries without the wall-clock throughput and timings."""
    return [{k: v for k, v in entry.items()
             if k not in ("images_per_second", "seconds")}
            for entry in epochs or []]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archived_run", help="a directory holding run.json")
    parser.add_argument("--work_dir", default=None,
                        help="where the rerun goes (default: a temp dir)")
    args = parser.parse_args(argv)
    archived = runs_lib.Outcome(args.archived_run)
    if archived.status != "done":
        sys.exit(f"{args.archived_run}: status {archived.status!r}; only a "
                 "finished run can be compared.")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="rerun_check_")
    threads = archived.record["attempts"][-1].get("threads")
    spec = dict(archived.record, run_id="rerun")
    run = runs_lib.Run(spec, work_dir, os.path.join(work_dir, "archive"),
                       threads=threads if isinstance(threads, int) else 0)
    os.chdir(runs_lib.REPO_ROOT)
    status, seconds = run.execute()
    rerun = runs_lib.Outcome(run.archive)
    before, after = (_numbers(archived.results.get("epochs")),
                     _numbers(rerun.results.get("epochs")))
    identical = status == "done" and before == after
    print(json.dumps({"run": archived.run_id, "rerun_status": status,
                      "seconds": round(seconds), "identical": identical,
                      "archived_last_epoch": before[-1],
                      "rerun_last_epoch": (after or [None])[-1]}, indent=1))
    if not args.work_dir:
        shutil.rmtree(work_dir)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
