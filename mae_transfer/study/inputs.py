"""A study's inputs, checked before its first cell runs or is submitted: one error lists every problem.

Each task kind's own check (its data and config) is the `input_check` callable of its record
(mae_transfer/task_kinds.py); the pieces they share are in mae_transfer/input_checks.py.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae_transfer.checkpoint import read_checkpoint
from mae_transfer.checkpoint.hub import is_hub_name, resolve_hub_name
from mae_transfer.cluster import parse_tool_args
from mae_transfer.config import load_config
from mae_transfer.errors import MaeTransferError, PickledCheckpointError
from mae_transfer.input_checks import Check, check_file, check_folder, each_override, plain_override
from mae_transfer.paths import REPO_ROOT
from mae_transfer.pretraining import resolve_config
from mae_transfer.study.spec import (
    Cell,
    Study,
    backbone_commands,
    cell_command,
    pretrain_data,
    pretrain_group,
    pretrain_run,
)
from mae_transfer.task_kinds import TOOLS


def check_inputs(study: Study, cells: list[Cell], executor: str | None = None) -> None:
    """Every input the `cells` need, checked before the first of them runs or is submitted; one error lists every
    problem (one line each), so a spec is fixed in one go instead of one failed job after another.

    Checked: the interpreter (and, run here without an executor, each task's launcher); per backbone its checkpoint
    (present; a pickled one only with --allow-pickle) or its pretraining (config with its overrides, data); per task
    its tool's arguments (the tool's own parser), its config with the cell's overrides (keys must exist: detectron2
    LazyConfig, mmengine config, our plain config) and its data (its task kind's `input_check`). Data are checked for
    existence (and, for segmentation, the tool's own sampled label check), not read in full."""
    problems = input_problems(study, cells, executor)
    if problems:
        action = "nothing was submitted" if executor else "no cell was run"
        if len(problems) == 1:  # one problem: the error line itself says it
            raise MaeTransferError(f"study {study.name} ({action}): {problems[0]}")
        raise MaeTransferError(f"study {study.name}: {len(problems)} problem(s) with its inputs, {action}:\n"
                               + "\n".join(f"  - {p}" for p in problems))


def input_problems(study: Study, cells: list[Cell], executor: str | None = None) -> list[str]:
    """What `check_inputs` reports: one line per problem, naming the backbone or task and the input."""
    problems: list[str] = []
    if not cells:
        return problems

    def checker(owner: str) -> Check:
        def check(what: str | None, fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return fn(*args)
            except (MaeTransferError, FileNotFoundError) as err:
                problems.append(f"{owner}: {what + ': ' if what else ''}{err}")
                return None
        return check

    tasks = list(dict.fromkeys(c.task for c in cells))
    launchers = [] if executor else [study.tasks[t]["launcher"][0] for t in tasks if study.tasks[t]["launcher"]]
    for program in dict.fromkeys([study.python, *launchers]):
        if shutil.which(program) is None:
            problems.append(f"program not found: {program} (the spec's python, or a task's launcher)")
    runs: dict[str, list[str]] = {}  # a pretraining run -> the backbones that wait for it (checked once)
    for name in dict.fromkeys(c.backbone for c in cells):
        ckpt, commands = backbone_commands(study, name)
        if commands:
            runs.setdefault(pretrain_group(study.backbones, name)[0], []).append(name)
        elif ckpt is not None:  # a file, or a pretraining already exported
            checker(f"backbone {name!r}")(None, _checkpoint_file, ckpt, study.allow_pickle)
    for owner, names in runs.items():
        who = (f"backbone {names[0]!r}" if len(names) == 1 else
               f"backbones {', '.join(map(repr, names))} (one pretraining run)")
        _check_pretraining(study, owner, checker(who))
    for task in tasks:
        cell = next(c for c in cells if c.task == task)  # cells of a task differ in values only, not in keys
        check = checker(f"task {task!r}")
        tool, tool_args = cell_command(study, cell, None, resume=False)
        input_check = study.kind(task).input_check
        with contextlib.chdir(REPO_ROOT):  # where the tools run: relative data paths mean what they mean to them
            args = check(f"{TOOLS[tool].script} arguments", _parse_tool_args, tool, tool_args)
            if args is not None and input_check is not None:
                input_check(args, check)
    return problems


def _parse_tool_args(tool: str, args: list[str]) -> Any:
    """The tool's own parser on the cell's arguments; its usage error as a MaeTransferError (argparse would print
    it and exit)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_tool_args(tool, args)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise MaeTransferError(lines[-1].split(" error: ", 1)[-1] if lines else "invalid arguments") from None


def _checkpoint_file(path: str, allow_pickle: bool) -> None:
    """Present, and readable without the unpickler unless --allow-pickle."""
    if is_hub_name(path):  # timm:/hf-hub: names: in huggingface_hub's cache, or downloadable (checkpoint.hub)
        path = str(resolve_hub_name(path))
    check_file(path, "checkpoint")
    try:
        read_checkpoint(path, allow_pickle)
    except PickledCheckpointError:
        raise
    except MaeTransferError:
        pass  # other problems (format, shapes) are each cell's tool's to report, in the cell's log


def _check_pretraining(study: Study, name: str, check: Check) -> None:
    """The inputs of the pretraining run of backbone `name` (its config with the run's overrides, its data)."""
    pre = study.backbones[name]["pretrain"]
    what = f"pretraining config {Path(pre['config']).name}"
    cfg = check(what, load_config, pre["config"])
    if cfg is not None:
        cfg = each_override(check, what, plain_override, cfg, pre["opts"])
        check(what, resolve_config,
              {**cfg, "data_path": pretrain_data(study, pre), "output_dir": str(pretrain_run(study, name))})
    if pre.get("crops"):
        check(None, check_file, pre["crops"]["json"], "pretraining crops: annotation file")
        check(None, check_folder, pre["crops"]["images"], "pretraining crops: image folder")
    else:
        check(None, check_folder, pre["data"], "pretraining image folder")











