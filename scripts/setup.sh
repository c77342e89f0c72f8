#!/usr/bin/env bash
# Create .venv/ at the repository root (reused on later runs) and install metakd-ray into it.
#   bash scripts/setup.sh            # then .venv/bin/metakd-ray ...
# TORCH_SPEC overrides the torch requirement (default: the CPU wheel torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.metakd-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing into .venv (first run takes ~2 minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and pinned: an open range would pull a multi-GB CUDA build on CPU machines.
  .venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
else
  echo "[setup] .venv is up to date"
fi
