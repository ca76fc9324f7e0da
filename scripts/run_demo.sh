#!/usr/bin/env bash
# README command (1): set up the environment (idempotent) and run the main demo job on built-in data.
# Extra arguments go to tools/demo.py (see `--help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${MAE_TRANSFER_VENV:-$ROOT/.venv}/bin/python" tools/demo.py "$@"
