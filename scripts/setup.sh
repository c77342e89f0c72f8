#!/usr/bin/env bash
# Create .venv/ at the repository root (reused on later runs) and install metakd-ray into it.
#   bash scripts/setup.sh            # then .venv/bin/metakd-ray ...
# TORCH_SPEC overrides the torch requirement and may add pip options (default: torch==2.13.0, the CPU wheel):
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.metakd-installed
want=$( (cat pyproject.toml scripts/setup.sh; echo "${TORCH_SPEC:-}") | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing into .venv (first run takes ~2 minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and pinned: an open range would pull a multi-GB CUDA build on CPU machines.
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options, e.g. --index-url
  .venv/bin/python -m pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
else
  echo "[setup] .venv is up to date"
fi
