"""The one metrics file every training / evaluation tool writes in its output folder: `eval_metrics.json`.

    {"task": "det" | "seg" | "cls",
     "metrics": {"AP_box": 50.3, "AP_mask": 44.9} | {"mIoU": 48.1} | {"top1": 83.6, "top5": 96.5},
     "iteration": 1000 | null, "epoch": 100 | null,   # when the evaluated weights were trained to
     "checkpoint": "path/of/the/evaluated/weights" | null,
     "tool": "tools/train_det.py",
     "details": {...}}                                 # anything else the tool wants to keep
                                                       # (all COCO AP variants, ...)

Metric names are the study table's (`METRIC_NAMES`): the study runner and the demo read this file only, never
a framework's own logs. Written atomically; a missing or malformed file is one clear error.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text

FILENAME = "eval_metrics.json"
METRIC_NAMES = {"det": ("AP_box", "AP_mask"), "seg": ("mIoU",), "cls": ("top1", "top5")}


def write_eval_metrics(output_dir: str | os.PathLike, task: str, metrics: Mapping[str, float], *, tool: str,
                       iteration: int | None = None, epoch: int | None = None,
                       checkpoint: str | os.PathLike | None = None,
                       details: Mapping[str, Any] | None = None) -> Path:
    """Write `output_dir/eval_metrics.json`; `metrics` must hold the task's `METRIC_NAMES` (finite or NaN numbers)."""
    if task not in METRIC_NAMES:
        raise ValueError(f"task must be one of {sorted(METRIC_NAMES)}, got {task!r}")
    missing = [m for m in METRIC_NAMES[task] if m not in metrics]
    if missing:
        raise ValueError(f"{task} metrics need {list(METRIC_NAMES[task])}, missing {missing}")
    record = {"task": task, "metrics": {k: float(v) for k, v in metrics.items()},
              "iteration": None if iteration is None else int(iteration),
              "epoch": None if epoch is None else int(epoch),
              "checkpoint": None if checkpoint is None else str(checkpoint),
              "tool": tool, "details": dict(details or {})}
    path = Path(output_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(json.dumps(record, indent=1, default=_json_default) + "\n", path)


def read_eval_metrics(output_dir: str | os.PathLike, task: str | None = None) -> dict[str, Any]:
    """The record a tool wrote in `output_dir` (checked: schema, task, metric names)."""
    path = Path(output_dir) / FILENAME
    if not path.is_file():
        raise MaeTransferError(f"no {FILENAME} in {output_dir}: the run did not finish an evaluation")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MaeTransferError(f"{path}: malformed json ({err})") from None
    if (not isinstance(record, dict) or not isinstance(record.get("metrics"), dict)
            or record.get("task") not in METRIC_NAMES):
        raise MaeTransferError(f"{path}: not an eval_metrics.json record "
                               "(expected task, metrics, ...; see mae_transfer/metrics.py)")
    if task is not None and record["task"] != task:
        raise MaeTransferError(f"{path}: metrics of a {record['task']!r} run, expected {task!r}")
    missing = [m for m in METRIC_NAMES[record["task"]] if m not in record["metrics"]]
    if missing:
        raise MaeTransferError(f"{path}: metrics {missing} missing")
    return record


def _json_default(value: Any) -> Any:
    """numpy / torch scalars and paths in `details`."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
