#!/usr/bin/env python
"""Run the benchmark of harnesses/benchmark.py and print its report; usage:

  python tools/benchmark.py --size base            # CPU, writes benchmarks/results.{md,json}
  python tools/benchmark.py --size base --only pretrain --rounds 10   # update one row
  python tools/benchmark.py --size base --device cuda --output-dir benchmarks/gpu/benchmark   # on a GPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harnesses import benchmark  # noqa: E402
from mae_transfer.cli import run_cli  # noqa: E402
from mae_transfer.io import check_output_dir  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"{__doc__}\n{benchmark.__doc__}", allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(benchmark.SIZES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only", default=",".join(benchmark.DEFAULT_TASKS),
                        help=f"comma-separated subset of {','.join(benchmark.PEERS)} "
                             "(pretrain_compiled: ~2 min of compiling)")
    parser.add_argument("--rounds", type=int, default=0,
                        help=f"ABBA rounds (ours, peer, peer, ours) per task; default {benchmark.DEFAULT_ROUNDS}")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"warm-up steps per side; default {benchmark.DEFAULT_WARMUP}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker; default: all cores")
    parser.add_argument("--output-dir", type=Path, default=benchmark.DEFAULT_OUTPUT_DIR,
                        help="folder for results.md and results.json (default: benchmarks/)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors (handled by run_cli)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_dir(args.output_dir)  # before minutes of measuring
    report = benchmark.run_benchmark(args.size, args.device, args.only.split(","), rounds=args.rounds,
                                     warmup=args.warmup, threads=args.threads, output_dir=args.output_dir)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
