#!/usr/bin/env bash
# Installs what clars-tf needs on a fresh Debian/Ubuntu machine without a GPU
# into a virtual environment, .venv/ in the repository (CLARS_VENV moves it):
# the offline Fashion-MNIST files, TensorFlow (CPU wheel) and this package.
# Usage: bash scripts/install.sh [pip extras, e.g. test]
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

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist
fi

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv --system-site-packages "$venv" 2>/dev/null; then
    # Debian and Ubuntu ship venv's ensurepip separately (python3.X-venv).
    rm -rf "$venv"
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    apt_install "python${version}-venv"
    "$python" -m venv --system-site-packages "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)

"${pip[@]}" --upgrade pip
# tensorflow-cpu provides the `tensorflow` module without the GPU wheel; the
# package itself then goes in with --no-deps so pip does not fetch the full
# `tensorflow` distribution over it.
"$venv/bin/python" -c "import tensorflow" 2>/dev/null \
  || "${pip[@]}" "tensorflow-cpu==2.21.0"
"${pip[@]}" "tensorflow-datasets>=4.9" "absl-py>=1.0" \
  "pyyaml>=6.0" "tensorboard>=2.16" "importlib_resources" "pytest>=7" \
  "matplotlib>=3.5"
"${pip[@]}" --no-deps -e ".${extras:+[$extras]}"
