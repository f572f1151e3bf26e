r"""Right or loud on random models: the tally over many (issues 17, 25).

Draws random Keras models of the kinds users write (Sequential, functional,
nested, subclassed; Conv1D/2D, DepthwiseConv2D, Dense on rank 2-4, strides,
padding, dilation, bias or not, regularizers, shared layers, custom layers;
control flow, RNN cells, per-example maps, batch-dependent layers, masked
and cancelling losses; random B, J, s, J not dividing B included; see
`tests/random_models.py`) and checks one step with the one-pass estimator
(compiled or eager custom step, or `model.fit`) against the tape's
gradients of the whole loss and the estimate by definition. Prints how many
models were right (no fallback), loud (some variables taken from the loop,
with one warning naming them; numbers right), wrong (some number differs
without an error; must be 0) and crashed (the step or a reference raised an
error, e.g. the loop estimator at s = 1 on an RNN's loop, a known limit),
the fallback reasons by kind, and every wrong or crashed model's spec and
error.

    python3 scripts/one_pass_property.py --examples=1000 \
        --output=/tmp/one_pass_property.json

`--tally_of=/tmp/one_pass_property.json` prints the same tally, and how
many models had each block, loss and kind of step, from a file a run
wrote (a finished run's or one stopped early), checking no model.
"""

import collections
import json
import os
import re
import sys
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

flags.DEFINE_integer("examples", 1000, "Random models to check.")
flags.DEFINE_integer("seed", 500, "Hypothesis seed (the suite's subset "
                     "uses 17).")
flags.DEFINE_string("output", None, "Write every outcome as JSON here.")
flags.DEFINE_list("only", None, "Check only these of the seed's models, "
                  "by their index in the run (0-based; e.g. the ones a run "
                  "found crashed, after a fix).")
flags.DEFINE_string("tally_of", None, "Print the tally of the outcomes an "
                    "earlier run wrote (its --output) instead of a run.")
FLAGS = flags.FLAGS


def _reasons(warning):
    """The reasons a warning gives, without names and counts."""
    reasons = []
    for line in warning.splitlines():
        if "are not the sums" in line:
            reasons.append("a read variable's gradient is not the sum of "
                           "its per-example terms (the step's check)")
        elif line.startswith("  "):
            reason = re.sub(r"`[^`]*` \(\w+\)", "an op", line.split(": ", 1)[1])
            reason = re.sub(r"`[^`]*`", "an op", reason)
            reasons.append(re.sub(r"\b\d+\b", "N", reason.split(" (")[0]))
    return reasons


def _print_tally(records):
    """The outcomes, the fallback reasons, and the models reaching each
    block, loss and kind of step."""
    outcomes = collections.Counter(r["outcome"] for r in records)
    reasons, reached = collections.Counter(), collections.Counter()
    for record in records:
        if record["outcome"] == "loud":
            reasons.update(set(_reasons(record["details"])))
        spec = record["spec"]
        reached.update({block["block"] for block in spec["blocks"]})
        reached.update({f"loss {spec['loss']}", f"via {spec['via']}"
                        + (" (eager)" if spec.get("eager") else "")})
    print(f"\n{len(records)} random models (hypothesis seed {FLAGS.seed}): "
          f"{outcomes['right']} right, {outcomes['loud']} loud fallback "
          f"(numbers right, one warning), {outcomes['wrong']} wrong, "
          f"{outcomes['crashed']} crashed")
    print("Models whose warning gives each reason:")
    for reason, count in reasons.most_common():
        print(f"  {count:4d}  {reason}")
    print("Models with each block, loss and step:")
    for name, count in sorted(reached.items()):
        print(f"  {count:4d}  {name}")
    return outcomes


def main(argv):
    del argv
    if FLAGS.tally_of:
        with open(FLAGS.tally_of, encoding="utf-8") as f:
            written = json.load(f)
        FLAGS.seed = written["seed"]
        _print_tally(written["models"])
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import hypothesis
    import random_models

    specs = []

    @hypothesis.seed(FLAGS.seed)
    @hypothesis.settings(max_examples=FLAGS.examples, database=None,
                         deadline=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(random_models.model_specs())
    def collect(spec):
        specs.append(spec)

    collect()
    if FLAGS.only:
        specs = [specs[int(index)] for index in FLAGS.only]
    outcomes = collections.Counter()
    reasons = collections.Counter()
    records = []
    start = time.time()
    for index, spec in enumerate(specs):
        try:
            outcome, details = random_models.check(spec)
        except Exception as error:  # pylint: disable=broad-except
            # Loud, but not right: counted apart from silently wrong
            # numbers, with the error to tell a known limit from a bug.
            outcome = "crashed"
            details = f"{type(error).__name__}: {error}"[:2000]
        outcomes[outcome] += 1
        if outcome == "loud":
            reasons.update(set(_reasons(details)))
        if outcome in ("wrong", "crashed"):
            print(f"{outcome.upper()}: {details}\n  spec: {spec}", flush=True)
        records.append({"spec": spec, "outcome": outcome,
                        "details": details})
        if (index + 1) % 50 == 0:
            print(f"{index + 1} models: {dict(outcomes)} "
                  f"({time.time() - start:.0f} s)", flush=True)
            # Written as it goes: a run stopped early keeps its first
            # models' tally (the specs come in the seed's fixed order).
            _write(outcomes, reasons, records)
    _print_tally(records)
    _write(outcomes, reasons, records)
    return 1 if outcomes["wrong"] or outcomes["crashed"] else 0


def _write(outcomes, reasons, records):
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump({"seed": FLAGS.seed, "outcomes": dict(outcomes),
                       "reasons": dict(reasons), "models": records}, f,
                      indent=1)


if __name__ == "__main__":
    app.run(main)
