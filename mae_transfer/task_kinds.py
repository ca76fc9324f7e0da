"""Task kinds in one place: what the study runner, the cluster launcher, the metrics file and the demo need to
know about detection (`det`), segmentation (`seg`) and classification (`cls`).

One `TaskKind` record per kind names its tool (`TOOLS`: script, distributed mode, checkpoint marker), the metrics
its tool writes to eval_metrics.json and the ones a study tabulates (with their labels), the unit a run's length
is counted in, and how a study cell's settings (length, checkpoint period, seed, initial weights, frozen blocks)
are spelled on the tool's command line. A new task kind is one `register(TaskKind(...))` call:

    register(TaskKind("pose", Tool("tools/train_pose.py", TORCH_ENV, "checkpoint_last.pth"), "train_pose",
                      metrics=(Metric("AP_kp", "AP^kp", "AP$^{kp}$"),),
                      overrides=Overrides(length=("max_iter={iters}",), checkpoint_period="period={period}",
                                          seed="seed={seed}", init_override="init={checkpoint}")))

A kind's `input_check` (its study cells' data and config, before anything runs) and its tool's launch `mode` (how the
cluster launcher starts one process per task: `TORCH_ENV`, `MMENGINE`, `DETECTRON2`) are callables on the record.

Framework-free: nothing here imports detectron2 / mmseg / mmengine at import time; the detection and segmentation
input checks import their framework package when a study calls them (the one framework-lazy import each, listed
with its reason in tests/test_imports.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae_transfer import metrics
from mae_transfer.errors import MaeTransferError
from mae_transfer.io import checkpoint_named_by

__all__ = ["DETECTRON2", "KINDS", "MMENGINE", "TOOLS", "TORCH_ENV", "LaunchMode", "Metric", "Overrides", "TaskKind",
           "Tool", "get", "last_checkpoint", "register", "unregister"]


# ------------------------------------------------------------------------------------------- launch modes
def _torch_env(place: Any) -> dict[str, str]:
    """torchrun's variables for one task (`place`: a `mae_transfer.cluster.Placement`)."""
    return {"RANK": str(place.global_rank), "WORLD_SIZE": str(place.num_tasks), "LOCAL_RANK": str(place.local_rank),
            "LOCAL_WORLD_SIZE": str(place.num_tasks // place.num_nodes), "MASTER_ADDR": place.master_addr,
            "MASTER_PORT": str(place.master_port)}


@dataclass(frozen=True)
class LaunchMode:
    """How a tool starts its distributed processes: `task(place, gpus_per_node)` is (extra argv, environment
    additions) of one cluster task; `spawns_workers`: the tool starts one worker per GPU itself (one task per node)."""

    name: str
    task: Callable[[Any, int], tuple[list[str], dict[str, str]]]
    spawns_workers: bool = False

    def tasks_per_node(self, gpus_per_node: int) -> int:
        return 1 if self.spawns_workers else max(1, gpus_per_node)


TORCH_ENV = LaunchMode("torch_env", lambda place, gpus: ([], _torch_env(place)))
# mmengine's `pytorch` launcher reads exactly torchrun's variables
MMENGINE = LaunchMode("mmengine", lambda place, gpus: (["--launcher", "pytorch" if place.num_tasks > 1 else "none"],
                                                       _torch_env(place)))
# detectron2's `launch` spawns one worker per GPU itself, from its own flags
DETECTRON2 = LaunchMode("detectron2", lambda place, gpus: (
    ["--num-gpus", str(max(1, gpus)), "--num-machines", str(place.num_nodes), "--machine-rank", str(place.node),
     "--dist-url", f"tcp://{place.master_addr}:{place.master_port}"], {}), spawns_workers=True)


@dataclass(frozen=True)
class Tool:
    """A training tool as the cluster launcher runs it."""

    script: str  # relative to the repository root (or absolute)
    mode: LaunchMode  # TORCH_ENV: torchrun's variables; MMENGINE: the same + --launcher; DETECTRON2: launch flags
    checkpoint_marker: str  # the file in the output folder that says there is a checkpoint to resume from
    marker_names_checkpoint: bool = False  # the marker holds the checkpoint's file name (detectron2, mmengine)

    def has_checkpoint(self, output_dir: str | os.PathLike) -> bool:
        return (Path(output_dir) / self.checkpoint_marker).is_file()

    def last_checkpoint(self, output_dir: str | os.PathLike) -> str | None:
        """The checkpoint a resumed run continues from, if the output folder holds one."""
        return checkpoint_named_by(output_dir, self.checkpoint_marker, self.marker_names_checkpoint)


@dataclass(frozen=True)
class Metric:
    """A metric a study tabulates: its key in eval_metrics.json, its label in tables and in plots."""

    key: str
    label: str  # plain text (results.md)
    tex: str  # matplotlib mathtext (plot.png)


@dataclass(frozen=True)
class Overrides:
    """How a study cell's settings are spelled on the tool's command line. Templates take `{iters}` (the run's
    length in the kind's unit), `{period}`, `{seed}`, `{checkpoint}` (the initial weights, '' for none)."""

    length: tuple[str, ...]  # the run's length (and an evaluation at its end)
    checkpoint_period: str
    seed: str
    init_override: str | None = None  # the initial weights as an override, always given ('' = random init) ...
    init_flag: str | None = None  # ... or as a flag, given only with weights
    freeze_flag: str = "--freeze-blocks"
    overrides_flag: str | None = None  # the one flag the tool takes all overrides after (None: positional)

    def init(self, checkpoint: str | None) -> tuple[list[str], list[str]]:
        """(flags, overrides) that pass the initial weights."""
        if self.init_flag:
            return ([self.init_flag, checkpoint] if checkpoint else []), []
        return [], ([self.init_override.format(checkpoint=checkpoint or "")] if self.init_override else [])

    def cell(self, iters: int, period: int, seed: int) -> list[str]:
        """The overrides of a run's length, checkpoint period and seed."""
        return [*(t.format(iters=iters) for t in self.length), self.checkpoint_period.format(period=period),
                self.seed.format(seed=seed)]


@dataclass(frozen=True)
class TaskKind:
    """Everything the library knows about one kind of downstream task."""

    name: str
    tool: Tool
    tool_name: str  # the tool's name in `TOOLS` (tools/submit.py's TOOL argument)
    metrics: tuple[Metric, ...]  # what a study records and tabulates
    overrides: Overrides
    required_metrics: tuple[str, ...] = ()  # what eval_metrics.json must hold (default: the `metrics`)
    length_key: str = "iters"  # a study task's key for the run's length: "iters" or "epochs"
    # check(args, check): a study cell's data and config (mae_transfer/input_checks.py), before anything runs
    input_check: Callable[[Any, Any], None] | None = None

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return tuple(m.key for m in self.metrics)

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        return self.required_metrics or self.metric_keys

    @property
    def length_unit(self) -> str:
        return "epochs" if self.length_key == "epochs" else "iterations"

    def metric(self, key: str) -> Metric:
        return next(m for m in self.metrics if m.key == key)

    def last_checkpoint(self, output_dir: str | os.PathLike) -> str | None:
        return self.tool.last_checkpoint(output_dir)


TOOLS: dict[str, Tool] = {
    "pretrain": Tool("tools/pretrain.py", TORCH_ENV, "checkpoint_last.pth"),
}
KINDS: dict[str, TaskKind] = {}


def register(kind: TaskKind) -> TaskKind:
    """Add a task kind (and its tool); a name already taken is an error."""
    if kind.name in KINDS:
        raise MaeTransferError(f"task kind {kind.name!r} is already registered")
    if kind.length_key not in ("iters", "epochs"):
        raise MaeTransferError(f"task kind {kind.name!r}: length_key must be 'iters' or 'epochs', "
                               f"got {kind.length_key!r}")
    if TOOLS.get(kind.tool_name, kind.tool) != kind.tool:
        raise MaeTransferError(f"task kind {kind.name!r}: tool name {kind.tool_name!r} is taken by another tool")
    KINDS[kind.name] = kind
    TOOLS[kind.tool_name] = kind.tool
    metrics.register_task(kind.name, kind.eval_metrics)
    return kind


def unregister(name: str) -> None:
    """Remove a task kind and its tool (tests register kinds of their own)."""
    kind = KINDS.pop(name)
    metrics.unregister_task(name)
    if not any(k.tool_name == kind.tool_name for k in KINDS.values()):
        TOOLS.pop(kind.tool_name, None)


def get(name: Any, where: str = "task") -> TaskKind:
    """The record of a task kind; an unknown name is an error naming the kinds there are."""
    if name not in KINDS:
        raise MaeTransferError(f"{where}: kind must be one of {tuple(KINDS)}, got {name!r}")
    return KINDS[name]


def last_checkpoint(kind: str, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a `kind` run in `output_dir` resumes from (the file its checkpoint marker names), if any."""
    return get(kind).last_checkpoint(output_dir)


# ------------------------------------------------------------------------------------------- the built-in kinds
def _check_det_task(args: Any, check: Any) -> None:
    from mae_transfer.detection.checks import check_study_task  # framework-lazy: imports detectron2

    check_study_task(args, check)


def _check_seg_task(args: Any, check: Any) -> None:
    from mae_transfer.segmentation.checks import check_study_task  # framework-lazy: imports mmseg

    check_study_task(args, check)


def _check_cls_task(args: Any, check: Any) -> None:
    from mae_transfer.classification import check_study_task  # framework-lazy: imports timm

    check_study_task(args, check)


register(TaskKind(
    "det", Tool("tools/train_det.py", DETECTRON2, "last_checkpoint", marker_names_checkpoint=True), "train_det",
    metrics=(Metric("AP_box", "AP^box", "AP$^{box}$"), Metric("AP_mask", "AP^mask", "AP$^{mask}$")),
    overrides=Overrides(length=("train.max_iter={iters}", "train.eval_period={iters}"),
                        checkpoint_period="train.checkpointer.period={period}", seed="train.seed={seed}",
                        init_override="train.init_checkpoint={checkpoint}"),
    input_check=_check_det_task))
register(TaskKind(
    "seg", Tool("tools/train_seg.py", MMENGINE, "last_checkpoint", marker_names_checkpoint=True), "train_seg",
    metrics=(Metric("mIoU", "mIoU", "mIoU"),),
    overrides=Overrides(length=("train_cfg.max_iters={iters}", "train_cfg.val_interval={iters}"),
                        checkpoint_period="default_hooks.checkpoint.interval={period}", seed="randomness.seed={seed}",
                        init_flag="--init-checkpoint", overrides_flag="--cfg-options"),  # one list: a second flag
    input_check=_check_seg_task))                # would replace the first
register(TaskKind(
    "cls", Tool("tools/finetune_cls.py", TORCH_ENV, "checkpoint_last.pth"), "finetune_cls",
    metrics=(Metric("top1", "top-1", "top-1"),), required_metrics=("top1", "top5"), length_key="epochs",
    # the tool checkpoints every epoch anyway; `save_every` keeps some
    overrides=Overrides(length=("epochs={iters}",), checkpoint_period="save_every={period}", seed="seed={seed}",
                        init_override="finetune={checkpoint}"),
    input_check=_check_cls_task))
