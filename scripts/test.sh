#!/usr/bin/env bash
# The whole test suite: lint, types, then every test against real services.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy --strict"; .venv/bin/mypy
# The Debian packages (tests/test_debs.py checks them, lintian included).
echo "== debs"; bash scripts/build-debs.sh --no-lintian
echo "== pytest"; .venv/bin/pytest "$@"
