"""UperNet with our ViT in MMSegmentation (mmengine Runner): what tools/train_seg.py runs.

Before the Runner starts, bad input becomes one clear error: `--cfg-options` keys must exist in the config,
data folders must exist and hold images, sampled label maps may only use the config's classes and ignore
index, an --eval-only checkpoint must fit the model. Checkpoints are read safely
(`framework_checkpoints.use_safe_mmengine_loading`). The final validation (training) or the test (--eval-only)
is written to `eval_metrics.json` (`mae_transfer.metrics`).

Framework glue, not the MAE core: importing this module imports mmseg through `backbones.mmseg`, which first
makes it importable on mmcv-lite and registers our backbone and LLRD constructor.
"""
from __future__ import annotations

import argparse
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import backbones.mmseg  # noqa: F401  (mmcv-lite workaround, then registers MAEViT + the LLRD constructor)
import numpy as np
import torch
from mmengine.config import Config, DictAction
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.runner import Runner
from PIL import Image

from mae_transfer import segmentation_recipe
from mae_transfer.data import IMAGE_SUFFIXES
from mae_transfer.errors import MaeTransferError
from mae_transfer.framework_checkpoints import read_mmengine_checkpoint, use_safe_mmengine_loading
from mae_transfer.metrics import write_eval_metrics
from mae_transfer.paths import resolve_path
from mae_transfer.recipe import announce_recipe

logger = logging.getLogger("mae_transfer.segmentation")

TOOL = "tools/train_seg.py"
LABEL_FILES_CHECKED = 20  # label maps read per split to validate label values (first N, sorted)
TRAINING_KEYS = ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler",
                 "val_dataloader", "val_cfg", "val_evaluator")


# ---------------------------------------------------------------------------------------- config
def _lookup(node: Any, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(node, (list, tuple)):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                return False
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        else:
            return False
    return True


def apply_cfg_options(cfg: Any, options: list[str], config_path: str) -> None:
    """Merge `key=value` overrides; every key must already exist in the config (typos fail loudly)."""
    if not options:
        return
    parsed: dict[str, Any] = {}
    action = DictAction(option_strings=["--cfg-options"], dest="cfg_options")
    for item in options:
        if "=" not in item:
            raise MaeTransferError(f"--cfg-options: expected KEY=VALUE, got {item!r}")
        ns = argparse.Namespace()
        action(None, ns, [item])
        parsed.update(ns.cfg_options)
    for key in parsed:
        if not _lookup(cfg._cfg_dict, key.split(".")):
            raise MaeTransferError(f"--cfg-options: unknown config key {key!r} (not in {config_path})")
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


def check_data(cfg: Any, split_keys: Sequence[str]) -> None:
    """Data roots/folders exist, hold images, and sampled label maps only use known label values.
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
        img_dir = os.path.join(root, prefix.get("img_path", ""))
        seg_dir = os.path.join(root, prefix.get("seg_map_path", ""))
        for what, folder in (("img_path", img_dir), ("seg_map_path", seg_dir)):
            if not os.path.isdir(folder):
                raise MaeTransferError(f"data folder not found: {folder} ({key}.dataset.data_prefix.{what})")
        if not any(f.lower().endswith(IMAGE_SUFFIXES) for f in os.listdir(img_dir)):
            raise MaeTransferError(f"no images in {img_dir} ({key}.dataset.data_prefix.img_path)")
        reduce_zero = bool(ds.get("reduce_zero_label", False))
        # With reduce_zero_label, 0 becomes the ignore label and v -> v-1, so file values run 0..num_classes.
        allowed = set(range(num_classes + 1 if reduce_zero else num_classes)) | {ignore_index}
        suffix = ds.get("seg_map_suffix", ".png")
        labels = sorted(f for f in os.listdir(seg_dir) if f.endswith(suffix))[:LABEL_FILES_CHECKED]
        if not labels:
            raise MaeTransferError(f"no label maps (*{suffix}) in {seg_dir} ({key}.dataset.data_prefix.seg_map_path)")
        for name in labels:
            values = set(np.unique(np.asarray(Image.open(os.path.join(seg_dir, name)))).tolist())
            bad = sorted(values - allowed)
            if bad:
                hi = num_classes if reduce_zero else num_classes - 1
                raise MaeTransferError(
                    f"label values {bad[:8]} in {os.path.join(seg_dir, name)} are outside 0..{hi} and the ignore "
                    f"index {ignore_index} (num_classes={num_classes}, reduce_zero_label={reduce_zero}); "
                    "check model.decode_head.num_classes / ignore_index for this dataset")


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


def last_checkpoint(work_dir: str) -> str | None:
    """The checkpoint named in `work_dir/last_checkpoint` (written by mmengine's CheckpointHook), if any."""
    marker = Path(work_dir) / "last_checkpoint"
    if not marker.is_file():
        return None
    return os.path.join(work_dir, marker.read_text().strip())  # mmengine writes an absolute path; join keeps it


# ---------------------------------------------------------------------------------------- metrics, pictures
class FinalValidation(Hook):
    """Records the iteration training starts from (after a resume) and the metrics and iteration of the
    latest validation."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.start_iter: int | None = None
        self.metrics: dict[str, float] | None = None
        self.iteration: int | None = None

    def before_train(self, runner: Any) -> None:
        self.start_iter = runner.iter

    def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
        self.metrics, self.iteration = dict(metrics or {}), runner.iter


def write_seg_metrics(work_dir: str, metrics: dict[str, Any], split: str, iteration: int | None,
                      checkpoint: str | None) -> Path:
    """eval_metrics.json of an IoUMetric result: mIoU, aAcc and mAcc (percent), the split in `details`."""
    return write_eval_metrics(work_dir, "seg", {k: float(v) for k, v in metrics.items()}, tool=TOOL,
                              iteration=iteration, checkpoint=checkpoint, details={"split": split})


PICTURE_MIN = 512  # px: the short side of each panel, at least (small images enlarged by a whole factor, nearest)


def titled_picture(drawn: np.ndarray, sample: Any, meta: dict, has_gt: bool) -> Image.Image:
    """mmseg's ground truth | prediction drawing, enlarged, each panel under its title, the classes it shows in a
    legend below (class colours alone do not say which class is which)."""
    from mae_transfer.pictures import side_by_side, with_legend

    panels = [drawn[:, : drawn.shape[1] // 2], drawn[:, drawn.shape[1] // 2:]] if has_gt else [drawn]
    factor = max(1, -(-PICTURE_MIN // min(panels[0].shape[:2])))
    if factor > 1:
        panels = [np.repeat(np.repeat(p, factor, axis=0), factor, axis=1) for p in panels]
    titles = (["ground truth", "prediction"] if has_gt else ["prediction (no ground truth)"])
    maps = [sample.pred_sem_seg.data] + ([sample.gt_sem_seg.data] if has_gt else [])
    present = sorted(set().union(*(torch.unique(m).tolist() for m in maps)))
    classes, palette = meta["classes"], meta["palette"]
    entries = [(classes[i], palette[i]) for i in present if 0 <= i < len(classes)]
    return with_legend(side_by_side(panels, titles), entries)


def save_pictures(runner: Any, cfg: Any, out_dir: str, limit: int) -> list[str]:
    """Ground truth | prediction (dataset palette, alpha blend), titled, with a legend of the classes shown, for the
    first `limit` test images."""
    import mmcv
    from mmseg.visualization import SegLocalVisualizer

    if not is_main_process() or limit <= 0:
        return []
    os.makedirs(out_dir, exist_ok=True)
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
    loader = runner.build_dataloader(loader_cfg)
    meta = loader.dataset.metainfo
    vis = SegLocalVisualizer(name=f"pictures_{uuid.uuid4().hex[:8]}", alpha=0.5)
    vis.set_dataset_meta(classes=meta["classes"], palette=meta["palette"])
    model = runner.model
    model.eval()
    written = []
    with torch.no_grad():
        for batch in loader:
            for sample in model.test_step(batch):
                image = mmcv.imread(sample.img_path, channel_order="rgb")
                out_file = os.path.join(out_dir, Path(sample.img_path).stem + ".png")
                has_gt = "gt_sem_seg" in sample
                # mmseg hands its drawing only to a file (or a display): read it back to add titles and a legend
                vis.add_datasample(Path(sample.img_path).stem, image, sample, draw_gt=has_gt, draw_pred=True,
                                   out_file=out_file, with_labels=False)
                drawn = np.asarray(Image.open(out_file).convert("RGB"))
                titled_picture(drawn, sample, meta, has_gt).save(out_file)
                written.append(out_file)
            if len(written) >= limit:
                break
    logger.info("wrote %d pictures (ground truth | prediction) to %s", len(written), out_dir)
    return written


# ---------------------------------------------------------------------------------------- runs
def train(cfg: Any) -> tuple[Any, dict[str, float]]:
    """Train with the Runner; returns it and the final validation's metrics (written to eval_metrics.json)."""
    check_data(cfg, ["train_dataloader", "val_dataloader", "test_dataloader"])
    runner = Runner.from_cfg(cfg)
    final = FinalValidation()
    runner.register_hook(final, priority="LOWEST")
    runner.train()
    if final.start_iter is not None and final.start_iter >= runner.max_iters and runner.val_loop is not None:
        # mmengine saves the last checkpoint before the last validation: a run stopped between the two
        # resumes with nothing to train and would never validate. Validate now.
        logger.info("resumed at the last iteration (%d): running the final validation", final.start_iter)
        runner.val_loop.run()
    if final.metrics is not None and is_main_process():
        write_seg_metrics(cfg.work_dir, final.metrics, "val", final.iteration, last_checkpoint(cfg.work_dir))
    return runner, final.metrics or {}


def evaluate(cfg: Any, checkpoint: str, allow_pickle: bool = False) -> tuple[Any, dict[str, float]]:
    """Test a full train_seg.py checkpoint on the test set; returns the Runner and the metrics (written to
    eval_metrics.json)."""
    check_data(cfg, ["test_dataloader"])
    for key in TRAINING_KEYS:  # test only: mmengine wants the training parts all set or all None
        cfg[key] = None
    cfg.model.backbone.init_checkpoint = None  # the full checkpoint holds the backbone
    cfg.load_from = checkpoint
    cfg.resume = False
    runner = Runner.from_cfg(cfg)
    iteration = check_eval_checkpoint(runner.model, checkpoint, allow_pickle)
    metrics = runner.test()
    logger.info("test metrics: %s", metrics)
    if is_main_process():
        write_seg_metrics(cfg.work_dir, metrics, "test", iteration, checkpoint)
    return runner, metrics


def run(args: argparse.Namespace) -> dict[str, float]:
    """One tools/train_seg.py run: training, or --eval-only [CKPT] (no value: the work dir's last checkpoint);
    then --save-pictures. Returns the final metrics."""
    use_safe_mmengine_loading(args.allow_pickle)  # load_from, resume and --eval-only read through it
    cfg = build_config(args)
    if args.init_checkpoint:
        check_init_checkpoint(args.init_checkpoint)
    if args.eval_only:
        checkpoint = last_checkpoint(cfg.work_dir) if args.eval_only == "auto" else args.eval_only
        if checkpoint is None:
            raise MaeTransferError(f"--eval-only: no checkpoint in {cfg.work_dir} (no last_checkpoint file); "
                                   "pass --eval-only CKPT")
        runner, metrics = evaluate(cfg, checkpoint, args.allow_pickle)
    else:
        recipe = segmentation_recipe.resolve(cfg, args, segmentation_recipe.world_size_of(args),
                                             segmentation_recipe.run_device())
        segmentation_recipe.check_amp_support(recipe)
        if int(os.environ.get("RANK", "0")) == 0:
            announce_recipe(recipe, cfg.work_dir)
        runner, metrics = train(cfg)
    if args.save_pictures:
        save_pictures(runner, cfg, args.save_pictures, args.num_pictures)
    return metrics
