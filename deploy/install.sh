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
# torch first and pinned: 2.13.0 is the CPU wheel on this machine kind's local disk; any
# other torch requirement would pull a multi-GB CUDA build. Sites with GPUs may install a
# CUDA build of the same version instead.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# pyradiomics 3.0.1 has no wheel for Python 3.11 and its build needs numpy at build time.
if ! .venv/bin/python -c "import radiomics" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet --no-cache-dir setuptools wheel versioneer
  .venv/bin/python -m pip install --quiet --no-cache-dir --no-build-isolation pyradiomics==3.0.1
fi
echo "dicomnode installed in $(pwd)/.venv"
