"""Shared CLI behaviour: user errors end as one clear line and a non-zero exit (traceback with --debug)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from mae_transfer.errors import MaeTransferError

EXIT_USER_ERROR = 2


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a `MaeTransferError` (or a missing file) prints `error: <message>` and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        return int(main(argv) or 0)
    except (MaeTransferError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"error: {_one_message(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_message(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker (which wraps it in the worker's
    traceback), just the original message."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(("MaeTransferError", "FileNotFoundError")) else last


def setup_training_cli(args: argparse.Namespace) -> int:
    """Shared start of the training tools; returns the process rank (torchrun's RANK, else 0).

    `--resume key=value`: argparse gives the optional value of --resume the first override, so that value
    goes back to the overrides and --resume becomes bare. Logging: INFO on rank 0, warnings elsewhere.
    """
    if getattr(args, "resume", None) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s %(name)s{' r' + str(rank) if rank else ''}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    return rank
