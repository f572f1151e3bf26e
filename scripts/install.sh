#!/usr/bin/env bash
# Installs what clars-tf needs on a fresh Debian/Ubuntu machine without a GPU:
# the offline Fashion-MNIST files, TensorFlow (CPU wheel) and this package.
# Usage: bash scripts/install.sh [pip extras, e.g. test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

python3 -m pip install -q --upgrade pip
# tensorflow-cpu provides the `tensorflow` module without the GPU wheel; the
# package itself then goes in with --no-deps so pip does not fetch the full
# `tensorflow` distribution over it.
python3 -c "import tensorflow" 2>/dev/null \
  || python3 -m pip install -q "tensorflow-cpu==2.21.0"
python3 -m pip install -q "tensorflow-datasets>=4.9" "absl-py>=1.0" \
  "pyyaml>=6.0" "tensorboard>=2.16" "importlib_resources" "pytest>=7" \
  "matplotlib>=3.5"
python3 -m pip install -q --no-deps -e ".${extras:+[$extras]}"
