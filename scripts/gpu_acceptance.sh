#!/usr/bin/env bash
# The first run on a CUDA GPU, in one command: set up the environment (idempotent), then measure the GPU
# paths (detection, segmentation, MAE pretraining, benchmark pairs, pytest -m cuda) and print one table,
# also written to benchmarks/gpu/results.{md,json}. About 10 minutes on one A100 / H100 / H200.
#   bash scripts/gpu_acceptance.sh [--out DIR] [--only ROWS] [--budget SECONDS] ...   (--help: what it measures)
# Exit status: 0 all rows ok, 1 some row failed, 2 no CUDA GPU (one `error:` line) or bad options.
# MAE_TRANSFER_PYTHON=/path/to/python: use that interpreter as it is (an environment managed elsewhere)
# instead of setting up and using .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${MAE_TRANSFER_PYTHON:-}" ]]; then
  PY="$MAE_TRANSFER_PYTHON"
else
  bash "$ROOT/scripts/setup_env.sh"
  PY="${MAE_TRANSFER_VENV:-$ROOT/.venv}/bin/python"
fi
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1
exec "$PY" "$ROOT/tools/gpu_acceptance.py" "$@"
