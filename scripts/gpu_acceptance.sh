#!/usr/bin/env bash
# The first run on a CUDA GPU, in one command: measure the GPU paths (detection, segmentation, MAE pretraining,
# benchmark pairs, pytest -m cuda) and print one table, also written to --output-dir (default benchmarks/gpu/):
# results.md, results.json and one log per group of rows. Within 8 minutes on one H100 / H200.
#   bash scripts/gpu_acceptance.sh [--output-dir DIR] [--only ROWS] [--budget SECONDS] ...   (--help: what it measures)
# Exit status: 0 all rows ok, 1 some row failed, 2 no CUDA GPU (one `error:` line) or bad options.
#
# Which Python:
# - --kit DIR (or MAE_TRANSFER_KIT=DIR), the lent GPU machine of docs/GPU.md: the machine's own python3 (or
#   MAE_TRANSFER_PYTHON) as it is, no set-up and no network; the wheels of scripts/gpu_kit.sh in DIR are installed
#   offline into --site and put on PYTHONPATH. Add --rehearse to rehearse that run on a CPU machine.
# - MAE_TRANSFER_PYTHON=/path/to/python: that interpreter as it is (an environment managed elsewhere).
# - otherwise: scripts/setup_env.sh sets up .venv (Python 3.11, the pinned stack; needs the network), then .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kit="${MAE_TRANSFER_KIT:-}"
for arg in "$@"; do
  [[ "$arg" == "--kit" || "$arg" == --kit=* ]] && kit=yes
done
if [[ -n "$kit" ]]; then
  PY="${MAE_TRANSFER_PYTHON:-python3}"
elif [[ -n "${MAE_TRANSFER_PYTHON:-}" ]]; then
  PY="$MAE_TRANSFER_PYTHON"
else
  bash "$ROOT/scripts/setup_env.sh"
  PY="${MAE_TRANSFER_VENV:-$ROOT/.venv}/bin/python"
fi
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/tools/gpu_acceptance.py" "$@"
