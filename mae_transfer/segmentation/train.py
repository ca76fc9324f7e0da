"""UperNet with our ViT in MMSegmentation (mmengine Runner): what tools/train_seg.py runs.

Before the Runner starts, bad input becomes one clear error: `--cfg-options` keys must exist in the config and
values keep their type, every image must have a label map of its size that only uses the config's classes and
ignore index (`check_split`, facts cached per file), an --eval-only checkpoint must fit the model; unreadable
training images are left out with one warning. Checkpoints are read safely
(`segmentation.checkpoint.use_safe_mmengine_loading`). A resumed run continues exactly (`ExactResume`). The final
validation (training) or the test (--eval-only) is written to `eval_metrics.json` (`mae_transfer.metrics`).

Framework glue, not the MAE core: importing this module imports mmseg through `backbones.mmseg`, which first
makes it importable on mmcv-lite and registers our backbone and LLRD constructor.
"""
from __future__ import annotations

import argparse
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

import backbones.mmseg  # noqa: F401  (first: the mmcv-lite workaround, then registers MAEViT + the LLRD constructor)
from mae_transfer.pictures import side_by_side, with_legend

# isort: split
from mmengine.dist import all_reduce, get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.runner import Runner
from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS
from PIL import Image

from mae_transfer.errors import MaeTransferError
from mae_transfer.metrics import write_eval_metrics
from mae_transfer.recipe import announce_recipe
from mae_transfer.segmentation import recipe as segmentation_recipe
from mae_transfer.segmentation.checkpoint import use_safe_mmengine_loading
from mae_transfer.segmentation.checks import (
    build_config,
    check_data,
    check_eval_checkpoint,
    check_init_checkpoint,
    last_checkpoint,
)
from mae_transfer.segmentation.resume import ExactResume, seed_training_samples

logger = logging.getLogger("mae_transfer.segmentation")

TOOL = "tools/train_seg.py"
TRAINING_KEYS = ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler",
                 "val_dataloader", "val_cfg", "val_evaluator")


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


class StopOnNonFiniteLoss(Hook):
    """Stops training at the first iteration whose loss is NaN or inf, as detectron2's trainer and the runtime loop
    do: one error line naming the iteration and the last good checkpoint. It runs before mmengine's CheckpointHook
    (priority VERY_LOW), so no checkpoint of the diverged weights is saved and `last_checkpoint` keeps naming the
    last good one; no eval_metrics.json is written."""

    priority = "VERY_HIGH"

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        losses = {k: v.detach() for k, v in (outputs or {}).items() if "loss" in k and isinstance(v, torch.Tensor)}
        if not losses:
            return
        bad = {k: float(v.float().mean()) for k, v in losses.items() if not bool(torch.isfinite(v).all())}
        flag = torch.tensor(float(bool(bad)), device=next(iter(losses.values())).device)
        if get_world_size() > 1:  # every process stops at the same iteration (a lone one would hang the others)
            all_reduce(flag, op="max")
        if flag.item() == 0:
            return
        iteration = runner.iter + 1  # mmengine's count, as its log prints it: after_train_iter comes before +1
        what = ", ".join(f"{k} {v}" for k, v in bad.items()) or "on another process"
        last = last_checkpoint(runner.work_dir) or "none saved yet"
        raise MaeTransferError(
            f"training stopped: non-finite loss at iteration {iteration} ({what}); last good checkpoint: {last}. "
            "Lower optim_wrapper.optimizer.lr or set optim_wrapper.clip_grad (e.g. dict(max_norm=1.0)), then --resume.")


CLASS_IOU = "IoU."  # ClassIoUMetric's key prefix of a class's IoU


@METRICS.register_module()
class ClassIoUMetric(IoUMetric):
    """mmseg's IoUMetric that also returns each class's IoU (`IoU.<class>`, percent, NaN for a class in neither
    prediction nor ground truth): mmseg's own only logs them in a table, and a short run's mIoU hides which class
    was found."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        if self.format_only or not results:
            return metrics
        intersect = sum(r[0] for r in results).double()
        union = sum(r[1] for r in results).double()
        for name, iou in zip(self.dataset_meta["classes"], (intersect / union * 100).tolist(), strict=True):
            metrics[CLASS_IOU + name] = round(iou, 2)
        return metrics


def use_class_iou(cfg: Any) -> None:
    """Evaluators of type IoUMetric become ClassIoUMetric (same arguments): eval_metrics.json gets the per-class IoU."""
    for key in ("val_evaluator", "test_evaluator"):
        evaluator = cfg.get(key)
        if isinstance(evaluator, dict) and evaluator.get("type") == "IoUMetric":
            evaluator["type"] = "ClassIoUMetric"


def write_seg_metrics(work_dir: str, metrics: dict[str, Any], split: str, iteration: int | None,
                      checkpoint: str | None) -> Path:
    """eval_metrics.json of an IoUMetric result: mIoU, aAcc and mAcc (percent); the split and ClassIoUMetric's
    per-class IoU ({class: percent}) in `details`."""
    per_class = {k[len(CLASS_IOU):]: float(v) for k, v in metrics.items() if k.startswith(CLASS_IOU)}
    summary = {k: float(v) for k, v in metrics.items() if not k.startswith(CLASS_IOU)}
    details: dict[str, Any] = {"split": split}
    if per_class:
        details["IoU"] = per_class
    return write_eval_metrics(work_dir, "seg", summary, tool=TOOL, iteration=iteration, checkpoint=checkpoint,
                              details=details)


PICTURE_MIN = 512  # px: the short side of each panel, at least (small images enlarged by a whole factor, nearest)


def titled_picture(drawn: np.ndarray, sample: Any, meta: dict, has_gt: bool) -> Image.Image:
    """mmseg's ground truth | prediction drawing, enlarged, each panel under its title, the classes it shows in a
    legend below (class colours alone do not say which class is which)."""

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


def save_pictures(runner: Any, cfg: Any, pictures_dir: str, limit: int) -> list[str]:
    """Ground truth | prediction (dataset palette, alpha blend), titled, with a legend of the classes shown, for the
    first `limit` test images."""
    import mmcv
    from mmseg.visualization import SegLocalVisualizer

    if not is_main_process() or limit <= 0:
        return []
    os.makedirs(pictures_dir, exist_ok=True)
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
                out_file = os.path.join(pictures_dir, Path(sample.img_path).stem + ".png")
                has_gt = "gt_sem_seg" in sample
                # mmseg hands its drawing only to a file (or a display): read it back to add titles and a legend
                vis.add_datasample(Path(sample.img_path).stem, image, sample, draw_gt=has_gt, draw_pred=True,
                                   out_file=out_file, with_labels=False)
                drawn = np.asarray(Image.open(out_file).convert("RGB"))
                titled_picture(drawn, sample, meta, has_gt).save(out_file)
                written.append(out_file)
            if len(written) >= limit:
                break
    logger.info("wrote %d pictures (ground truth | prediction) to %s", len(written), pictures_dir)
    return written


# ---------------------------------------------------------------------------------------- runs
TRAINING_SPLITS = ("train_dataloader", "val_dataloader", "test_dataloader")


def train(cfg: Any, data_checked: bool = False) -> tuple[Any, dict[str, float]]:
    """Train with the Runner; returns it and the final validation's metrics (written to eval_metrics.json)."""
    if not data_checked:
        check_data(cfg, TRAINING_SPLITS)
    seed_training_samples(cfg)
    use_class_iou(cfg)
    runner = Runner.from_cfg(cfg)
    final = FinalValidation()
    runner.register_hook(final, priority="LOWEST")
    runner.register_hook(ExactResume(), priority="LOWEST")
    runner.register_hook(StopOnNonFiniteLoss())  # VERY_HIGH: before the CheckpointHook of the same iteration
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
    use_class_iou(cfg)
    runner = Runner.from_cfg(cfg)
    iteration = check_eval_checkpoint(runner.model, checkpoint, allow_pickle)
    metrics = runner.test()
    logger.info("test metrics: %s", metrics)
    if is_main_process():
        write_seg_metrics(cfg.work_dir, metrics, "test", iteration, checkpoint)
    return runner, metrics


def run(args: argparse.Namespace) -> dict[str, float]:
    """One tools/train_seg.py run: training, or --eval-only [CKPT] (no value: the work dir's last checkpoint);
    then --pictures-dir. Returns the final metrics."""
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
        check_data(cfg, TRAINING_SPLITS)  # bad data is one error line, before the recipe table
        if int(os.environ.get("RANK", "0")) == 0:
            announce_recipe(recipe, cfg.work_dir)
        runner, metrics = train(cfg, data_checked=True)
    if args.pictures_dir:
        save_pictures(runner, cfg, args.pictures_dir, args.num_pictures)
    return metrics
