#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, mypy, the whole test suite, then the
# bounded sanitizer job (scripts/sanitize.sh --quick, about a minute) unless pytest arguments
# were given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:/usr/bin:$PATH"
ruff check src tests
mypy
pytest -q "$@"
if (($# == 0)); then
    bash scripts/sanitize.sh --quick
fi
