#!/usr/bin/env bash
# Creates .venv and installs muse_lm with the pinned versions of requirements/*.lock:
# the GPU lock where an NVIDIA driver is present, the CPU lock elsewhere.
# Usage: bash scripts/setup.sh   (idempotent: a second run only re-checks the pins)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  lock=requirements/gpu.lock
else
  lock=requirements/cpu.lock
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$lock" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
echo "muse_lm installed in .venv from $lock" >&2
