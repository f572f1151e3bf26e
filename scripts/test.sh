#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
exec "${CLARS_VENV:-.venv}/bin/python" -m pytest -q tests "$@"
