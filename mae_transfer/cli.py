"""Shared CLI behaviour: user errors end as one clear line and a non-zero exit (traceback with --debug)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from backbones.errors import BackboneError
from mae_transfer.errors import MaeTransferError
from mae_transfer.io import check_output_dir

EXIT_USER_ERROR = 2


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a user error (or a missing file) prints `error: <message>` and exits 2.

    User errors: `MaeTransferError` and the backbones' `BackboneError`, which is its base class.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        return int(main(argv) or 0)
    except (BackboneError, FileNotFoundError) as err:  # BackboneError includes MaeTransferError
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
    user_error = last.split(": ", 1)[0].endswith(("MaeTransferError", "BackboneError", "FileNotFoundError"))
    return last.split(": ", 1)[1] if user_error else last


def setup_training_cli(args: argparse.Namespace) -> int:
    """Shared start of the training tools (after `finish_args`); returns the process rank (torchrun's RANK,
    else 0). Logging: INFO on rank 0, warnings elsewhere."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s %(name)s{' r' + str(rank) if rank else ''}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    return rank


def setup_long_run_cli() -> None:
    """Shared start of the tools that drive other tools (study runs): INFO logging with times, and `kill`
    (SIGTERM) stopping like Ctrl-C, so the running tool is ended and the tables are written."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


# ------------------------------------------------------------------------------------------- shared flags
def default_argument_parser(description: str, config_help: str = "config file", *, resume: bool = True,
                            eval_only: bool = True, allow_pickle: bool = True,
                            backbone: str | None = None) -> argparse.ArgumentParser:
    """The vocabulary every tool shares (detectron2's `default_argument_parser` idea): `--config`,
    `--output-dir`, `--resume [CKPT]`, `--eval-only [CKPT]`, `--allow-pickle`, `--debug`, and for the fine-tuning
    tools `--backbone NAME` (`backbone`: how the tool itself spells it; `take_backbone` moves the value there).
    Each tool adds its own flags and keeps its framework's override style (`key=value` positionals, or mmengine's
    `--cfg-options`).

    `--resume` / `--eval-only` without a value mean "the output folder's last checkpoint" ("auto").
    Call `finish_args(args)` after parsing: a `key=value` that argparse took as the optional value goes back
    to the overrides.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--config", help=config_help)
    p.add_argument("--output-dir", help="output folder: checkpoints, logs, TensorBoard scalars, eval_metrics.json")
    if resume:
        p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="continue training: from CKPT, or (no value) from the output folder's last checkpoint")
    if eval_only:
        p.add_argument("--eval-only", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="evaluate CKPT (no value: the output folder's last checkpoint) and exit")
    if allow_pickle:
        p.add_argument("--allow-pickle", action="store_true",
                       help="trust the checkpoints given: let them hold pickled Python objects (unsafe otherwise)")
    if backbone:
        p.add_argument("--backbone", metavar="NAME", help="pretrained backbone: a file in any format the importer "
                       f"reads, or timm:<model> / hf-hub:<repo> (the same as {backbone})")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors (handled by run_cli)")
    return p


def take_backbone(args: argparse.Namespace, flag: str | None, overrides: str, key: str) -> None:
    """`--backbone NAME` into the tool's own spelling: the attribute of `flag` (e.g. `--init-checkpoint`), or, with
    no flag, the override `key=NAME` added to `args.<overrides>`. Naming the weights twice is one error line."""
    name = getattr(args, "backbone", None)
    if name is None:
        return
    dest = flag.lstrip("-").replace("-", "_") if flag else None  # argparse's attribute of the flag
    given = [f"{key}=" for o in getattr(args, overrides) if o.split("=", 1)[0] == key]
    if dest and getattr(args, dest, None) is not None:
        given.append(flag)
    if given:
        raise MaeTransferError(f"--backbone and {given[0]} both name the backbone weights: give one of them")
    if dest:
        setattr(args, dest, name)
    else:
        getattr(args, overrides).append(f"{key}={name}")


def finish_args(args: argparse.Namespace, overrides: str = "overrides") -> argparse.Namespace:
    """`--resume key=value` / `--eval-only key=value`: argparse gives the optional value the first override;
    such a value (with '=', not an existing file) goes back to the front of `args.<overrides>`. An --output-dir
    that names an existing file is one error line here, before anything runs."""
    for flag in ("eval_only", "resume"):
        value = getattr(args, flag, None)
        if isinstance(value, str) and "=" in value and not Path(value).exists():
            getattr(args, overrides).insert(0, value)
            setattr(args, flag, "auto")
    if getattr(args, "output_dir", None):
        check_output_dir(args.output_dir)
    return args
