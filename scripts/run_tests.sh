#!/usr/bin/env bash
# README command (2): set up the environment (idempotent) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k checkpoint`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "${MAE_TRANSFER_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
