#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the test peers and the Python
# environment, then runs ruff, mypy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-test-tools.sh
bash deploy/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy dicomnode pipelines model_store
.venv/bin/python -m pytest -q -rs "$@"
