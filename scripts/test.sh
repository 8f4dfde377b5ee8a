#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, mypy, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:/usr/bin:$PATH"
ruff check src tests
mypy
pytest -q "$@"
