"""A quiet start for the trainer: TensorFlow's INFO lines only on request.

Imports nothing but the standard library, so the `clars-train` command can
load this file before `clars_tf` (whose import brings in TensorFlow).
TensorFlow reads TF_CPP_MIN_LOG_LEVEL once, when it is first imported, and
two of its start-up lines ignore it (absl writes to stderr until it is
initialised): both are handled here.
"""

import contextlib
import os
import re
import sys
import tempfile

_STARTUP_NOISE = re.compile(
    r"I\d{4} |WARNING: All log messages before absl::InitializeLog")


def verbosity_requested(argv):
    """Whether the command line sets absl's --verbosity (or -v)."""
    return any(arg in ("-v", "--verbosity") or
               arg.startswith(("-v=", "--verbosity="))
               for arg in argv[1:])


@contextlib.contextmanager
def quiet_tensorflow_import(argv):
    """Hides TensorFlow's C++ INFO lines unless `argv` asks for them.

    Wrap the first import of TensorFlow. Every other line that import
    writes to stderr (warnings, errors) is passed on.
    """
    if verbosity_requested(argv):
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not _STARTUP_NOISE.match(line):
                    print(line, file=sys.stderr)
