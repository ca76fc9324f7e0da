"""Transfer studies: backbones x tasks x freeze_blocks x seeds, each cell a real fine-tune + evaluation.

A study spec is a plain-Python config (loaded with `mae_transfer.config.load_config`):

    depth = 12                                  # ViT depth: blocks fine-tuned = depth - freeze (-1 -> 0)
    freeze_blocks = [0, 4, 8, 10, 12, -1]       # -1: whole ViT frozen (the linear-probe analogue)
    seeds = [0]
    backbones = {                               # name -> where its weights come from
        "MAE": "checkpoints/mae_pretrain_vit_base.pth",   # a file in any format mae_transfer.checkpoint reads
        "scratch": None,                                  # None / "random": random init
        "MAE tiny": dict(checkpoint=None,                 # produced by tools/pretrain.py when missing
                         pretrain=dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data="images/",
                                       # or crops=dict(json=..., images=..., min_size=16): a labelled
                                       # ImageFolder of COCO object crops (coco_crops_to_imagefolder)
                                       opts=["epochs=40"])),
    }
    reference = "scratch"                       # optional: results.md adds backbone - reference per cell
    tasks = {
        "cls": dict(kind="cls", config="configs/cls_finetune_vit_b.py", epochs=100,   # classification:
                    args=["--data", "/path/to/imagenet"]),                        # length in epochs
        "det": dict(kind="det", config="configs/coco_mask_rcnn_vit_b.py", iters=184375,
                    args=["--train-json", ...], opts=["train.eval_period=5000"]),
        "seg": dict(kind="seg", config="configs/ade20k_upernet_vit_b.py", iters=160000,
                    args=["--launcher", "pytorch"], opts=["param_scheduler.1.end={iters}"],  # mmseg --cfg-options
                    launcher=["torchrun", "--nproc_per_node", "8"]),  # replaces `python` (default)
    }

Before the first cell runs, every input of every backbone and cell is checked and all problems are reported in
one error (`check_inputs`). Every cell runs the real `tools/train_det.py` (detectron2), `tools/train_seg.py` (mmseg) or
`tools/finetune_cls.py` (classification: its `epochs` replace `iters`) in a subprocess,
with its own output folder `OUTPUT/cells/<backbone>__<task>__freeze<k>__seed<s>/`. `{iters}`, `{warmup}`
(iters // 10, at least 1) and `{seed}` in a task's args/opts are replaced per cell. A cell's metrics are
what its tool wrote to `eval_metrics.json` (`mae_transfer.metrics`; no framework log is read). Finished cells
hold `done.json` (their metrics) and are skipped on a re-run; a cell with checkpoints but no `done.json` was
interrupted and is continued with the tool's `--resume`. After every cell, `results.csv` (one row per
finished cell) and `results.md` (rows: backbones, columns: blocks fine-tuned, cells: top-1 / AP^box /
AP^mask / mIoU, mean ± std over seeds, n seeds; with `reference = "scratch"` (a backbone name) also a table of
backbone - reference per cell, paired by seed) are rewritten atomically, and `plot.png` (metric vs blocks
fine-tuned, one line per backbone, one panel per metric, error bars = std over seeds, a caption naming tasks,
metrics, iterations and seeds) when the run ends, fails or is interrupted (Ctrl-C keeps every finished
cell; a re-run with nothing left to do rewrites all three).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mae_transfer.checkpoint import read_checkpoint
from mae_transfer.cluster import has_checkpoint as tool_has_checkpoint
from mae_transfer.cluster import make_resources
from mae_transfer.config import apply_overrides, load_config
from mae_transfer.errors import MaeTransferError, PickledCheckpointError
from mae_transfer.io import atomic_write, atomic_write_text
from mae_transfer.launch import run_logged
from mae_transfer.metrics import read_eval_metrics, strict_json
from mae_transfer.paths import REPO_ROOT, resolve_path

logger = logging.getLogger(__name__)

DONE = "done.json"
TASK_KINDS = ("det", "seg", "cls")
TOOL_OF_KIND = {"det": "train_det", "seg": "train_seg", "cls": "finetune_cls"}  # names in `cluster.TOOLS`
# the metrics of eval_metrics.json a study records and tabulates, per task kind; metric -> label in tables and plots
KIND_METRICS = {"det": ("AP_box", "AP_mask"), "seg": ("mIoU",), "cls": ("top1",)}
METRIC_LABELS = {"AP_box": "AP$^{box}$", "AP_mask": "AP$^{mask}$", "mIoU": "mIoU", "top1": "top-1"}
MD_LABELS = {"AP_box": "AP^box", "AP_mask": "AP^mask", "mIoU": "mIoU", "top1": "top-1"}
SPEC_KEYS = {"name", "depth", "freeze_blocks", "seeds", "backbones", "tasks", "output_dir", "python", "slurm",
             "reference"}
TASK_KEYS = {"kind", "config", "iters", "epochs", "args", "opts", "checkpoint_period", "launcher", "slurm"}


# ---------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class Cell:
    """One fine-tune + evaluation: a backbone, a task, a number of frozen blocks and a seed."""

    backbone: str
    task: str
    freeze_blocks: int
    seed: int

    @property
    def name(self) -> str:
        return _safe(f"{self.backbone}__{self.task}__freeze{self.freeze_blocks}__seed{self.seed}")


@dataclass
class Study:
    """A resolved spec: paths made absolute, values checked."""

    name: str
    depth: int
    freeze_blocks: list[int]
    seeds: list[int]
    backbones: dict[str, Any]  # name -> None | absolute path str | dict(checkpoint=..., pretrain=...)
    tasks: dict[str, dict[str, Any]]
    output_dir: Path
    spec_path: Path | None = None
    python: str = field(default_factory=lambda: sys.executable)
    allow_pickle: bool = False  # backbone files may hold pickled objects (passed to every cell as --allow-pickle)
    slurm: dict[str, Any] = field(default_factory=dict)  # job resources of every job (--executor; tasks add theirs)
    reference: str | None = None  # backbone the results compare the others against (difference table)

    def cells(self) -> list[Cell]:
        """All cells, seed-major (a first full table before extra seeds), then backbone, task, freeze."""
        return [Cell(b, t, f, s) for s in self.seeds for b in self.backbones for t in self.tasks
                for f in self.freeze_blocks]

    def blocks_tuned(self, freeze: int) -> int:
        return 0 if freeze < 0 else self.depth - freeze

    def cell_dir(self, cell: Cell) -> Path:
        return self.output_dir / "cells" / cell.name

    def metrics_of(self, task: str) -> list[str]:
        return list(KIND_METRICS[self.tasks[task]["kind"]])


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text)


def _int_list(value: Any, key: str, where: str) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise MaeTransferError(f"{where}: {key} must be a non-empty list of integers, got {value!r}")
    return list(dict.fromkeys(items))


def load_study(spec: str | os.PathLike | Mapping[str, Any], output_dir: str | os.PathLike | None = None,
               allow_pickle: bool = False) -> Study:
    """Read and check a study spec (file or dict); `output_dir` overrides the spec's."""
    if isinstance(spec, Mapping):
        raw, where, spec_path = dict(spec), "study spec", None
    else:
        spec_path = Path(spec)
        raw, where = load_config(spec_path), str(spec_path)
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise MaeTransferError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                               f"valid: {', '.join(sorted(SPEC_KEYS))}")
    for key in ("depth", "backbones", "tasks", "freeze_blocks"):
        if key not in raw:
            raise MaeTransferError(f"{where}: missing {key!r}")
    depth = raw["depth"]
    if not isinstance(depth, int) or depth < 1:
        raise MaeTransferError(f"{where}: depth must be a positive integer, got {depth!r}")
    freezes = _int_list(raw["freeze_blocks"], "freeze_blocks", where)
    bad = [f for f in freezes if not -1 <= f <= depth]
    if bad:
        raise MaeTransferError(f"{where}: freeze_blocks {bad} outside -1..{depth} (depth={depth})")
    seeds = _int_list(raw.get("seeds", [0]), "seeds", where)

    if not isinstance(raw["backbones"], Mapping) or not raw["backbones"]:
        raise MaeTransferError(f"{where}: backbones must be a non-empty dict name -> checkpoint / None / dict(...)")
    backbones: dict[str, Any] = {}
    for name, entry in raw["backbones"].items():
        if entry is None or entry == "random":
            backbones[name] = None
        elif isinstance(entry, (str, os.PathLike)):
            backbones[name] = str(resolve_path(entry))
        elif isinstance(entry, Mapping):
            extra = sorted(set(entry) - {"checkpoint", "pretrain"})
            if extra or not (entry.get("checkpoint") or entry.get("pretrain")):
                raise MaeTransferError(f"{where}: backbone {name!r} must be a path, None/'random', or dict(checkpoint="
                                       "PATH, pretrain=dict(config=..., data=... | crops=..., opts=[...]))")
            backbones[name] = _check_pretrain(name, dict(entry), where)
        else:
            raise MaeTransferError(f"{where}: backbone {name!r}: expected a path, None or a dict, got {entry!r}")

    reference = raw.get("reference")
    if reference is not None and reference not in backbones:
        raise MaeTransferError(f"{where}: reference {reference!r} is not one of the backbones "
                               f"({', '.join(map(repr, backbones))})")

    if not isinstance(raw["tasks"], Mapping) or not raw["tasks"]:
        raise MaeTransferError(f"{where}: tasks must be a non-empty dict name -> "
                               "dict(kind='det'|'seg'|'cls', config=..., iters=...)")
    tasks: dict[str, dict[str, Any]] = {}
    for name, task in raw["tasks"].items():
        if not isinstance(task, Mapping):
            raise MaeTransferError(f"{where}: task {name!r} must be a dict, got {task!r}")
        extra = sorted(set(task) - TASK_KEYS)
        if extra:
            raise MaeTransferError(f"{where}: task {name!r}: unknown key(s) {extra}; valid: {sorted(TASK_KEYS)}")
        if task.get("kind") not in TASK_KINDS:
            raise MaeTransferError(f"{where}: task {name!r}: kind must be one of {TASK_KINDS}, "
                                   f"got {task.get('kind')!r}")
        length = "epochs" if task["kind"] == "cls" else "iters"  # classification runs are counted in epochs
        if task.get("iters" if length == "epochs" else "epochs") is not None:
            raise MaeTransferError(f"{where}: task {name!r}: kind {task['kind']!r} takes {length}=, not "
                                   f"{'iters' if length == 'epochs' else 'epochs'}=")
        iters = task.get(length)
        if not isinstance(iters, int) or iters < 1:
            raise MaeTransferError(f"{where}: task {name!r}: {length} must be a positive integer, got {iters!r}")
        if not task.get("config"):
            raise MaeTransferError(f"{where}: task {name!r}: missing config")
        config = resolve_path(task["config"])
        if not config.is_file():
            raise MaeTransferError(f"{where}: task {name!r}: config file not found: {task['config']}")
        tasks[name] = dict(kind=task["kind"], config=str(config), iters=iters,
                           args=[str(a) for a in task.get("args", [])], opts=[str(o) for o in task.get("opts", [])],
                           checkpoint_period=int(task.get("checkpoint_period") or max(1, iters // 2)),
                           launcher=[str(a) for a in task.get("launcher") or []],
                           slurm=_check_slurm(task.get("slurm"), f"{where}: task {name!r}"))

    out = output_dir or raw.get("output_dir") or Path("work_dirs") / "studies" / (
        raw.get("name") or (spec_path.stem if spec_path else "study"))
    return Study(name=str(raw.get("name") or (spec_path.stem if spec_path else "study")), depth=depth,
                 freeze_blocks=freezes, seeds=seeds, backbones=backbones, tasks=tasks,
                 output_dir=Path(out).resolve(), spec_path=spec_path, python=raw.get("python") or sys.executable,
                 allow_pickle=allow_pickle, slurm=_check_slurm(raw.get("slurm"), where), reference=reference)


def _check_slurm(value: Any, where: str) -> dict[str, Any]:
    """A spec's / task's / pretraining's `slurm=dict(...)`: job resources for `tools/study.py --executor`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MaeTransferError(f"{where}: slurm must be a dict of job resources, got {value!r}")
    make_resources(value, where)  # unknown keys and bad values fail when the spec is read
    return dict(value)


def _check_pretrain(name: str, entry: dict[str, Any], where: str) -> dict[str, Any]:
    if entry.get("checkpoint"):
        entry["checkpoint"] = str(resolve_path(entry["checkpoint"]))
    pre = entry.get("pretrain")
    if pre is None:
        return entry
    if not isinstance(pre, Mapping) or not pre.get("config") or bool(pre.get("data")) == bool(pre.get("crops")):
        raise MaeTransferError(f"{where}: backbone {name!r}: pretrain must be dict(config=..., data=FOLDER or "
                               "crops=dict(json=..., images=..., min_size=...), opts=[...])")
    pre = dict(pre)
    pre["config"] = str(resolve_path(pre["config"]))
    if pre.get("data"):
        pre["data"] = str(resolve_path(pre["data"]))
    else:
        crops = dict(pre["crops"])
        if not crops.get("json") or not crops.get("images"):
            raise MaeTransferError(f"{where}: backbone {name!r}: crops needs json= and images=")
        crops["json"], crops["images"] = str(resolve_path(crops["json"])), str(resolve_path(crops["images"]))
        pre["crops"] = crops
    pre["opts"] = [str(o) for o in pre.get("opts", [])]
    pre["slurm"] = _check_slurm(pre.get("slurm"), f"{where}: backbone {name!r}")
    entry["pretrain"] = pre
    return entry


# ---------------------------------------------------------------------------------------------- commands
def _fill(items: Iterable[str], iters: int, seed: int) -> list[str]:
    values = {"iters": iters, "warmup": max(1, iters // 10), "seed": seed}
    return [re.sub(r"\{(iters|warmup|seed)\}", lambda m: str(values[m.group(1)]), s) for s in items]


def cell_command(study: Study, cell: Cell, checkpoint: str | None, resume: bool) -> list[str]:
    """The tools/train_det.py, tools/train_seg.py or tools/finetune_cls.py command line of one cell."""
    task = study.tasks[cell.task]
    out, iters = study.cell_dir(cell), task["iters"]
    args, opts = _fill(task["args"], iters, cell.seed), _fill(task["opts"], iters, cell.seed)
    if study.allow_pickle:
        args = ["--allow-pickle", *args]
    period = min(task["checkpoint_period"], iters)
    launcher = task["launcher"] or [study.python]
    if task["kind"] == "cls":  # iters are epochs here; the tool checkpoints every epoch anyway
        cmd = [*launcher, str(REPO_ROOT / "tools" / "finetune_cls.py"), "--config", task["config"], *args,
               "--output-dir", str(out), "--freeze-blocks", str(cell.freeze_blocks),
               f"finetune={checkpoint or ''}", f"epochs={iters}", f"save_every={period}", f"seed={cell.seed}", *opts]
        return cmd + (["--resume"] if resume else [])
    if task["kind"] == "det":
        cmd = [*launcher, str(REPO_ROOT / "tools" / "train_det.py"), "--config", task["config"],
               "--output-dir", str(out), *args, "--freeze-blocks", str(cell.freeze_blocks),
               f"train.init_checkpoint={checkpoint or ''}", f"train.max_iter={iters}",
               f"train.eval_period={iters}", f"train.checkpointer.period={period}", f"train.seed={cell.seed}", *opts]
        return cmd + (["--resume"] if resume else [])
    cmd = [*launcher, str(REPO_ROOT / "tools" / "train_seg.py"), "--config", task["config"],
           "--output-dir", str(out), *args, "--freeze-blocks", str(cell.freeze_blocks)]
    if checkpoint:
        cmd += ["--init-checkpoint", checkpoint]
    if resume:
        cmd += ["--resume"]
    # train_seg takes one --cfg-options list: everything goes there
    return cmd + ["--cfg-options", f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
                  f"default_hooks.checkpoint.interval={period}", f"randomness.seed={cell.seed}", *opts]


def cell_tool_args(study: Study, cell: Cell, checkpoint: str | None) -> list[str]:
    """The cell's arguments of its tool: its command after `<launcher> tools/<tool>.py`."""
    launcher = study.tasks[cell.task]["launcher"] or [study.python]
    return cell_command(study, cell, checkpoint, resume=False)[len(launcher) + 1:]


def has_checkpoint(study: Study, cell: Cell) -> bool:
    """Whether an unfinished cell is resumed: its tool left the file it resumes from (`cluster.TOOLS`)."""
    return tool_has_checkpoint(TOOL_OF_KIND[study.tasks[cell.task]["kind"]], study.cell_dir(cell))


# ---------------------------------------------------------------------------------------------- metrics
def read_metrics(output_dir: str | os.PathLike, kind: str) -> dict[str, float]:
    """The metrics a study records for a cell of `kind`, from the eval_metrics.json its tool wrote."""
    record = read_eval_metrics(output_dir, kind)  # checks the task's metric names are there
    return {m: float(record["metrics"][m]) for m in KIND_METRICS[kind]}


def read_det_metrics(output_dir: str | os.PathLike) -> dict[str, float]:
    """AP^box and AP^mask of the final COCO evaluation tools/train_det.py wrote."""
    return read_metrics(output_dir, "det")


def read_seg_metrics(output_dir: str | os.PathLike) -> dict[str, float]:
    """mIoU (percent) of the final validation / test tools/train_seg.py wrote."""
    return read_metrics(output_dir, "seg")


def read_cls_metrics(output_dir: str | os.PathLike) -> dict[str, float]:
    """Top-1 (percent) of the final evaluation tools/finetune_cls.py wrote."""
    return read_metrics(output_dir, "cls")


def last_det_evaluation(output_dir: str | os.PathLike) -> dict[str, float]:
    """Every number of the final COCO evaluation in detectron2's naming (`bbox/AP`, `bbox/AP50`, `segm/AP`, ...),
    from eval_metrics.json's details; {} when the run wrote none."""
    if not (Path(output_dir) / "eval_metrics.json").is_file():
        return {}
    details = read_eval_metrics(output_dir, "det")["details"]
    return {f"{task}/{name}": value for task, values in details.items() if isinstance(values, dict)
            for name, value in values.items()}


METRIC_READERS = {"det": read_det_metrics, "seg": read_seg_metrics, "cls": read_cls_metrics}


# ---------------------------------------------------------------------------------------------- running
Runner = Callable[[Study, Cell, str | None, bool], dict[str, float]]


def subprocess_runner(study: Study, cell: Cell, checkpoint: str | None, resume: bool) -> dict[str, float]:
    """Run one cell through the real tool and read the metrics it wrote (eval_metrics.json)."""
    out = study.cell_dir(cell)
    run_logged(cell_command(study, cell, checkpoint, resume), out / "run.log", f"cell {cell.name}")
    return METRIC_READERS[study.tasks[cell.task]["kind"]](out)


def _backbone_work(study: Study, name: str) -> Path:
    return study.output_dir / "backbones" / _safe(name)


def _pretrain_data(study: Study, pre: Mapping[str, Any]) -> str:
    return pre.get("data") or str(study.output_dir / "data" / f"crops_{_safe(Path(pre['crops']['json']).stem)}")


def backbone_commands(study: Study, name: str) -> tuple[str | None, list[list[str]]]:
    """(checkpoint path, commands that produce it) for one backbone; no commands if nothing is to be done."""
    entry = study.backbones[name]
    if entry is None:
        return None, []
    if isinstance(entry, str):
        return entry, []
    pre = entry.get("pretrain")
    work = _backbone_work(study, name)
    ckpt = entry.get("checkpoint") or str(work / "backbone.pth")
    if Path(ckpt).is_file() or not pre:
        return ckpt, []
    tool = str(REPO_ROOT / "tools" / "pretrain.py")
    return ckpt, [
        [study.python, tool, "--config", pre["config"], "--data", _pretrain_data(study, pre),
         "--output-dir", str(work / "pretrain"), "--resume", *pre["opts"]],
        [study.python, tool, "--export-encoder", str(work / "pretrain" / "checkpoint_last.pth"), ckpt],
    ]


def prepare_pretrain_data(study: Study, name: str) -> None:
    """A backbone pretrained on COCO object crops: write that ImageFolder first (`crops=dict(...)`)."""
    pre = study.backbones[name]["pretrain"]
    if pre.get("crops"):
        from mae_transfer.data import coco_crops_to_imagefolder

        c = pre["crops"]
        coco_crops_to_imagefolder(c["json"], c["images"], _pretrain_data(study, pre), int(c.get("min_size", 16)))


def prepare_backbone(study: Study, name: str) -> str | None:
    """Checkpoint path of a backbone, pretraining (resumably) and exporting it first when it is missing."""
    ckpt, commands = backbone_commands(study, name)
    if ckpt is not None and not commands and not Path(ckpt).is_file():
        raise MaeTransferError(f"backbone {name!r}: checkpoint not found: {ckpt}")
    if commands:
        prepare_pretrain_data(study, name)
        log = _backbone_work(study, name) / "run.log"
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
        steps += [(f"backbone {name}", cmd) for cmd in commands]
    for cell in study.cells():
        if not (study.cell_dir(cell) / DONE).is_file():
            steps.append((f"cell {cell.name}", cell_command(study, cell, checkpoints[cell.backbone],
                                                          has_checkpoint(study, cell))))
    return steps


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


# ---------------------------------------------------------------------------------------------- input checks
Check = Callable[..., Any]  # check(what | None, fn, *args): fn(*args), or None with the error kept as a problem


def check_inputs(study: Study, cells: list[Cell], executor: str | None = None) -> None:
    """Every input the `cells` need, checked before the first of them runs or is submitted; one error lists every
    problem (one line each), so a spec is fixed in one go instead of one failed job after another.

    Checked: the interpreter (and, run here without an executor, each task's launcher); per backbone its checkpoint
    (present; a pickled one only with --allow-pickle) or its pretraining (config with its overrides, data); per task
    its tool's arguments (the tool's own parser), its config with the cell's overrides (keys must exist: detectron2
    LazyConfig, mmengine config, our plain config) and its data (`TASK_INPUT_CHECKS`). Data are checked for
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
    for name in dict.fromkeys(c.backbone for c in cells):
        _check_backbone(study, name, checker(f"backbone {name!r}"))
    for task in tasks:
        cell = next(c for c in cells if c.task == task)  # cells of a task differ in values only, not in keys
        kind = study.tasks[task]["kind"]
        check = checker(f"task {task!r}")
        with contextlib.chdir(REPO_ROOT):  # where the tools run: relative data paths mean what they mean to them
            args = check(f"tools/{TOOL_OF_KIND[kind]}.py arguments", _parse_tool_args, TOOL_OF_KIND[kind],
                         cell_tool_args(study, cell, None))
            if args is not None:
                TASK_INPUT_CHECKS[kind](args, check)
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
    _file(path, "checkpoint")
    try:
        read_checkpoint(path, allow_pickle)
    except PickledCheckpointError:
        raise
    except MaeTransferError:
        pass  # other problems (format, shapes) are each cell's tool's to report, in the cell's log


def _check_backbone(study: Study, name: str, check: Check) -> None:
    ckpt, commands = backbone_commands(study, name)
    if ckpt is None:
        return
    if not commands:  # a file, or a pretraining already exported
        check(None, _checkpoint_file, ckpt, study.allow_pickle)
        return
    pre = study.backbones[name]["pretrain"]
    from mae_transfer.pretraining import resolve_config

    what = f"pretraining config {Path(pre['config']).name}"
    cfg = check(what, load_config, pre["config"])
    if cfg is not None:
        cfg = _each_override(check, what, _plain_override, cfg, pre["opts"])
        check(what, resolve_config,
              {**cfg, "data_path": _pretrain_data(study, pre), "output_dir": str(_backbone_work(study, name))})
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


def _check_det_task(args: Any, check: Check) -> None:
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


def _check_seg_task(args: Any, check: Check) -> None:
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


def _check_cls_task(args: Any, check: Check) -> None:
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


TASK_INPUT_CHECKS: dict[str, Callable[[Any, Check], None]] = {"det": _check_det_task, "seg": _check_seg_task,
                                                               "cls": _check_cls_task}


def write_done(study: Study, cell: Cell, checkpoint: str | None, metrics: dict[str, float], seconds: float,
               resumed: bool, **extra: Any) -> dict[str, Any]:
    """The finished-cell marker (`done.json`: its metrics and how it ran), written atomically."""
    record = {"cell": cell.__dict__, "blocks_tuned": study.blocks_tuned(cell.freeze_blocks), "checkpoint": checkpoint,
              "metrics": metrics, "seconds": round(seconds, 1), "resumed": resumed,
              "command": cell_command(study, cell, checkpoint, False), **extra}
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
        now = cell_command(study, cell, record.get("checkpoint"), False)
        if old[1:] != now[1:]:  # the python path may differ between machines
            logger.warning("%s finished with a different command than the spec gives now; kept (delete %s to "
                           "run it again)", cell.name, study.cell_dir(cell))


# ---------------------------------------------------------------------------------------------- results
def collect(study: Study) -> list[dict[str, Any]]:
    """One row per finished cell of this spec (read from the done markers)."""
    rows = []
    for cell in study.cells():
        path = study.cell_dir(cell) / DONE
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        rows.append({"backbone": cell.backbone, "task": cell.task, "kind": study.tasks[cell.task]["kind"],
                     "freeze_blocks": cell.freeze_blocks, "blocks_tuned": study.blocks_tuned(cell.freeze_blocks),
                     "seed": cell.seed, **record["metrics"], "seconds": record.get("seconds", ""),
                     "cell_dir": str(study.cell_dir(cell))})
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _mean(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the finite values."""
    values = [v for v in values if _finite(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _metric_columns(study: Study) -> list[tuple[str, str, str]]:
    """(task, metric key, label) in task order; the task name joins the label when a kind repeats."""
    kinds = [t["kind"] for t in study.tasks.values()]
    cols = []
    for task, spec in study.tasks.items():
        for metric in study.metrics_of(task):
            label = MD_LABELS[metric] if kinds.count(spec["kind"]) == 1 else f"{task} {MD_LABELS[metric]}"
            cols.append((task, metric, label))
    return cols


def per_seed(rows: list[dict[str, Any]], backbone: str, task: str, metric: str, freeze: int) -> dict[int, float]:
    """seed -> value of one (backbone, task, metric, freeze), finite values only."""
    return {r["seed"]: r[metric] for r in rows
            if (r["backbone"], r["task"], r["freeze_blocks"]) == (backbone, task, freeze) and _finite(r.get(metric))}


def summarise(study: Study, rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], tuple[float, float, int]]:
    """(backbone, task, metric, freeze) -> (mean over seeds, sample std, number of seeds with a value)."""
    out = {}
    for backbone in study.backbones:
        for task, metric, _ in _metric_columns(study):
            for freeze in study.freeze_blocks:
                values = per_seed(rows, backbone, task, metric, freeze)
                if values:
                    out[(backbone, task, metric, freeze)] = (*_mean(list(values.values())), len(values))
    return out


@dataclass(frozen=True)
class Difference:
    """backbone - reference for one (task, metric, freeze). Paired (both finished the same seeds): mean and sample
    std of the per-seed differences, n pairs. Unpaired: difference of the means, spread sqrt(std_a^2 + std_b^2)
    (the std of a difference of two independent runs, comparable to the paired spread), n = min(n_a, n_b)."""

    mean: float
    std: float
    n: int
    paired: bool


def differences(study: Study, rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], Difference]:
    """(backbone, task, metric, freeze) -> Difference against study.reference, for every other backbone whose
    cell and the reference's cell both have values; {} without a reference."""
    ref = study.reference
    if ref is None:
        return {}
    out = {}
    for backbone in study.backbones:
        if backbone == ref:
            continue
        for task, metric, _ in _metric_columns(study):
            for freeze in study.freeze_blocks:
                a, b = (per_seed(rows, name, task, metric, freeze) for name in (backbone, ref))
                if not a or not b:
                    continue
                if set(a) == set(b):
                    mean, std = _mean([a[s] - b[s] for s in a])
                    out[(backbone, task, metric, freeze)] = Difference(mean, std, len(a), True)
                else:
                    (mean_a, std_a), (mean_b, std_b) = _mean(list(a.values())), _mean(list(b.values()))
                    out[(backbone, task, metric, freeze)] = Difference(mean_a - mean_b, math.hypot(std_a, std_b),
                                                                       min(len(a), len(b)), False)
    return out


def _freeze_order(study: Study) -> list[int]:
    """Columns from the most blocks fine-tuned to none (linear probe last), as in the MAE paper's table."""
    return sorted(study.freeze_blocks, key=lambda f: (study.blocks_tuned(f), f < 0), reverse=True)


def _freeze_label(study: Study, freeze: int) -> str:
    n = study.blocks_tuned(freeze)
    if freeze < 0:
        return "0 (frozen ViT)"
    return f"{n} (all)" if n == study.depth else str(n)


def _fmt(value: float, sign: str = "") -> str:
    """One decimal as in the MAE paper; two below 1 (short CPU runs) so small numbers stay comparable."""
    return f"{value:{sign}.1f}" if abs(value) >= 1 else f"{value:{sign}.2f}"


def _fmt_spread(mean: float, std: float, spread: bool, sign: str = "") -> str:
    """mean±std, the std with the mean's decimals; without the ± when there is no spread to show (one seed)."""
    if not spread:
        return _fmt(mean, sign)
    return _fmt(mean, sign) + (f"±{std:.1f}" if abs(mean) >= 1 else f"±{std:.2f}")


def _n_label(counts: list[int]) -> str:
    return "-" if not counts else str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _task_summary(study: Study) -> str:
    return "; ".join(f"`{t}` = {s['kind']} with `{Path(s['config']).name}`, {s['iters']} "
                     f"{'epochs' if s['kind'] == 'cls' else 'iterations'}" for t, s in study.tasks.items())


def results_markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    stats = summarise(study, rows)
    cols = _metric_columns(study)
    freezes = _freeze_order(study)
    seeds = len(study.seeds)
    metrics = " / ".join(label for _, _, label in cols)
    header = "| backbone | " + " | ".join(_freeze_label(study, f) for f in freezes) + " | n |"
    rule = "|---|" + "---|" * (len(freezes) + 1)
    lines = [
        f"# Study `{study.name}`",
        "",
        f"Blocks fine-tuned (of {study.depth}; `freeze_blocks` = {study.depth} - n, "
        "0 (frozen ViT) = `freeze_blocks=-1`). "
        f"Each cell: {metrics}, mean ± std over the seeds that finished (sample std; no ± for one seed); "
        f"n = seeds per cell ({seeds} in the spec: {', '.join(map(str, study.seeds))}); `-` = not run / failed.",
        "",
        header,
        rule,
    ]
    short = []  # cells with fewer seeds than the spec, named below the table
    for backbone in study.backbones:
        cells, counts = [], []
        for f in freezes:
            parts = []
            for task, metric, label in cols:
                s = stats.get((backbone, task, metric, f))
                if s is None or math.isnan(s[0]):
                    parts.append("-")
                    continue
                parts.append(_fmt_spread(s[0], s[1], s[2] > 1))
                counts.append(s[2])
                if s[2] < seeds:
                    short.append(f"{backbone} {label} at {_freeze_label(study, f)} (n={s[2]})")
            cells.append(" / ".join(parts))
        lines.append(f"| {backbone} | " + " | ".join(cells) + f" | {_n_label(counts)} |")
    if short:
        lines += ["", f"Fewer than {seeds} seeds: " + "; ".join(short) + "."]
    lines += _difference_markdown(study, rows, cols, freezes)
    lines += ["", f"Tasks: {_task_summary(study)}",
              f"Finished cells: {len(rows)} of {len(study.cells())}. Per-cell numbers: results.csv; figure: plot.png.",
              ""]
    return "\n".join(lines)


def _difference_markdown(study: Study, rows: list[dict[str, Any]], cols: list[tuple[str, str, str]],
                         freezes: list[int]) -> list[str]:
    """The table of backbone - reference per cell (spec key `reference`), with how its spread is computed."""
    ref = study.reference
    if ref is None or len(study.backbones) < 2:
        return []
    diffs = differences(study, rows)
    lines = [
        "",
        f"## Difference to `{ref}`",
        "",
        f"Each cell: backbone − {ref}, {' / '.join(label for _, _, label in cols)}, per task, metric and blocks "
        "fine-tuned. Paired by seed when both finished the same seeds: mean ± sample std of the per-seed "
        "differences, n = pairs. † = the seeds differ: difference of the means ± sqrt(std_a² + std_b²), "
        "n = the smaller seed count. No ± for one pair.",
        "",
        "| backbone | " + " | ".join(_freeze_label(study, f) for f in freezes) + " | n |",
        "|---|" + "---|" * (len(freezes) + 1),
    ]
    for backbone in study.backbones:
        if backbone == ref:
            continue
        cells, counts = [], []
        for f in freezes:
            parts = []
            for task, metric, _ in cols:
                d = diffs.get((backbone, task, metric, f))
                if d is None or math.isnan(d.mean):
                    parts.append("-")
                    continue
                parts.append(_fmt_spread(d.mean, d.std, d.n > 1 or not d.paired, "+") + ("" if d.paired else "†"))
                counts.append(d.n)
            cells.append(" / ".join(parts))
        lines.append(f"| {backbone} − {ref} | " + " | ".join(cells) + f" | {_n_label(counts)} |")
    return lines


def write_csv(study: Study, rows: list[dict[str, Any]]) -> Path:
    metrics = [m for _, m, _ in _metric_columns(study)]
    fields = ["backbone", "task", "kind", "freeze_blocks", "blocks_tuned", "seed",
              *dict.fromkeys(metrics), "seconds", "cell_dir"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(buf.getvalue(), study.output_dir / "results.csv")


def plot_caption(study: Study, rows: list[dict[str, Any]]) -> str:
    """What the figure shows: every task's metrics, length and config, and the seeds behind each point."""
    tasks = "; ".join(
        f"{t}: {' / '.join(MD_LABELS[m] for m in study.metrics_of(t))} after {s['iters']} "
        f"{'epochs' if s['kind'] == 'cls' else 'iterations'} ({Path(s['config']).name})"
        for t, s in study.tasks.items())
    counts = [n for _, _, n in summarise(study, rows).values()]
    seeds = ", ".join(map(str, study.seeds))
    if len(study.seeds) == 1:
        points = f"one seed ({seeds}) per point, so no error bars"
    else:
        n = _n_label(counts)
        points = (f"mean over seeds {seeds} (n = {n} per point); error bars: sample std over seeds")
    return f"{tasks}. Points: {points}. x: ViT blocks fine-tuned (of {study.depth}); 0 = frozen ViT."


def write_plot(study: Study, rows: list[dict[str, Any]]) -> Path:
    """One panel per metric: mean metric vs blocks fine-tuned, one line per backbone (MAE paper, Fig. 9), error bars
    the std over seeds, and a caption under the panels (tasks, metrics, iterations, seeds).
    freeze_blocks=-1 sits at 0 blocks; when freeze_blocks=depth is also run it is drawn as an unjoined square."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(study, rows)
    cols = _metric_columns(study)
    width = 4.2 * len(cols)
    caption = textwrap.fill(plot_caption(study, rows), width=int(width * 14))
    caption_h = 0.15 * (caption.count("\n") + 1) + 0.1  # inches of 8-pt text lines
    fig, axes = plt.subplots(1, len(cols), figsize=(width, 3.6 + caption_h), squeeze=False)
    for ax, (task, metric, label) in zip(axes[0], cols):
        for i, backbone in enumerate(study.backbones):
            color = f"C{i}"
            pts = {f: stats[(backbone, task, metric, f)] for f in study.freeze_blocks
                   if (backbone, task, metric, f) in stats and not math.isnan(stats[(backbone, task, metric, f)][0])}
            # one seed has no spread: a zero-length bar would still draw its caps across the marker
            bars = any(n > 1 for _, _, n in pts.values())
            separate = -1 in pts and study.depth in pts  # both at 0 blocks fine-tuned
            line = sorted((study.blocks_tuned(f), m, s) for f, (m, s, _) in pts.items() if not (separate and f < 0))
            if line:
                xs, ys, es = zip(*line)
                ax.errorbar(xs, ys, yerr=es if bars else None, marker="o", color=color, label=backbone, capsize=3)
            if separate:
                ax.errorbar([0], [pts[-1][0]], yerr=[pts[-1][1]] if bars else None, marker="s", color=color,
                            markerfacecolor="none", linestyle="none", capsize=3)
        ax.set_title(f"{task}: {METRIC_LABELS[metric]}")
        ax.set_xlabel("blocks fine-tuned")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_xticks(sorted({study.blocks_tuned(f) for f in study.freeze_blocks}))
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{study.name}: partial fine-tuning", fontsize=10)
    fig.text(0.01, 0.02, caption, ha="left", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, caption_h / (3.6 + caption_h), 1, 1))
    try:
        return atomic_write(study.output_dir / "plot.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def write_results(study: Study, plot: bool = True) -> dict[str, Path]:
    """results.csv, results.md (and plot.png) from the finished cells, all written atomically."""
    rows = collect(study)
    out = {"csv": write_csv(study, rows),
           "md": atomic_write_text(results_markdown(study, rows), study.output_dir / "results.md")}
    if plot:
        out["plot"] = write_plot(study, rows)
    return out
