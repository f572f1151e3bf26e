#!/usr/bin/env bash
# Installs what clars-tf needs on a fresh Debian/Ubuntu machine without a GPU
# into a virtual environment, .venv/ in the repository (CLARS_VENV moves it):
# the offline Fashion-MNIST files, TensorFlow (CPU wheel) and this package.
# Usage: bash scripts/install.sh [test]   (test: also what the suite needs)
#
# Prints one line per stage; a stage's full output (apt, pip) is shown only
# when it fails, or always with CLARS_VERBOSE=1.
#
# A virtual environment works with every python3: Debian's own, which refuses
# `pip install` outside one (PEP 668), and pyenv, conda or venv interpreters.
# It sees the interpreter's site-packages (--system-site-packages), so a
# TensorFlow already installed for the machine (a TPU VM image, a GPU build)
# is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${CLARS_VENV:-.venv}"
python="${PYTHON:-python3}"
log=$(mktemp "${TMPDIR:-/tmp}/clars-install.XXXXXX")
trap 'rm -f "$log"' EXIT

# stage DESCRIPTION COMMAND...: runs COMMAND with its output kept aside.
stage() {
  local description=$1
  shift
  printf 'install: %s\n' "$description"
  if [ "${CLARS_VERBOSE:-0}" = 1 ]; then
    "$@"
  elif ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    printf 'install: failed while %s (output above; CLARS_VERBOSE=1 shows every stage)\n' \
      "$description" >&2
    exit 1
  fi
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
make_venv() {
  if ! "$python" -m venv --system-site-packages "$venv"; then
    # Debian and Ubuntu ship venv's ensurepip separately (python3.X-venv).
    rm -rf "$venv"
    local version
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    apt_install "python${version}-venv"
    "$python" -m venv --system-site-packages "$venv"
  fi
}
pip_install() {
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
install_packages() {
  pip_install --upgrade pip
  # tensorflow-cpu provides the `tensorflow` module without the GPU wheel;
  # the package itself then goes in with --no-deps so pip does not fetch the
  # full `tensorflow` distribution over it.
  "$venv/bin/python" -c "import tensorflow" 2>/dev/null \
    || pip_install "tensorflow-cpu==2.21.0"
  local packages=("tensorflow-datasets>=4.9" "absl-py>=1.0" "pyyaml>=6.0"
                  "tensorboard>=2.16" "importlib_resources")
  if [ "$extras" = test ]; then
    # jax and optax: tests/test_backends.py runs the optimizers on JAX too.
    packages+=("pytest>=7" "pytest-xdist>=3" "hypothesis>=6" "matplotlib>=3.5" "mkdocs>=1.6"
               "mkdocstrings[python]>=0.26" "jax[cpu]>=0.4.31" "optax>=0.2")
  fi
  pip_install "${packages[@]}"
  pip_install --no-deps -e .
}

if ! command -v "$python" >/dev/null; then
  echo "install: no Python interpreter '$python'; install python3 (>= 3.10) or set PYTHON=/path/to/python3" >&2
  exit 1
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  stage "data: Debian package dataset-fashion-mnist" apt_install dataset-fashion-mnist
else
  echo "install: data: Fashion-MNIST already in /usr/share/datasets/fashion-mnist"
fi
if [ ! -x "$venv/bin/python" ]; then
  stage "environment: $venv with $("$python" --version 2>&1)" make_venv
else
  echo "install: environment: $venv already exists"
fi
stage "packages: TensorFlow, tensorflow-datasets, absl-py${extras:+ and the $extras tools}, clars-tf" \
  install_packages
