"""A study's inputs, checked before its first cell runs or is submitted: one error lists every problem.

The per-kind checks (`check_det_task`, ...) are named by the task kinds' `input_check` (mae_transfer/task_kinds.py);
they import their framework when called.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae_transfer.checkpoint import read_checkpoint
from mae_transfer.checkpoint.hub import is_hub_name, resolve_hub_name
from mae_transfer.config import apply_overrides, load_config
from mae_transfer.errors import MaeTransferError, PickledCheckpointError
from mae_transfer.paths import REPO_ROOT
from mae_transfer.study_spec import (
    Cell,
    Study,
    _pretrain_data,
    backbone_commands,
    cell_command,
    pretrain_group,
    pretrain_run,
)
from mae_transfer.task_kinds import TOOLS

Check = Callable[..., Any]  # check(what | None, fn, *args): fn(*args), or None with the error kept as a problem


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
        input_check = study.kind(task).input_checker()
        with contextlib.chdir(REPO_ROOT):  # where the tools run: relative data paths mean what they mean to them
            args = check(f"{TOOLS[tool].script} arguments", _parse_tool_args, tool, tool_args)
            if args is not None and input_check is not None:
                input_check(args, check)
    return problems


def _parse_tool_args(tool: str, args: list[str]) -> Any:
    """The tool's own parser on the cell's arguments; its usage error as a MaeTransferError (argparse would print
    it and exit)."""
    from mae_transfer.cluster import parse_tool_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_tool_args(tool, args)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise MaeTransferError(lines[-1].split(" error: ", 1)[-1] if lines else "invalid arguments") from None


def _tool_path(path: str | os.PathLike) -> Path:
    """A path as a cell's tool sees it: tools run in the repository root (`run_logged`, `CellJob`)."""
    return REPO_ROOT / Path(os.path.expanduser(str(path)))


def _folder(path: str | os.PathLike, what: str) -> None:
    if not Path(path).is_dir():
        raise MaeTransferError(f"{what} not found: {path}" if not Path(path).exists() else
                               f"{what} is not a directory: {path}")


def _file(path: str | os.PathLike, what: str) -> None:
    if not Path(path).is_file():
        raise MaeTransferError(f"{what} not found: {path}")


def _checkpoint_file(path: str, allow_pickle: bool) -> None:
    """Present, and readable without the unpickler unless --allow-pickle."""
    if is_hub_name(path):  # timm:/hf-hub: names: in huggingface_hub's cache, or downloadable (checkpoint.hub)
        path = str(resolve_hub_name(path))
    _file(path, "checkpoint")
    try:
        read_checkpoint(path, allow_pickle)
    except PickledCheckpointError:
        raise
    except MaeTransferError:
        pass  # other problems (format, shapes) are each cell's tool's to report, in the cell's log


def _check_pretraining(study: Study, name: str, check: Check) -> None:
    """The inputs of the pretraining run of backbone `name` (its config with the run's overrides, its data)."""
    pre = study.backbones[name]["pretrain"]
    from mae_transfer.pretraining import resolve_config

    what = f"pretraining config {Path(pre['config']).name}"
    cfg = check(what, load_config, pre["config"])
    if cfg is not None:
        cfg = _each_override(check, what, _plain_override, cfg, pre["opts"])
        check(what, resolve_config,
              {**cfg, "data_path": _pretrain_data(study, pre), "output_dir": str(pretrain_run(study, name))})
    if pre.get("crops"):
        check(None, _file, pre["crops"]["json"], "pretraining crops: annotation file")
        check(None, _folder, pre["crops"]["images"], "pretraining crops: image folder")
    else:
        check(None, _folder, pre["data"], "pretraining image folder")


def _each_override(check: Check, what: str, apply: Callable[[Any, str], Any], cfg: Any, overrides: list[str]) -> Any:
    """Apply the overrides one at a time, so that every unknown key is reported, not just the first, and the data
    checks still see the valid ones (e.g. a data root); returns the config with the valid overrides applied."""
    for item in overrides:
        changed = check(what, apply, cfg, item)
        cfg = cfg if changed is None else changed
    return cfg


def _plain_override(cfg: dict[str, Any], item: str) -> dict[str, Any]:
    return apply_overrides(cfg, [item])


def check_det_task(args: Any, check: Check) -> None:
    from mae_transfer import detection

    what = f"config {Path(args.config).name}"
    opts = [*args.opts, f"model.backbone.net.freeze_blocks={args.freeze_blocks}"]  # as detection.setup adds it
    try:
        cfg = detection.load_config(args.config, opts)
    except MaeTransferError:  # it stops at the first unknown key: load once per override to find every one
        cfg = check(what, detection.load_config, args.config, [])
        if cfg is not None:
            valid = [item for item in opts if check(what, detection.load_config, args.config, [item]) is not None]
            cfg = detection.load_config(args.config, valid)
    for split, loader in (("train", "train"), ("val", "test")):
        json_file, images = getattr(args, f"{split}_json"), getattr(args, f"{split}_images")
        if bool(json_file) != bool(images):
            check(None, _raise, f"--{split}-json and --{split}-images must be given together")
        elif json_file:
            check(None, _file, _tool_path(json_file), f"--{split}-json file")
            check(None, _folder, _tool_path(images), f"--{split}-images folder")
        elif cfg is not None:  # the config's builtin dataset (coco_2017_*, under $DETECTRON2_DATASETS)
            names = cfg.dataloader[loader].dataset.names
            for dataset in [names] if isinstance(names, str) else names:
                check(None, detection.check_builtin_coco, dataset)


def check_seg_task(args: Any, check: Check) -> None:
    from mae_transfer import segmentation

    what = f"config {Path(args.config).name}"
    options, args.cfg_options = list(args.cfg_options or []), []
    args.launcher = "none"  # the job sets the launcher; mmengine's pytorch launcher would want this machine's GPUs
    cfg = check(what, segmentation.build_config, args)
    if cfg is not None:
        def apply(cfg: Any, item: str) -> Any:
            segmentation.apply_cfg_options(cfg, [item], args.config)
            return cfg

        _each_override(check, what, apply, cfg, options)
        # what segmentation.train checks before its Runner starts
        check(None, segmentation.check_data, cfg, ["train_dataloader", "val_dataloader", "test_dataloader"])


def check_cls_task(args: Any, check: Check) -> None:
    from mae_transfer.classification import resolve_config

    what = f"config {Path(args.config).name}"
    cfg = check(what, load_config, args.config)
    if cfg is None:
        return
    cfg = _each_override(check, what, _plain_override, cfg, args.overrides)
    for key, value in (("data_path", args.data), ("output_dir", args.output_dir), ("finetune", args.finetune),
                       ("freeze_blocks", args.freeze_blocks)):  # as tools/finetune_cls.py sets them
        if value is not None:
            cfg[key] = value
    if check(what, resolve_config, cfg) is None or not cfg.get("data_path"):
        return
    root = _tool_path(cfg["data_path"])  # classification.build_datasets opens root/train and root/val
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        found = "not found" if not root.is_dir() else f"has no {' and no '.join(f'{s}/' for s in missing)} folder"
        check(None, _raise, f"data root {root} {found}: it needs train/<class>/ and val/<class>/ folders")


def _raise(message: str) -> None:
    raise MaeTransferError(message)
