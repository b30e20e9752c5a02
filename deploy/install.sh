#!/usr/bin/env bash
# Creates (or updates) the Python environment at .venv in the repository root and
# installs dicomnode into it. Needs only Python 3.11 and pip; no external service.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "dicomnode installed in $(pwd)/.venv"
