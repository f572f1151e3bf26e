#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
# Two worker processes (pytest-xdist): much of a test's time is single-
# threaded (tracing, starting a trainer process), so two keep both cores
# busy; `-n 1` or `-n 0` after the command overrides it. The 20 slowest
# tests are listed at the end.
exec "${CLARS_VENV:-.venv}/bin/python" -m pytest -q -n 2 --durations=20 \
  tests "$@"
