"""Running a study: every unfinished cell in a subprocess (its tool's real command), one after the other,
resumably (`done.json` per finished cell); backbones pretrained first when the spec asks for it."""
from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae_transfer import task_kinds
from mae_transfer.coco import coco_crops_to_imagefolder
from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text
from mae_transfer.metrics import read_eval_metrics, strict_json
from mae_transfer.study.claims import record_contrasts
from mae_transfer.study.inputs import check_inputs
from mae_transfer.study.report import write_results
from mae_transfer.study.spec import (
    DONE,
    Cell,
    Study,
    backbone_commands,
    backbone_work,
    command_line,
    has_checkpoint,
    pretrain_data,
)
from mae_transfer.subprocess_runner import run_logged

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- metrics
def read_metrics(output_dir: str | os.PathLike, kind: str) -> dict[str, float]:
    """The metrics a study records for a cell of `kind`, from the eval_metrics.json its tool wrote."""
    record = read_eval_metrics(output_dir, kind)  # checks the task's metric names are there
    return {m: float(record["metrics"][m]) for m in task_kinds.get(kind).metric_keys}


def read_det_metrics(output_dir: str | os.PathLike) -> dict[str, float]:
    """AP^box and AP^mask of the final COCO evaluation tools/train_det.py wrote."""
    return read_metrics(output_dir, "det")


def read_seg_metrics(output_dir: str | os.PathLike) -> dict[str, float]:
    """mIoU (percent) of the final validation / test tools/train_seg.py wrote."""
    return read_metrics(output_dir, "seg")


def last_det_evaluation(output_dir: str | os.PathLike) -> dict[str, float]:
    """Every number of the final COCO evaluation in detectron2's naming (`bbox/AP`, `bbox/AP50`, `segm/AP`, ...),
    from eval_metrics.json's details; {} when the run wrote none."""
    if not (Path(output_dir) / "eval_metrics.json").is_file():
        return {}
    details = read_eval_metrics(output_dir, "det")["details"]
    return {f"{task}/{name}": value for task, values in details.items() if isinstance(values, dict)
            for name, value in values.items()}


# ---------------------------------------------------------------------------------------------- running


Runner = Callable[[Study, Cell, str | None, bool], dict[str, float]]


def subprocess_runner(study: Study, cell: Cell, checkpoint: str | None, resume: bool) -> dict[str, float]:
    """Run one cell through the real tool and read the metrics it wrote (eval_metrics.json)."""
    out = study.cell_dir(cell)
    run_logged(command_line(study, cell, checkpoint, resume), out / "run.log", f"cell {cell.name}")
    return read_metrics(out, study.tasks[cell.task]["kind"])


def prepare_pretrain_data(study: Study, name: str) -> None:
    """A backbone pretrained on COCO object crops: write that ImageFolder first (`crops=dict(...)`)."""
    pre = study.backbones[name]["pretrain"]
    if pre.get("crops"):
        c = pre["crops"]
        coco_crops_to_imagefolder(c["json"], c["images"], pretrain_data(study, pre), int(c.get("min_size", 16)))


def prepare_backbone(study: Study, name: str) -> str | None:
    """Checkpoint path of a backbone, pretraining (resumably) and exporting it first when it is missing."""
    ckpt, commands = backbone_commands(study, name)
    if ckpt is not None and not commands and not Path(ckpt).is_file():
        raise MaeTransferError(f"backbone {name!r}: checkpoint not found: {ckpt}")
    if commands:
        prepare_pretrain_data(study, name)
        log = backbone_work(study, name) / "run.log"
        logger.info("backbone %s: pretraining (log: %s)", name, log)
        start = time.time()
        for cmd in commands:
            run_logged(cmd, log, f"pretraining of backbone {name!r}")
        logger.info("backbone %s: %s written in %.0f s", name, ckpt, time.time() - start)
    return ckpt


def plan(study: Study) -> list[tuple[str, list[str]]]:
    """(what, command) of everything a run would do now (finished cells and existing backbones left out)."""
    steps: list[tuple[str, list[str]]] = []
    checkpoints = {}
    for name in study.backbones:
        ckpt, commands = backbone_commands(study, name)
        checkpoints[name] = ckpt
        listed = {tuple(cmd) for _, cmd in steps}  # a shared pretraining run is listed once, by its first backbone
        steps += [(f"backbone {name}", cmd) for cmd in commands if tuple(cmd) not in listed]
    for cell in study.cells():
        if not (study.cell_dir(cell) / DONE).is_file():
            steps.append((f"cell {cell.name}", command_line(study, cell, checkpoints[cell.backbone],
                                                          has_checkpoint(study, cell))))
    return steps


def dry_run(study: Study, executor: str | None = None) -> str:
    """`tools/study.py --dry-run`: every check a run makes before anything runs (`check_inputs` of the unfinished
    cells; raises on a problem), then the cells and the commands still to run, as text. Runs and writes nothing."""
    cells = study.cells()
    check_inputs(study, [c for c in cells if not (study.cell_dir(c) / DONE).is_file()], executor)
    steps = plan(study)
    lines = [f"study {study.name}: {len(cells)} cells ({len(study.backbones)} backbones x {len(study.tasks)} tasks x "
             f"{len(study.freeze_blocks)} freeze x {len(study.seeds)} seeds"
             f"{'; paired pretraining runs each take their seeds only' if study.paired else ''}), output "
             f"{study.output_dir}; "
             "inputs checked"]
    for what, cmd in steps:
        lines += [f"# {what}", shlex.join(cmd)]
    return "\n".join([*lines, f"{len(steps)} step(s) to run"])


def run_study(study: Study, runner: Runner | None = None) -> dict[str, Any]:
    """Run every unfinished cell (skipping those with `done.json`), rewriting the results after each.

    Returns {"ran": [...], "skipped": [...], "failed": [(cell name, message)], "results": path of results.md}.
    A failed cell is logged and the study goes on; the failures are raised at the end, as one error.
    """
    runner = runner or subprocess_runner
    study.output_dir.mkdir(parents=True, exist_ok=True)
    cells = study.cells()
    todo = [c for c in cells if not (study.cell_dir(c) / DONE).is_file()]
    skipped = [c.name for c in cells if c not in todo]
    _warn_changed(study, [c for c in cells if c not in todo])
    check_inputs(study, todo)
    record_contrasts(study)  # the declaration, before this run's results
    logger.info("study %s: %d cells, %d finished (skipped), %d to run; output %s", study.name, len(cells),
                len(skipped), len(todo), study.output_dir)
    ran: list[str] = []
    failed: list[tuple[str, str]] = []
    checkpoints: dict[str, str | None] = {}
    try:
        for i, cell in enumerate(todo, 1):
            if cell.backbone not in checkpoints:
                checkpoints[cell.backbone] = prepare_backbone(study, cell.backbone)
            resume = has_checkpoint(study, cell)
            logger.info("[%d/%d] %s%s", i, len(todo), cell.name, " (resuming)" if resume else "")
            start = time.time()
            try:
                metrics = runner(study, cell, checkpoints[cell.backbone], resume)
            except MaeTransferError as err:
                logger.error("%s", err)
                failed.append((cell.name, str(err)))
                continue
            seconds = time.time() - start
            write_done(study, cell, checkpoints[cell.backbone], metrics, seconds, resume)
            ran.append(cell.name)
            logger.info("[%d/%d] %s: %s (%.0f s)", i, len(todo), cell.name,
                        ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), seconds)
            write_results(study, plot=False)  # the tables stay current even if the study is killed
    finally:
        write_results(study)  # also after Ctrl-C: every finished cell is in the tables and the plot
    if failed:
        raise MaeTransferError(f"{len(failed)} of {len(todo)} cell(s) failed, first: {failed[0][1]}")
    return {"ran": ran, "skipped": skipped, "failed": failed, "results": study.output_dir / "results.md"}


# ---------------------------------------------------------------------------------------------- done markers
def write_done(study: Study, cell: Cell, checkpoint: str | None, metrics: dict[str, float], seconds: float,
               resumed: bool, **extra: Any) -> dict[str, Any]:
    """The finished-cell marker (`done.json`: its metrics and how it ran), written atomically."""
    record = {"cell": cell.__dict__, "blocks_tuned": study.blocks_tuned(cell.freeze_blocks), "checkpoint": checkpoint,
              "metrics": metrics, "seconds": round(seconds, 1), "resumed": resumed,
              "command": command_line(study, cell, checkpoint, False), **extra}
    # strict JSON: an undefined metric (NaN) is null, which the tables skip like a missing value
    atomic_write_text(json.dumps(strict_json(record), indent=1, allow_nan=False) + "\n", study.cell_dir(cell) / DONE)
    return record


def _warn_changed(study: Study, finished: list[Cell]) -> None:
    """A finished cell is kept even if the spec changed since (e.g. more iterations): say so, once per cell."""
    for cell in finished:
        record = json.loads((study.cell_dir(cell) / DONE).read_text())
        old = record.get("command")
        if old is None:
            continue
        now = command_line(study, cell, record.get("checkpoint"), False)
        if old[1:] != now[1:]:  # the python path may differ between machines
            logger.warning("%s finished with a different command than the spec gives now; kept (delete %s to "
                           "run it again)", cell.name, study.cell_dir(cell))
