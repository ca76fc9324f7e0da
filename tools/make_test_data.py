#!/usr/bin/env python
"""Write tests/data, the in-repository test data, from ../shared/data (harnesses/make_test_data.py says what).

  python tools/make_test_data.py [--shared ../shared/data] [--output-dir tests/data]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mae_transfer.cli import run_cli  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder (default: %(default)s)")
    parser.add_argument("--output-dir", default="tests/data", help="where the subsets go (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors (handled by run_cli)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from harnesses.make_test_data import make_test_data
    from mae_transfer.paths import resolve_path

    for name, counts in make_test_data(resolve_path(args.shared), resolve_path(args.output_dir)).items():
        print(name, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
