#!/usr/bin/env bash
# The main job on embedded defaults: local services, boards, provisioning, status.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m harness.demo "$@"
