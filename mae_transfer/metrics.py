"""The one metrics file every training / evaluation tool writes in its output folder: `eval_metrics.json`.

    {"task": "det" | "seg" | "cls",
     "metrics": {"AP_box": 50.3, "AP_mask": 44.9} | {"mIoU": 48.1} | {"top1": 83.6, "top5": 96.5},
     "iteration": 1000 | null, "epoch": 100 | null,   # when the evaluated weights were trained to
     "checkpoint": "path/of/the/evaluated/weights" | null,
     "tool": "tools/train_det.py",
     "details": {...},                                 # anything else the tool wants to keep
                                                       # (all COCO AP variants, ...)
     "undefined": {"AP_box": "why"}}                   # only when a metric is undefined: it is null

Strict JSON: an undefined number (NaN, e.g. COCO AP when the model made no detection) is written as null, and a
metric that is null says why in `undefined`. `read_eval_metrics` gives undefined metrics back as NaN, which
tables show as missing.

The task kinds and the metrics each must hold are `REQUIRED` (a kind registered in `mae_transfer.task_kinds` adds
its `TaskKind.eval_metrics`): the study runner and the demo read this file only, never a framework's own logs.
Written atomically; a missing or malformed file is one clear error.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text, read_json

FILENAME = "eval_metrics.json"
# task kind -> the metrics its record must hold: the built-in kinds', and those `task_kinds.register` adds
REQUIRED: dict[str, tuple[str, ...]] = {"det": ("AP_box", "AP_mask"), "seg": ("mIoU",), "cls": ("top1", "top5")}


def register_task(task: str, required: tuple[str, ...]) -> None:
    REQUIRED[task] = tuple(required)


def unregister_task(task: str) -> None:
    REQUIRED.pop(task, None)


def write_eval_metrics(output_dir: str | os.PathLike, task: str, metrics: Mapping[str, float | None], *, tool: str,
                       iteration: int | None = None, epoch: int | None = None,
                       checkpoint: str | os.PathLike | None = None,
                       details: Mapping[str, Any] | None = None, reasons: Mapping[str, str] | None = None) -> Path:
    """Write `output_dir/eval_metrics.json`; `metrics` must hold the task kind's `eval_metrics`. A metric that is None
    or not finite is written as null, with `reasons[name]` (or what the value was) in "undefined"; any other
    non-finite number (in `details`) as null."""
    if task not in REQUIRED:
        raise ValueError(f"task must be one of {sorted(REQUIRED)}, got {task!r}")
    required = REQUIRED[task]
    missing = [m for m in required if m not in metrics]
    if missing:
        raise ValueError(f"{task} metrics need {list(required)}, missing {missing}")
    values = {k: None if v is None else float(v) for k, v in metrics.items()}
    undefined = {k: (reasons or {}).get(k) or f"the evaluation gave {v}"
                 for k, v in values.items() if v is None or not math.isfinite(v)}
    record = {"task": task, "metrics": {k: None if k in undefined else v for k, v in values.items()},
              "iteration": None if iteration is None else int(iteration),
              "epoch": None if epoch is None else int(epoch),
              "checkpoint": None if checkpoint is None else str(checkpoint),
              "tool": tool, "details": dict(details or {})}
    if undefined:
        record["undefined"] = undefined
    path = Path(output_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(json.dumps(strict_json(record), indent=1, allow_nan=False) + "\n", path)


def read_eval_metrics(output_dir: str | os.PathLike, task: str | None = None) -> dict[str, Any]:
    """The record a tool wrote in `output_dir` (checked: schema, task, metric names)."""
    path = Path(output_dir) / FILENAME
    if not path.is_file():
        raise MaeTransferError(f"no {FILENAME} in {output_dir}: the run did not finish an evaluation")
    record = read_json(path)
    if (not isinstance(record, dict) or not isinstance(record.get("metrics"), dict)
            or record.get("task") not in REQUIRED):
        raise MaeTransferError(f"{path}: not an eval_metrics.json record "
                               "(expected task, metrics, ...; see mae_transfer/metrics.py)")
    if task is not None and record["task"] != task:
        raise MaeTransferError(f"{path}: metrics of a {record['task']!r} run, expected {task!r}")
    missing = [m for m in REQUIRED[record["task"]] if m not in record["metrics"]]
    if missing:
        raise MaeTransferError(f"{path}: metrics {missing} missing")
    record["metrics"] = {k: math.nan if v is None else v for k, v in record["metrics"].items()}
    return record


def strict_json(value: Any) -> Any:
    """`value` with numpy / torch scalars as Python numbers, paths as strings, tuples as lists and non-finite
    numbers as None: what strict JSON holds."""
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
