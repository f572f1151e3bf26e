#!/usr/bin/env bash
# Installs what clars-tf needs on a fresh Debian/Ubuntu machine without a GPU
# into a virtual environment, .venv/ in the repository (CLARS_VENV moves it):
# the offline Fashion-MNIST files, TensorFlow (CPU wheel) and this package
# with the dependencies setup.py declares.
# Usage: bash scripts/install.sh [test]   (test: also the suite's extras)
#
# Prints one line per stage; a stage's full output (apt, pip) is shown only
# when it fails, or always with CLARS_VERBOSE=1.
#
# A virtual environment works with every python3: Debian's own, which refuses
# `pip install` outside one (PEP 668), and pyenv, conda or venv interpreters.
# It does not see the interpreter's other site-packages, so what the project
# imports is what this script installed, as on a fresh machine. The one
# exception is a TensorFlow the interpreter already has (a TPU VM image, a
# GPU build): that distribution alone is linked into the environment and its
# declared requirements are installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${CLARS_VENV:-.venv}"
python="${PYTHON:-python3}"
tensorflow_pin="tensorflow-cpu==2.21.0"
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
  rm -rf "$venv"
  if ! "$python" -m venv "$venv"; then
    # Debian and Ubuntu ship venv's ensurepip separately (python3.X-venv).
    rm -rf "$venv"
    local version
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    apt_install "python${version}-venv"
    "$python" -m venv "$venv"
  fi
}
# An environment made by an earlier version of this script saw the whole
# system's site-packages; it is made anew rather than trusted.
sees_system_packages() {
  grep -qiE '^include-system-site-packages *= *true' "$venv/pyvenv.cfg" 2>/dev/null
}
pip_install() {
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
# Links the interpreter's own TensorFlow distribution (its packages and its
# .dist-info, nothing else) into the environment, then installs the
# requirements that distribution declares.
link_system_tensorflow() {
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$python" - "$site" <<'PY' > "$log.requirements"
import importlib.metadata as metadata
import os
import sys

site = sys.argv[1]
names = metadata.packages_distributions()["tensorflow"]
distribution = metadata.distribution(names[0])
top_level = {str(file).split("/")[0] for file in distribution.files}
for name in sorted(top_level):
    source = os.path.join(str(distribution.locate_file("")), name)
    if not name.endswith(".pth") and os.path.exists(source):
        target = os.path.join(site, name)
        if not os.path.lexists(target):
            os.symlink(source, target)
for requirement in distribution.requires or []:
    if "extra ==" not in requirement:
        print(requirement)
PY
  local requirements=()
  mapfile -t requirements < "$log.requirements"
  rm -f "$log.requirements"
  if [ "${#requirements[@]}" -gt 0 ]; then pip_install "${requirements[@]}"; fi
}
install_packages() {
  pip_install --upgrade pip setuptools wheel
  if ! "$venv/bin/python" -c "import tensorflow" 2>/dev/null; then
    # tensorflow-cpu provides the `tensorflow` module without the GPU wheel;
    # setup.py leaves TensorFlow to its extras so pip keeps this build.
    pip_install "$tensorflow_pin"
  fi
  pip_install -e ".${extras:+[$extras]}"
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
if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv" 2>/dev/null)" ] \
    && [ ! -x "$venv/bin/python" ]; then
  echo "install: $venv exists and is not a virtual environment; move it away or set CLARS_VENV=/another/path" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ] || sees_system_packages; then
  stage "environment: $venv with $("$python" --version 2>&1), no system site-packages" make_venv
  if "$python" -c "import tensorflow" >/dev/null 2>&1; then
    stage "environment: linking the TensorFlow that $python already has" \
      link_system_tensorflow
  fi
else
  echo "install: environment: $venv already exists"
fi
stage "packages: TensorFlow, clars-tf and its dependencies${extras:+ with the [$extras] extras}" \
  install_packages
