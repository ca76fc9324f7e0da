"""The pieces every task kind's input check shares (mae_transfer/task_kinds.py: `TaskKind.input_check`): a study
checks a cell's data and config before anything runs, collecting every problem rather than stopping at the first.

An input check is `check_x_task(args, check)`: `args` the tool's parsed arguments, `check(what, fn, *args)` runs
`fn(*args)` and returns its result, or None with the error kept as one problem line (`what` names the input).
Framework-free: the checks that need detectron2 / mmseg live in their packages.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae_transfer.config import apply_overrides
from mae_transfer.errors import MaeTransferError
from mae_transfer.paths import REPO_ROOT

__all__ = ["Check", "check_file", "check_folder", "each_override", "plain_override", "raise_problem", "tool_path"]

Check = Callable[..., Any]  # check(what | None, fn, *args): fn(*args), or None with the error kept as a problem


def tool_path(path: str | os.PathLike) -> Path:
    """A path as a cell's tool sees it: tools run in the repository root (`run_logged`, `CellJob`)."""
    return REPO_ROOT / Path(os.path.expanduser(str(path)))


def check_folder(path: str | os.PathLike, what: str) -> None:
    if not Path(path).is_dir():
        raise MaeTransferError(f"{what} not found: {path}" if not Path(path).exists() else
                               f"{what} is not a directory: {path}")


def check_file(path: str | os.PathLike, what: str) -> None:
    if not Path(path).is_file():
        raise MaeTransferError(f"{what} not found: {path}")


def each_override(check: Check, what: str, apply: Callable[[Any, str], Any], cfg: Any, overrides: list[str]) -> Any:
    """Apply the overrides one at a time, so that every unknown key is reported, not just the first, and the data
    checks still see the valid ones (e.g. a data root); returns the config with the valid overrides applied."""
    for item in overrides:
        changed = check(what, apply, cfg, item)
        cfg = cfg if changed is None else changed
    return cfg


def plain_override(cfg: dict[str, Any], item: str) -> dict[str, Any]:
    return apply_overrides(cfg, [item])


def raise_problem(message: str) -> None:
    raise MaeTransferError(message)

