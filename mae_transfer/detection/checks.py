"""Everything tools/train_det.py checks before detectron2 starts, each a plain function the trainer calls from
one place (`mae_transfer.detection.train.setup`) and the study's input check reuses: `key=value` overrides exist
and keep the config value's type, datasets (user COCO json or the builtin ones) are valid, the weights to
evaluate exist, loaded weights fit the model (shapes, class count), the lr schedule builds.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from omegaconf import ListConfig, OmegaConf

try:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
except ImportError:  # detectron2's own fallback without hydra: `override_value` reads Python literals
    OverridesParser = HydraException = None

import backbones.detectron2  # noqa: F401  (registers build_mae_vit_backbone for yacs configs)
from mae_transfer import checkpoint as ckpt
from mae_transfer.detection.checkpoint import local_checkpoint_path
from mae_transfer.detection.data import register_coco_instances_checked
from mae_transfer.errors import MaeTransferError
from mae_transfer.input_checks import (
    Check,
    check_file,
    check_folder,
    raise_problem,
    tool_path,
)
from mae_transfer.io import checkpoint_named_by

logger = logging.getLogger("mae_transfer.detection")

_MISSING = object()


# ----------------------------------------------------------------------------------------- config
def load_config(path: str, overrides: Sequence[str]) -> Any:
    """LazyConfig.load + the `key=value` overrides, refusing keys that do not exist in the config and values of
    another type than the config's (`override_value`)."""
    if not Path(path).is_file():
        raise MaeTransferError(f"config file not found: {path}")
    cfg = LazyConfig.load(path)
    for item in (o for o in overrides if o != "--"):
        if "=" not in item:
            raise MaeTransferError(f"config override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0]
        current = OmegaConf.select(cfg, key, default=_MISSING, throw_on_resolution_failure=False)
        if current is _MISSING:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            known = ", ".join(sorted(map(str, node.keys()))) if hasattr(node, "keys") else ""
            raise MaeTransferError(f"config override {key!r}: no such key in {path}"
                                   + (f" (keys under {parent!r}: {known})" if known else ""))
        OmegaConf.update(cfg, key, override_value(item, current), merge=True)
    return cfg


# the config value's type -> (the override types it takes, their name in errors); int is taken for float
_OVERRIDE_TYPES = ((bool, (bool,), "a bool (true/false)"), (int, (int,), "an int"),
                   (float, (int, float), "a number"), (str, (str, int, float, bool), "a string"),
                   ((list, tuple, ListConfig), (list,), "a list [a, b, ...]"))


def override_value(item: str, current: Any) -> Any:
    """The value of a `key=value` override in detectron2's grammar (hydra's: 3, 0.5, true, null, [1, 2], text),
    checked against the type of the config's `current` value (None or a node: anything goes)."""
    key, text = item.split("=", 1)
    if OverridesParser is None:  # detectron2's own fallback without hydra
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    else:
        try:
            value = OverridesParser.create().parse_overrides([item])[0].value()
        except HydraException as err:
            raise MaeTransferError(f"config override {item!r}: {str(err).strip().splitlines()[0]}") from None
    if current is None or value is None:
        return value
    if key.endswith("dataset.names") and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value  # detectron2 takes one dataset name or a list of them
    for config_type, accepted, name in _OVERRIDE_TYPES:
        if isinstance(current, config_type) and not (config_type is int and isinstance(current, bool)):
            if not isinstance(value, accepted) or (bool not in accepted and isinstance(value, bool)):
                raise MaeTransferError(f"config override {key}={text}: expected {name} (the config has "
                                       f"{_shown(current)}), got {type(value).__name__} {value!r}")
            if config_type is str:
                return text  # a number given for a text value (a path, a name): its text
            return float(value) if config_type is float else value
    return value


def _shown(value: Any) -> str:
    return str(OmegaConf.to_object(value) if isinstance(value, ListConfig) else value)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The command line's `key=value` overrides, --freeze-blocks included."""
    opts = list(args.opts)
    if args.freeze_blocks is not None:
        opts.append(f"model.backbone.net.freeze_blocks={args.freeze_blocks}")
    return opts


def check_lr_schedule(cfg: Any) -> None:
    """The lr schedule (after the recipe scaled it) builds: fvcore wants milestones that increase and stay below
    num_updates. A short run whose milestones were rounded onto each other (e.g. [3, 3] of 4 updates) is one error
    line here, before anything is written, not a traceback when the trainer starts."""
    try:
        instantiate(cfg.lr_multiplier)
    except (ValueError, AssertionError) as err:
        sched = cfg.lr_multiplier.get("scheduler", None) if hasattr(cfg.lr_multiplier, "get") else None
        shown = ""
        if sched is not None and sched.get("milestones", None) is not None:
            shown = f" (milestones {list(sched.milestones)}, num_updates {sched.get('num_updates', None)})"
        raise MaeTransferError(
            f"lr_multiplier.scheduler: {err}{shown}; milestones must increase and stay below num_updates. The "
            "schedule is a fraction of train.max_iter: for a short run keep the config's milestones and "
            "num_updates and change train.max_iter only") from None


# ----------------------------------------------------------------------------------------- datasets
def register_coco_json(split: str, json_path: str, image_root: str, use: str | None = None) -> tuple[str, list[str]]:
    """Check a COCO instances json + image folder (errors; invalid annotations and unreadable images skipped with
    a warning; `use` "train" / "eval": it must hold annotations for that) and register it, minus what was
    skipped, under a name derived from the paths; returns (name, class names in category-id order, detectron2's
    contiguous-id order)."""
    key = hashlib.sha1(f"{Path(json_path).resolve()}|{Path(image_root).resolve()}".encode()).hexdigest()[:8]
    name = f"{split}_{Path(json_path).stem}_{key}"
    return name, register_coco_instances_checked(name, json_path, image_root, use)


def check_builtin_coco(name: str) -> None:
    meta = MetadataCatalog.get(name)
    json_file, image_root = meta.get("json_file"), meta.get("image_root")
    if json_file is None:  # not a COCO-json builtin (e.g. another registered dataset): nothing to check
        return
    if not Path(json_file).is_file() or not Path(image_root).is_dir():
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
        raise MaeTransferError(
            f"dataset {name!r} not found: expected {json_file} and {image_root} (set $DETECTRON2_DATASETS, now "
            f"{root!r}, or pass --train-json/--train-images/--val-json/--val-images)"
        )


def setup_datasets(cfg: Any, train_json: str | None = None, train_images: str | None = None,
                   val_json: str | None = None, val_images: str | None = None,
                   splits: Sequence[str] = ("train", "val"), evaluate: bool = True) -> None:
    """Point the config's loaders at the user's datasets and set num_classes from them; the builtin datasets
    the run reads (`splits`: "train", "val") must exist, and the user's must hold annotations to train on and,
    when the run evaluates, to evaluate against."""
    classes: dict[str, list[str]] = {}
    uses = {"train": "train" if "train" in splits else None,
            "val": "eval" if "val" in splits and evaluate and "evaluator" in cfg.dataloader else None}
    for split, js, im in (("train", train_json, train_images), ("val", val_json, val_images)):
        if bool(js) != bool(im):
            raise MaeTransferError(f"--{split}-json and --{split}-images must be given together")
        if js:
            name, classes[split] = register_coco_json(split, js, im, uses[split])
            if split == "train":
                cfg.dataloader.train.dataset.names = name
            else:
                cfg.dataloader.test.dataset.names = name
                if "evaluator" in cfg.dataloader:
                    cfg.dataloader.evaluator.dataset_name = name
    if "train" in classes and "val" in classes and classes["train"] != classes["val"]:
        raise MaeTransferError(
            f"train and val category lists differ ({len(classes['train'])} vs {len(classes['val'])} classes)"
        )
    loaders = {"train": cfg.dataloader.train, "val": cfg.dataloader.test}
    for split in splits:
        if split not in classes:
            check_builtin_coco(loaders[split].dataset.names)
    found = classes.get("train") or classes.get("val")
    if found:
        cfg.model.roi_heads.num_classes = len(found)
        logger.info("num_classes = %d from the dataset json (%s)", len(found), ", ".join(found[:10]))
    if "evaluator" in cfg.dataloader and cfg.dataloader.evaluator.get("output_dir", None) is None:
        cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")


# ----------------------------------------------------------------------------------------- checkpoints
def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The checkpoint named in `output_dir/last_checkpoint` (written by detectron2's checkpointer), if any: the
    det task kind's checkpoint marker (mae_transfer/task_kinds.py)."""
    return checkpoint_named_by(output_dir, "last_checkpoint")


def eval_weights(eval_only: str, output_dir: str, init_checkpoint: str) -> str:
    """The weights `--eval-only [CKPT]` evaluates: CKPT; without a value ("auto") the output folder's last
    checkpoint, else train.init_checkpoint."""
    if eval_only != "auto":
        return eval_only
    return last_checkpoint(output_dir) or init_checkpoint


def check_eval_weights(args: argparse.Namespace, output_dir: str, init_checkpoint: str) -> None:
    """--eval-only / --infer need weights: a given file that exists, else the output folder's last checkpoint or
    train.init_checkpoint. Without any, one error line (a randomly initialised detector's AP is no result)."""
    flag, given = ("--eval-only", "--eval-only CKPT, ") if args.eval_only else ("--infer", "")
    if args.eval_only and args.eval_only != "auto":
        if "://" not in args.eval_only and not Path(args.eval_only).is_file():
            raise MaeTransferError(f"--eval-only: checkpoint not found: {args.eval_only}")
        return
    if not (last_checkpoint(output_dir) or init_checkpoint):
        raise MaeTransferError(f"{flag}: no weights to use: no checkpoint in {output_dir} (no last_checkpoint file) "
                               f"and train.init_checkpoint is empty; pass {given}"
                               "the --output-dir of a training run, or train.init_checkpoint=CKPT")


def prepare_init_checkpoint(path: str, model: Any, output_dir: str, allow_pickle: bool = False) -> str:
    """Return a file DetectionCheckpointer can load for `path`, converting foreign formats on the fly.

    detectron2 files (ours, ViTDet's `backbone.net.*`, .pkl model-zoo files) are used as they are after
    a shape check; anything else goes through `mae_transfer.checkpoint` (our MAE pretraining, official
    MAE, timm, HF, mmseg, ...), whose load report is logged, and is written as a detectron2 file
    (`backbone.net.<key>`) in `output_dir`. Files are read safely unless `allow_pickle`.
    """
    if not path:
        return path
    local = local_checkpoint_path(path)
    if not Path(local).exists():
        raise MaeTransferError(f"init checkpoint not found: {path}")
    if local.endswith((".pkl", ".pyth")):  # model-zoo pickles: detectron2's own reader (needs the opt-in)
        if not allow_pickle:
            raise ckpt.needs_pickle_error(local, "a pickle file (detectron2 model-zoo format)")
        return local
    raw = ckpt.read_checkpoint(local, allow_pickle)
    try:
        state, meta = ckpt.unwrap_state_dict(raw, path)
        if ckpt.detect_format(state, meta) == "detectron2_vitdet":
            _check_shapes(state, model, path)
            logger.info("init checkpoint %s: detectron2 format, loaded by DetectionCheckpointer", path)
            return local
        state, report = ckpt.load_backbone_state_dict(raw, _unwrap(model).backbone.net)
    except MaeTransferError as err:
        msg = str(err)
        raise MaeTransferError(msg if str(path) in msg else f"init checkpoint {path}: {msg}") from None
    report.source = path
    logger.info("init checkpoint converted for detectron2:\n%s", report)
    missing = [k for k in report.missing if "rel_pos" not in k]
    if missing:
        logger.warning("backbone keys missing from %s (model init kept): %s", path, ", ".join(missing))
    out = Path(output_dir) / "init_checkpoint_detectron2.pth"
    ckpt.to_detectron2(state, out)
    return str(out)


def _check_shapes(state: dict, model: Any, path: str) -> None:
    own = _unwrap(model).state_dict()
    common = [k for k in state if k in own]
    if not common:
        raise MaeTransferError(f"init checkpoint {path}: none of its keys match the model (wrong checkpoint?)")
    for k in common:
        if k.startswith("backbone.net.") and tuple(state[k].shape) != tuple(own[k].shape):
            raise MaeTransferError(
                f"init checkpoint {path}: {k} has shape {tuple(state[k].shape)}, the model expects "
                f"{tuple(own[k].shape)} (a different ViT size?)"
            )


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


_CLASS_SCORES = re.compile(r"roi_heads\.box_predictor(\.\d+)?\.cls_score\.weight")


def checkpoint_num_classes(state: dict) -> int | None:
    """The classes a detector's weights were trained for (its box classifier scores them and the background);
    None for weights without a box classifier (a backbone)."""
    for key, value in state.items():
        if _CLASS_SCORES.fullmatch(key) and len(getattr(value, "shape", ())) == 2:
            return int(value.shape[0]) - 1
    return None


# what loads the weights -> how a detector of another class count is answered (None: a warning)
_CLASS_COUNT_ADVICE = {
    "--eval-only": "evaluate it with the data it was trained on (--val-json)",
    "--infer": "run it with the config and data it was trained on",
    "--resume": "resume with the data it was trained on, or start a new output folder",
    "train.init_checkpoint": ("start from its backbone only, or pass train.new_class_heads=True to fine-tune it on "
                              "these classes with its class-specific layers started from scratch"),
}


def class_count_check(model: Any, purpose: str, new_class_heads: bool = False) -> Callable[[dict, str], None]:
    """A `check_model` for `detection_checkpointer`: weights of a detector trained for another number of classes
    than the dataset's would load with their class-specific layers skipped (random), so evaluating, running or
    resuming them is an error. As train.init_checkpoint it is an error too unless `new_class_heads`
    (`train.new_class_heads=True`: detectron2's way of fine-tuning a detector on new classes, said in a warning)."""
    expected = int(_unwrap(model).roi_heads.num_classes)

    def check(state: dict, path: str) -> None:
        found = checkpoint_num_classes(state)
        if found is None or found == expected:
            return
        what = (f"{purpose} checkpoint {path} is a detector of {found} classes, the dataset has {expected} "
                "(model.roi_heads.num_classes)")
        advice = _CLASS_COUNT_ADVICE[purpose]
        if purpose == "train.init_checkpoint" and new_class_heads:
            logger.warning("%s: its class-specific layers are not loaded and start from scratch", what)
            return
        raise MaeTransferError(f"{what}; its class-specific layers would be random: {advice}")

    return check


# ----------------------------------------------------------------------------------------- a study's input check

def check_study_task(args: Any, check: Check) -> None:
    """A study cell's config (with its overrides, every unknown key reported) and data, before anything runs
    (`TaskKind.input_check` of its kind in mae_transfer/task_kinds.py)."""
    what = f"config {Path(args.config).name}"
    opts = [*args.opts, f"model.backbone.net.freeze_blocks={args.freeze_blocks}"]  # as detection.setup adds it
    try:
        cfg = load_config(args.config, opts)
    except MaeTransferError:  # it stops at the first unknown key: load once per override to find every one
        cfg = check(what, load_config, args.config, [])
        if cfg is not None:
            valid = [item for item in opts if check(what, load_config, args.config, [item]) is not None]
            cfg = load_config(args.config, valid)
    for split, loader in (("train", "train"), ("val", "test")):
        json_file, images = getattr(args, f"{split}_json"), getattr(args, f"{split}_images")
        if bool(json_file) != bool(images):
            check(None, raise_problem, f"--{split}-json and --{split}-images must be given together")
        elif json_file:
            check(None, check_file, tool_path(json_file), f"--{split}-json file")
            check(None, check_folder, tool_path(images), f"--{split}-images folder")
        elif cfg is not None:  # the config's builtin dataset (coco_2017_*, under $DETECTRON2_DATASETS)
            names = cfg.dataloader[loader].dataset.names
            for dataset in [names] if isinstance(names, str) else names:
                check(None, check_builtin_coco, dataset)
