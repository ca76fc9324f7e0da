#!/usr/bin/env python
"""The reference CPU study (configs/studies/cpu_reference.py): its data, the study, its replication and its pilot.

  python tools/reference_study.py                # under an hour on 2 quiet CPU cores; benchmarks/study_reference/
  python tools/reference_study.py --replicate 8  # the declared contrasts, 8 fresh seeds: .../replication/
  python tools/reference_study.py --replicate 8 --first-seed 12  # 8 more, after seeds 0-11:
                                                 # .../replication_from_seed12/
  python tools/reference_study.py --pilot        # the schedule pilot (cpu_reference_pilot.py): .../pilot/
  python tools/reference_study.py --reread       # the first study's results.csv (v1/) through the current report

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
from mae_transfer.errors import MaeTransferError  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--output-dir", help="the study's folder: cells, backbones, checkpoints (default: "
                        "work_dirs/reference_study, --pilot: work_dirs/reference_pilot)")
    parser.add_argument("--results-dir", help="where the result files are copied (default: benchmarks/study_reference, "
                        "its pilot/ with --pilot, its replication/ with --replicate, its v1/ with --reread)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--replicate", type=int, metavar="N",
                      help="after the study: its declared contrasts again with N fresh fine-tuning seeds")
    mode.add_argument("--pilot", action="store_true", help="the schedule pilot instead of the study")
    mode.add_argument("--reread", action="store_true",
                      help="write RESULTS_DIR/reread.md from the first study's results.csv with the current report; "
                      "run nothing")
    parser.add_argument("--first-seed", type=int, metavar="S",
                        help="--replicate: start the fresh seeds at S (above every seed used so far, e.g. by an "
                        "earlier replication) into replication_from_seedS/")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="N pretraining runs or cells at a time, local submitit jobs of 1 thread each "
                        "(default: %(default)s, in this process)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors (handled by run_cli)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parallel < 1:
        raise MaeTransferError(f"--parallel must be at least 1, got {args.parallel}")
    setup_long_run_cli()
    from harnesses.reference_study import DATA, PILOT_SPEC, SPEC, reread, run
    from mae_transfer.paths import resolve_path
    from mae_transfer.study.claims import check_first_seed, replication_folder

    check_first_seed(args.replicate, args.first_seed)

    sub = ("v1" if args.reread else "pilot" if args.pilot
           else replication_folder(args.first_seed) if args.replicate is not None else "")
    results_dir = resolve_path(args.results_dir or f"benchmarks/study_reference/{sub}")
    if args.reread:
        print(f"written: {reread(results_dir)}")
        return 0
    output_dir = resolve_path(args.output_dir or f"work_dirs/reference_{'pilot' if args.pilot else 'study'}")
    summary = run(output_dir, results_dir, DATA, PILOT_SPEC if args.pilot else SPEC, args.replicate,
                  args.parallel, args.first_seed)
    print(f"{summary['cells']} cells in {summary['seconds'] / 60:.0f} min; results: {summary['results']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
