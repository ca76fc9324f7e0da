#!/usr/bin/env python
"""Run a transfer study: backbones x tasks x freeze_blocks x seeds through the real detectron2 / mmseg tools.

  python tools/study.py --spec configs/studies/cpu_shared_data.py [--output-dir DIR] [--dry-run]
  python tools/study.py --spec SPEC --output-dir DIR --executor slurm   # jobs; rerun it to collect (README)
  python tools/study.py --spec SPEC --replicate 4   # the declared contrasts again, 4 fresh seeds (OUTPUT/replication)

Finished cells are skipped on a re-run, interrupted ones resume; results.csv, results.md and plot.png
are rewritten in the output folder after every cell (see mae_transfer/study/__init__.py for the spec format).
User errors print one line and exit 2; Ctrl-C or `kill` (SIGTERM) stops the running cell's tool and exits
130 with every finished cell and the tables kept; the next run resumes.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mae_transfer.cli import run_cli, setup_long_run_cli  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MAE-paper style transfer study (partial fine-tuning)",
                                     allow_abbrev=False)
    parser.add_argument("--spec", required=True, help="study spec, e.g. configs/studies/cpu_shared_data.py")
    parser.add_argument("--output-dir", dest="output",
                        help="output folder (default: the spec's output_dir or work_dirs/studies/NAME)")
    parser.add_argument("--allow-pickle", action="store_true", help="trust the backbone checkpoints: let them hold "
                        "pickled Python objects (passed to every cell)")
    parser.add_argument("--dry-run", action="store_true", help="check every input as a run does, then print the cells "
                        "and the commands still to run; runs and submits nothing")
    parser.add_argument("--executor", choices=["local", "slurm"],
                        help="run every cell as a submitit job (Slurm, or local processes); default: in this process")
    parser.add_argument("--max-parallel", type=int, metavar="N",
                        help="--executor: jobs in flight at most (default: slurm no limit, local 1)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="--executor: resources of "
                        "every job, over the spec's slurm=dict(...), e.g. partition=gpu time=72:00:00 (repeatable)")
    parser.add_argument("--retry-failed", action="store_true", help="--executor: resubmit every job that had failed "
                        "(each once, as --max-parallel allows; one failing again is reported)")
    parser.add_argument("--wait", action="store_true", help="--executor: stay until no job is in flight")
    parser.add_argument("--poll", type=float, metavar="SECONDS",
                        help="--wait: time between checks (default: local 2, slurm 60)")
    parser.add_argument("--target-effect", type=float, metavar="X", help="results.md: for each declared contrast, "
                        "the fine-tuning seeds needed to detect a difference of X with 80%% power")
    parser.add_argument("--replicate", type=int, metavar="N", help="re-run the declared contrasts' cells with N "
                        "fresh fine-tuning seeds into OUTPUT/replication and write its replication table")
    parser.add_argument("--first-seed", type=int, metavar="S", help="--replicate: start the fresh seeds at S (above "
                        "every seed used so far, e.g. by an earlier replication) into OUTPUT/replication_from_seedS")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors (handled by run_cli)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_long_run_cli()
    from mae_transfer.io import check_output_dir
    from mae_transfer.study.cluster import check_job_options, check_job_resources, parse_overrides
    from mae_transfer.study.run import dry_run, run_study
    from mae_transfer.study.spec import load_study

    overrides = parse_overrides(args.slurm)
    check_job_options(args.executor, args.max_parallel, args.poll, args.retry_failed, args.wait, overrides)
    study = load_study(args.spec, args.output, args.allow_pickle)
    check_output_dir(study.output_dir, "--output-dir" if args.output else "the spec's output folder")
    from mae_transfer.study.claims import check_first_seed, check_target_effect, replication_study

    study.target_effect = check_target_effect(study, args.target_effect)
    original = study
    check_first_seed(args.replicate, args.first_seed)
    if args.replicate is not None:
        study = replication_study(original, args.replicate, args.first_seed)
    if args.executor:
        check_job_resources(study, args.executor, overrides)
    if args.dry_run:
        print(dry_run(study, args.executor))
        return 0
    if args.executor:
        from mae_transfer.study.cluster import run_study_jobs

        result = run_study_jobs(study, args.executor, args.max_parallel, args.retry_failed, args.wait, args.poll,
                                overrides)
        print(f"{Path(result['results']).read_text()}\n{result['status']}")
        print_replication(original, study)
        return 0
    result = run_study(study)
    print(Path(result["results"]).read_text())
    print(f"ran {len(result['ran'])} cell(s), skipped {len(result['skipped'])} finished; "
          f"outputs: {study.output_dir}/results.csv, results.md, plot.png")
    print_replication(original, study)
    return 0


def print_replication(original, study) -> None:
    """--replicate: the replication table from whatever has finished (written, then printed)."""
    if study is not original:
        from mae_transfer.study.claims import write_replication

        table = write_replication(original, study)
        print(f"{table['md'].read_text()}\nreplication table: {table['md']}, {table['csv']}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
