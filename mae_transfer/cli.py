"""Shared CLI behaviour: user errors end as one clear line and a non-zero exit (traceback with --debug)."""
from __future__ import annotations

import sys
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
