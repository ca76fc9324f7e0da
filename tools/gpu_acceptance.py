#!/usr/bin/env python
"""GPU acceptance run (see harnesses/gpu_acceptance.py); run it through scripts/gpu_acceptance.sh."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harnesses.gpu_acceptance import main  # noqa: E402
from mae_transfer.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
