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
# other torch requirement would pull a multi-GB CUDA build. TORCH_INDEX_URL picks the
# build (README "torch on a CPU-only or a GPU site"): a CPU-only site
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash deploy/install.sh
# a GPU site the default PyPI wheel (unset) or its CUDA version's index.
.venv/bin/python -m pip install --quiet "torch==2.13.0" \
  ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install --quiet -e ".[dev]"
# pyradiomics 3.0.1 has no wheel for Python 3.11 and its build needs numpy at build time.
if ! .venv/bin/python -c "import radiomics" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet --no-cache-dir setuptools wheel versioneer
  .venv/bin/python -m pip install --quiet --no-cache-dir --no-build-isolation pyradiomics==3.0.1
fi
echo "dicomnode installed in $(pwd)/.venv"
