"""Everything tools/train_seg.py checks before the mmengine Runner starts, each a plain function called from one
place (`mae_transfer.segmentation.train.run`) and reused by the study's input check: `--cfg-options` keys exist in
the config and values keep their type (`build_config`), every image has a label map of its size that only uses
the config's classes and ignore index (`check_split`, facts cached per file), an --eval-only checkpoint fits the model.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import backbones.mmseg  # noqa: F401  (first: the mmcv-lite workaround, then registers MAEViT + the LLRD constructor)

# isort: split
from mmengine.config import Config, DictAction
from mmseg.registry import DATASETS
from PIL import Image

from mae_transfer.data import IMAGE_READ_ERRORS, MAX_INVALID_FRACTION, FileFacts, image_file_status
from mae_transfer.errors import MaeTransferError
from mae_transfer.input_checks import (
    Check,
    each_override,
)
from mae_transfer.io import checkpoint_named_by
from mae_transfer.paths import resolve_path
from mae_transfer.segmentation.checkpoint import read_mmengine_checkpoint

logger = logging.getLogger("mae_transfer.segmentation")


# ---------------------------------------------------------------------------------------- config
_MISSING = object()


def _lookup(node: Any, parts: list[str]) -> Any:
    """The config value at a dotted key (list positions as numbers), or _MISSING."""
    for part in parts:
        if isinstance(node, (list, tuple)):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                return _MISSING
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                return _MISSING
            node = node[part]
        else:
            return _MISSING
    return node


_KINDS = ((bool, "True or False"), (int, "an integer"), (float, "a number"), (str, "a string"),
          ((list, tuple), "a list"), (dict, "a dict"))


def _kind(value: Any) -> str | None:
    """What an override must be to replace this config value (None: anything)."""
    if value is None:
        return None
    return next((name for kind, name in _KINDS if isinstance(value, kind)), None)


def _fits(value: Any, expected: str | None) -> bool:
    if value is None or expected is None:  # switching an optional part on or off
        return True
    return _kind(value) == expected or (expected == "a number" and _kind(value) == "an integer")


def apply_cfg_options(cfg: Any, options: list[str], config_path: str) -> None:
    """Merge `key=value` overrides; every key must already exist in the config (typos fail loudly) and each
    value must be of the kind of the value it replaces (`train_cfg.max_iters=abc` fails here, not mid-run; an
    integer fits a float, a list a tuple; a string key takes the text as written, `img_path=2017` too)."""
    if not options:
        return
    parsed: dict[str, Any] = {}
    texts: dict[str, str] = {}
    action = DictAction(option_strings=["--cfg-options"], dest="cfg_options")
    for item in options:
        if "=" not in item:
            raise MaeTransferError(f"--cfg-options: expected KEY=VALUE, got {item!r}")
        ns = argparse.Namespace()
        action(None, ns, [item])
        parsed.update(ns.cfg_options)
        key, text = item.split("=", 1)
        texts[key] = text
    for key, value in parsed.items():
        current = _lookup(cfg._cfg_dict, key.split("."))
        if current is _MISSING:
            raise MaeTransferError(f"--cfg-options: unknown config key {key!r} (not in {config_path})")
        expected = _kind(current)
        if expected == "a string" and _kind(value) in ("True or False", "an integer", "a number"):
            parsed[key] = texts[key]
        elif expected == "a number" and _kind(value) == "an integer":
            parsed[key] = float(value)
        elif not _fits(value, expected):
            shown = "" if expected == "a dict" else f" (the config has {current!r})"
            raise MaeTransferError(f"--cfg-options {key}={texts[key]}: expected {expected}{shown}, "
                                   f"got {'a boolean' if isinstance(value, bool) else _kind(value)}")
    cfg.merge_from_dict(parsed, allow_list_keys=True)


def build_config(args: argparse.Namespace) -> Any:
    """The mmengine config of one tools/train_seg.py run, the command line's flags applied."""
    if not os.path.isfile(args.config):
        raise MaeTransferError(f"config file not found: {args.config}")
    try:
        cfg = Config.fromfile(args.config)
    except Exception as err:  # syntax errors, missing _base_ files
        raise MaeTransferError(f"cannot read config {args.config}: {type(err).__name__}: {err}") from err
    apply_cfg_options(cfg, args.cfg_options, args.config)
    cfg.launcher = args.launcher
    if args.launcher != "none" and not torch.cuda.is_available():
        # mmengine 0.10.7's init_dist calls torch.cuda.set_device, and torch's SyncBN is GPU-only.
        raise MaeTransferError(f"--launcher {args.launcher} needs CUDA GPUs (mmengine's distributed setup); "
                               "on CPU use --launcher none")
    cfg.work_dir = args.output_dir or str(Path("work_dirs") / Path(args.config).stem)
    if args.init_checkpoint:
        cfg.model.backbone.init_checkpoint = args.init_checkpoint
    if args.allow_pickle:
        cfg.model.backbone.allow_pickle = True
    if args.freeze_blocks is not None:
        cfg.model.backbone.freeze_blocks = args.freeze_blocks
    if args.resume:
        cfg.resume = True
        cfg.load_from = None if args.resume == "auto" else args.resume
    # Several runs may share a process (tests, studies): mmengine keys its visualizer/logger
    # singletons by name, so give each run its own.
    run_name = f"{Path(args.config).stem}_{uuid.uuid4().hex[:8]}"
    cfg.experiment_name = run_name
    if cfg.get("visualizer"):
        cfg.visualizer.name = run_name
    return cfg


# ---------------------------------------------------------------------------------------- checks
def _datasets(cfg: Any, split_keys: Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for key in split_keys:
        loader = cfg.get(key)
        if loader and loader.get("dataset"):
            out.append((key, loader.dataset))
    return out


def read_label_facts(path: str) -> dict[str, Any] | str:
    """{"size": [width, height], "values": the label values present} of a label map ("channels" instead of
    "values" when it has several), or why it cannot be read."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)  # mmseg's pillow decoding: palette images give their indices
    except IMAGE_READ_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    facts: dict[str, Any] = {"size": [int(arr.shape[1]), int(arr.shape[0])]}
    if arr.ndim != 2:
        facts["channels"] = int(arr.shape[2])
    elif arr.dtype == np.uint8:
        facts["values"] = np.flatnonzero(np.bincount(arr.ravel(), minlength=256)).tolist()
    else:
        facts["values"] = np.unique(arr).tolist()
    return facts


def _data_list(key: str, ds: Any) -> list[dict]:
    """The samples mmseg's dataset class lists for this dataset config (its pairing of images and label maps:
    img_suffix, seg_map_suffix, ann_file), before `indices`."""
    ds_cfg = copy.deepcopy(ds.to_dict() if hasattr(ds, "to_dict") else dict(ds))
    ds_cfg.update(pipeline=[], lazy_init=True, serialize_data=False, indices=None)
    try:
        dataset = DATASETS.build(ds_cfg)
        dataset.full_init()
    except Exception as err:  # noqa: BLE001  (mmseg asserts and raises many types for a bad dataset config)
        raise MaeTransferError(f"cannot list the samples of {key}.dataset ({type(err).__name__}: {err})") from None
    return dataset.data_list


def _used_positions(key: str, count: int, indices: Any) -> list[int]:
    """Positions in the data list that the dataset uses with `indices` (mmengine's meaning: None, first/last N,
    or a list)."""
    positions = list(range(count))
    if indices is None:
        return positions
    if isinstance(indices, int):
        return positions[:indices] if indices >= 0 else positions[indices:]
    try:
        return [positions[i] for i in indices]
    except (IndexError, TypeError):
        raise MaeTransferError(f"{key}.dataset.indices: expected an int or a list of positions below {count}, "
                               f"got {indices!r}") from None


def _reduce_zero_label(ds: Any, default: bool) -> bool:
    """The dataset's reduce_zero_label; a LoadAnnotations in its pipeline that disagrees fails in mmseg (an
    assert at the first sample), so it is an error here."""
    for step in ds.get("pipeline") or []:
        if isinstance(step, dict) and step.get("type") == "LoadAnnotations" and \
                step.get("reduce_zero_label") not in (None, default):
            raise MaeTransferError(f"the pipeline's LoadAnnotations has reduce_zero_label={step['reduce_zero_label']}, "
                                   f"its dataset ({ds.get('type')}) reduce_zero_label={default}; set both the same")
    return default


def check_split(key: str, ds: Any, num_classes: int, ignore_index: int) -> None:
    """Check every image and label map of one split (facts cached, `FileFacts`): each image has a label map of
    its size whose values are classes or the ignore index (after reduce_zero_label and the dataset's label_map).
    Unreadable images or label maps: in the training set skipped with one counted warning (the dataset's
    `indices` leave them out), more than MAX_INVALID_FRACTION of them an error; in val/test sets an error
    (a skipped image would change the evaluation set)."""
    items = _data_list(key, ds)
    prefix = ds.get("data_prefix", {})
    img_dir = os.path.join(ds.get("data_root") or "", prefix.get("img_path", ""))
    seg_dir = os.path.join(ds.get("data_root") or "", prefix.get("seg_map_path", ""))
    if not items:
        raise MaeTransferError(f"no images (*{ds.get('img_suffix', '')}) in {img_dir} "
                               f"({key}.dataset.data_prefix.img_path, img_suffix)")
    used = _used_positions(key, len(items), ds.get("indices"))
    for field, what in (("img_path", "images"), ("seg_map_path", "label maps")):  # ann_file lists may name either
        missing = [i for i in used if not os.path.isfile(items[i].get(field) or "")]
        if missing:
            first = items[missing[0]]
            raise MaeTransferError(
                f"{len(missing)} of {len(used)} {what} of {key} not found, e.g. {first.get(field)} (for image "
                f"{first['img_path']}; label maps are <image name without img_suffix>+seg_map_suffix in {seg_dir})")
    logger.info("checking %d images and label maps of %s", len(used), key)
    reduce_zero = _reduce_zero_label(ds, bool(items[0].get("reduce_zero_label")))
    facts = FileFacts("seg_data", f"{os.path.abspath(img_dir)}\0{os.path.abspath(seg_dir)}")
    unreadable, layered, resized, bad_values = [], [], [], []
    try:
        for i in used:
            img_path, seg_path = items[i]["img_path"], items[i]["seg_map_path"]
            size = facts.get(img_path, image_file_status)
            size = list(size) if isinstance(size, tuple) else size  # [w, h] as json gives it back from the cache
            label = facts.get(seg_path, read_label_facts)
            if isinstance(size, str) or isinstance(label, str):
                unreadable.append((i, *((img_path, size) if isinstance(size, str) else (seg_path, label))))
            elif "channels" in label:
                layered.append((seg_path, label["channels"]))
            elif label["size"] != size:
                resized.append((seg_path, label["size"], img_path, size))
            else:
                label_map = items[i].get("label_map") or {}
                bad = [v for v in label["values"] if not _known_label(v, reduce_zero, label_map, num_classes,
                                                                       ignore_index)]
                if bad:
                    bad_values.append((seg_path, bad))
    finally:
        facts.save()
    if layered:
        path, channels = layered[0]
        raise MaeTransferError(f"{len(layered)} of {len(used)} label maps of {key} have several channels, e.g. "
                               f"{path} ({channels}); expected single-channel PNGs of class indices (mode L or P)")
    if resized:
        seg_path, (lw, lh), img_path, (iw, ih) = resized[0]
        raise MaeTransferError(f"{len(resized)} of {len(used)} label maps of {key} differ in size from their "
                               f"images, e.g. {seg_path} is {lw}x{lh}, its image {img_path} {iw}x{ih}; "
                               "a label map must have its image's size")
    if bad_values:
        path, bad = bad_values[0]
        hi = num_classes if reduce_zero else num_classes - 1
        raise MaeTransferError(
            f"label values {bad[:8]} in {path} are outside 0..{hi} and the ignore index {ignore_index} "
            f"(num_classes={num_classes}, reduce_zero_label={reduce_zero}; {len(bad_values)} of {len(used)} label "
            f"maps of {key}); check model.decode_head.num_classes / ignore_index for this dataset")
    if unreadable:
        _, path, why = unreadable[0]
        what = (f"{len(unreadable)} of {len(used)} images of {key} (or their label maps) cannot be read, "
                f"e.g. {path} ({why})")
        if key != "train_dataloader":
            raise MaeTransferError(f"{what}; fix or remove them (an evaluation set is not changed silently)")
        if len(unreadable) > MAX_INVALID_FRACTION * len(used):
            raise MaeTransferError(f"{what}; more than half unreadable: check the data folder")
        logger.warning("%s: skipped", what)
        skipped = {i for i, _, _ in unreadable}
        ds.indices = [i for i in used if i not in skipped]


def _known_label(value: int, reduce_zero: bool, label_map: dict, num_classes: int, ignore_index: int) -> bool:
    """Whether a label map value is a class or the ignore index once mmseg's LoadAnnotations has mapped it."""
    if reduce_zero:  # 0 -> 255 (ignored), v -> v - 1, 255 stays 255
        value = 255 if value in (0, 255) else value - 1
    value = label_map.get(value, value)
    return 0 <= value < num_classes or value == ignore_index


def check_data(cfg: Any, split_keys: Sequence[str]) -> None:
    """Data roots/folders exist, and every sample of each split passes `check_split`.
    Relative data roots resolve against the current directory, then the repository root."""
    head = cfg.model.decode_head
    num_classes, ignore_index = int(head.num_classes), int(head.get("ignore_index", 255))
    for key, ds in _datasets(cfg, split_keys):
        if ds.get("data_root"):
            ds.data_root = str(resolve_path(ds.data_root))
        root = ds.get("data_root") or ""
        if root and not os.path.isdir(root):
            raise MaeTransferError(f"data root not found: {root} ({key}.dataset.data_root)")
        prefix = ds.get("data_prefix", {})
        for what in ("img_path", "seg_map_path"):
            folder = os.path.join(root, prefix.get(what, ""))
            if not os.path.isdir(folder):
                raise MaeTransferError(f"data folder not found: {folder} ({key}.dataset.data_prefix.{what})")
        check_split(key, ds, num_classes, ignore_index)


def check_init_checkpoint(path: str) -> None:
    """Fail before the Runner starts if the backbone checkpoint is missing."""
    if not os.path.isfile(path):
        raise MaeTransferError(f"init checkpoint not found: {path}")


def check_eval_checkpoint(model: Any, path: str, allow_pickle: bool = False) -> int | None:
    """The --eval-only checkpoint must be a full model checkpoint that fits this config's model; returns the
    iteration it was saved at (None if it does not say)."""
    # Missing / truncated / non-checkpoint / pickled files give one clear line.
    obj = read_mmengine_checkpoint(path, allow_pickle)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MaeTransferError(f"{path} holds no model state_dict (expected a checkpoint written by train_seg.py)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else ""
        if wrong:
            k = wrong[0]
            detail += ("; " if detail else "") + (
                f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise MaeTransferError(f"checkpoint {path} does not fit the model of this config: {detail}; "
                               "use --init-checkpoint for backbone-only / foreign weights")
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return meta.get("iter") if isinstance(meta, dict) and isinstance(meta.get("iter"), int) else None


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The checkpoint named in `output_dir/last_checkpoint` (written by mmengine's CheckpointHook), if any: the
    seg task kind's checkpoint marker (mae_transfer/task_kinds.py)."""
    return checkpoint_named_by(output_dir, "last_checkpoint")


# ----------------------------------------------------------------------------------------- a study's input check

def check_study_task(args: Any, check: Check) -> None:
    """A study cell's config (with its overrides, every unknown key reported) and data, before anything runs
    (`TaskKind.input_check` of its kind in mae_transfer/task_kinds.py)."""
    what = f"config {Path(args.config).name}"
    options, args.cfg_options = list(args.cfg_options or []), []
    args.launcher = "none"  # the job sets the launcher; mmengine's pytorch launcher would want this machine's GPUs
    cfg = check(what, build_config, args)
    if cfg is not None:
        def apply(cfg: Any, item: str) -> Any:
            apply_cfg_options(cfg, [item], args.config)
            return cfg

        each_override(check, what, apply, cfg, options)
        # what segmentation.train checks before its Runner starts
        check(None, check_data, cfg, ["train_dataloader", "val_dataloader", "test_dataloader"])
