#!/usr/bin/env python
"""The reference CPU study (configs/studies/cpu_reference.py): its data, the study, the pretraining evidence.

  python tools/reference_study.py      # under an hour on 2 quiet CPU cores; results in benchmarks/study_reference/
  python tools/reference_study.py --reread   # the committed results.csv through the current report: reread.md

Re-running skips what is done (finished cells, the pretraining, the data). Nothing else should run meanwhile:
the wall time it reports is part of the result.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mae_transfer.cli import run_cli, setup_long_run_cli  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--output-dir", default="work_dirs/reference_study",
                        help="the study's folder: cells, backbones, checkpoints (default: %(default)s)")
    parser.add_argument("--results-dir", default="benchmarks/study_reference",
                        help="where the result files are copied (default: %(default)s)")
    parser.add_argument("--reread", action="store_true",
                        help="write RESULTS_DIR/reread.md from its results.csv with the current report; run nothing")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors (handled by run_cli)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_long_run_cli()
    from harnesses.reference_study import DATA, reread, run
    from mae_transfer.paths import resolve_path

    if args.reread:
        print(f"written: {reread(resolve_path(args.results_dir))}")
        return 0
    summary = run(resolve_path(args.output_dir), resolve_path(args.results_dir), DATA)
    print(f"{summary['cells']} cells in {summary['seconds'] / 60:.0f} min; results: {summary['results']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
