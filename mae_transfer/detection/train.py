"""Mask R-CNN with our plain ViT in detectron2 (LazyConfig, ViTDet recipe): what tools/train_det.py runs.

Follows detectron2's tools/lazyconfig_train_net.py (SimpleTrainer / AMPTrainer, hooks, COCOEvaluator,
DetectionCheckpointer), top to bottom: `setup` (the checks of `mae_transfer.detection.checks`, run once from here:
`key=value` overrides exist and keep the config value's type, user datasets are validated before detectron2 sees
them, the weights to evaluate exist, the lr schedule builds), the trainer's hooks, `do_test` / `do_train` /
`do_eval_only`, and `run`. Additions: `train.init_checkpoint` in any format `mae_transfer.checkpoint` reads is
converted on the fly, loaded detectors must have the dataset's class count, optional gradient clipping (a trainer
hook), exact resume (`mae_transfer.detection.resume`), a clean stop on a non-finite loss, and the final evaluation
(training with evaluation, or --eval-only) written to `eval_metrics.json` (`mae_transfer.metrics`).

Framework glue, not the MAE core: importing this module imports detectron2 and registers our backbone there.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.engine import HookBase, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import backbones.detectron2  # noqa: F401  (registers build_mae_vit_backbone for yacs configs)
from mae_transfer.data import IMAGE_SUFFIXES
from mae_transfer.detection import recipe as detection_recipe
from mae_transfer.detection.checkpoint import detection_checkpointer, local_checkpoint_path
from mae_transfer.detection.checks import (
    check_eval_weights,
    check_lr_schedule,
    class_count_check,
    eval_weights,
    last_checkpoint,
    load_config,
    overrides_of,
    prepare_init_checkpoint,
    setup_datasets,
)
from mae_transfer.detection.pictures import ground_truth_records, prediction_picture
from mae_transfer.detection.resume import ExactResume, build_train_loader, run_seed
from mae_transfer.errors import MaeTransferError
from mae_transfer.metrics import write_eval_metrics
from mae_transfer.recipe import announce_recipe

logger = logging.getLogger("mae_transfer.detection")

TOOL = "tools/train_det.py"
CLIP_TYPES = ("full_model", "norm", "value")


# ----------------------------------------------------------------------------------------- setup: every check, once
def setup(args: argparse.Namespace) -> Any:
    """The config of one tools/train_det.py run: overrides checked, --freeze-blocks / --output-dir applied, CPU
    fallback, detectron2's default_setup (logging, seed, config.yaml), datasets registered and checked."""
    cfg = load_config(args.config, overrides_of(args))
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("no CUDA device: running on CPU in fp32")
        cfg.train.device = "cpu"
    if cfg.train.device == "cpu" and cfg.train.amp.enabled:
        cfg.train.amp.enabled = False  # detectron2's AMPTrainer needs CUDA
    if args.eval_only or args.infer:  # the weights to use exist, before anything is written
        check_eval_weights(args, cfg.train.output_dir, cfg.train.init_checkpoint)
    else:  # training: the recipe on this world size, printed and saved first
        recipe = detection_recipe.resolve(cfg, args, comm.get_world_size(), str(cfg.train.device))
        check_lr_schedule(cfg)
        if comm.is_main_process():
            announce_recipe(recipe, cfg.train.output_dir)
    default_setup(cfg, argparse.Namespace(config_file=args.config, eval_only=bool(args.eval_only or args.infer)))
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="mae_transfer")
    setup_datasets(cfg, args.train_json, args.train_images, args.val_json, args.val_images,
                   splits=() if args.infer else ("val",) if args.eval_only else ("train", "val"),
                   evaluate=bool(args.eval_only) or cfg.train.eval_period > 0)
    return cfg


# ----------------------------------------------------------------------------------------- gradient clipping
def clip_gradients(optimizer: torch.optim.Optimizer, clip_type: str, clip_value: float, norm_type: float = 2.0) -> None:
    """full_model: one norm over all parameters; norm / value: each parameter on its own (detectron2's
    SOLVER.CLIP_GRADIENTS types)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip_type == "full_model":
        torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type)
    elif clip_type == "norm":
        for p in params:
            torch.nn.utils.clip_grad_norm_(p, clip_value, norm_type)
    elif clip_type == "value":
        torch.nn.utils.clip_grad_value_(params, clip_value)
    else:
        raise MaeTransferError(f"train.clip_grad.clip_type must be full_model, norm or value, got {clip_type!r}")


class ClipGradients(HookBase):
    """Clips the gradients between the backward pass and the optimizer step (detectron2's `after_backward`
    hook point). Under AMP the gradients are unscaled first, torch's recipe for clipping with a GradScaler
    (whose step then does not unscale again)."""

    def __init__(self, clip_type: str, clip_value: float, norm_type: float = 2.0) -> None:
        if clip_type not in CLIP_TYPES:
            raise MaeTransferError(f"train.clip_grad.clip_type must be full_model, norm or value, got {clip_type!r}")
        self.clip_type, self.clip_value, self.norm_type = clip_type, float(clip_value), float(norm_type)

    def after_backward(self) -> None:
        scaler = getattr(self.trainer, "grad_scaler", None)
        if scaler is not None:
            scaler.unscale_(self.trainer.optimizer)
        clip_gradients(self.trainer.optimizer, self.clip_type, self.clip_value, self.norm_type)


def clip_grad_hook(cfg: Any) -> ClipGradients | None:
    """The hook for `train.clip_grad` (dict(enabled, clip_type, clip_value, norm_type)), None when disabled."""
    clip = cfg.train.get("clip_grad", None)
    if clip is None or not clip.enabled:
        return None
    return ClipGradients(clip.clip_type, clip.clip_value, clip.get("norm_type", 2.0))


# ----------------------------------------------------------------------------------------- train / test
def build_model(cfg: Any) -> Any:
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %.2fM parameters (%.2fM trainable)", n_all / 1e6, n_train / 1e6)
    return model


def do_test(cfg: Any, model: Any) -> dict:
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    return ret


def write_det_metrics(output_dir: str, results: dict, iteration: int | None, checkpoint: str | None) -> Path:
    """eval_metrics.json of a COCOEvaluator result: AP^box and AP^mask, every COCO number in `details`. COCO's AP
    is undefined (NaN) when the model made no detection: null, with that reason."""
    ap = {task: float(results.get(task, {}).get("AP", math.nan)) for task in ("bbox", "segm")}
    names = {"bbox": "AP_box", "segm": "AP_mask"}
    # without detections COCOEvaluator gives NaN box APs and no mask results at all
    none_detected = "bbox" in results and not math.isfinite(ap["bbox"])
    reasons = {names[task]: ("no detections on the evaluation images (COCO AP is undefined without any)"
                             if none_detected else f"the evaluator gave no {task} results")
               for task, value in ap.items() if not math.isfinite(value)}
    return write_eval_metrics(output_dir, "det", {names[task]: value for task, value in ap.items()}, tool=TOOL,
                              iteration=iteration, checkpoint=checkpoint, reasons=reasons,
                              details={task: dict(values) for task, values in results.items()})


def resume_checkpoint(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint `--resume [CKPT]` continues from: CKPT, or ("auto") the output folder's last one if any."""
    if resume not in (None, "auto"):
        if not Path(resume).is_file():
            raise MaeTransferError(f"--resume: checkpoint not found: {resume}")
        return resume
    last = last_checkpoint(output_dir) if resume == "auto" else None
    if last is not None and not Path(last).is_file():
        raise MaeTransferError(f"--resume: {Path(output_dir) / 'last_checkpoint'} names {last}, which does not exist; "
                               "pass the checkpoint to resume from (--resume CKPT)")
    return last


def do_train(cfg: Any, resume: str | None = None, allow_pickle: bool = False) -> dict:
    """Train (from train.init_checkpoint, or resumed: `resume` "auto" = the output folder's last checkpoint,
    else a checkpoint path; exactly, see `mae_transfer.detection.resume`); returns the last evaluation, also
    written to eval_metrics.json."""
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    clipper = clip_grad_hook(cfg)
    seed = run_seed(cfg.train.seed)
    train_loader = build_train_loader(cfg, seed)
    model = create_ddp_model(model, **detection_recipe.ddp_kwargs(cfg))
    trainer = detection_recipe.build_trainer(model, train_loader, optimizer, cfg.train.amp.enabled,
                                             cfg.train.get("accumulation", 1))
    resume_from = resume_checkpoint(resume, cfg.train.output_dir)
    checkpointer = detection_checkpointer(
        model, cfg.train.output_dir, allow_pickle, trainer=trainer,
        check_model=class_count_check(model, "--resume" if resume_from else "train.init_checkpoint",
                                      bool(cfg.train.get("new_class_heads", False))))
    evaluation: dict = {}

    def evaluate() -> dict:
        evaluation.clear()
        evaluation.update(do_test(cfg, model))
        return dict(evaluation)

    exact_resume = ExactResume(seed, train_loader)
    trainer.register_hooks([
        hooks.IterationTimer(),
        exact_resume,  # before the checkpointer: its state is saved after each iteration
        clipper,
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        # eval_period 0 disables evaluation (detectron2's EvalHook would still evaluate after the last iter)
        hooks.EvalHook(cfg.train.eval_period, evaluate) if cfg.train.eval_period > 0 else None,
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    if resume_from:
        checkpointer.load(resume_from)  # model, optimizer, scheduler, iteration, seed and data position
        start_iter = trainer.iter + 1
        logger.info("resuming from %s at iteration %d", resume_from, start_iter)
        if not exact_resume.restored:
            logger.warning("%s holds no data-stream position or run seed (written before exact resume): training "
                           "continues, on other images and random draws than an uninterrupted run", resume_from)
    else:
        init = prepare_init_checkpoint(cfg.train.init_checkpoint, model, cfg.train.output_dir, allow_pickle)
        checkpointer.load(init, checkpointables=[])
        start_iter = 0
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as err:
        last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else "none saved yet"
        raise MaeTransferError(
            f"training stopped: non-finite loss ({str(err).splitlines()[0]}); last good checkpoint: {last}. "
            "Lower optimizer.lr or enable train.clip_grad.enabled=True, then --resume."
        ) from None
    if evaluation and comm.is_main_process():
        # iterations the evaluated weights were trained for (a resume at or past max_iter trains none)
        write_det_metrics(cfg.train.output_dir, evaluation, max(start_iter, cfg.train.max_iter),
                          checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None)
    return evaluation


def do_eval_only(cfg: Any, weights: str, allow_pickle: bool = False) -> dict:
    """Evaluate `weights` (any format prepare_init_checkpoint reads); the result also goes to eval_metrics.json."""
    model = create_ddp_model(build_model(cfg))
    checkpointer = detection_checkpointer(model, cfg.train.output_dir, allow_pickle,
                                          check_model=class_count_check(model, "--eval-only"))
    extra = checkpointer.load(prepare_init_checkpoint(weights, model, cfg.train.output_dir, allow_pickle)) or {}
    results = do_test(cfg, model)
    if results and comm.is_main_process():
        trained = extra.get("iteration")  # detectron2 stores the index of the last iteration run
        write_det_metrics(cfg.train.output_dir, results, trained + 1 if isinstance(trained, int) else None,
                          weights or None)
    return results


# ----------------------------------------------------------------------------------------- pictures
def do_infer(cfg: Any, images: Sequence[str], weights: str, pictures_dir: str | None, score_thresh: float,
             allow_pickle: bool = False, top_k: int = 10) -> list[str]:
    """Run the model on images (or folders of them) and save one picture each, `<stem>_pred.png`: the ground
    truth (when the test dataset, e.g. --val-json, annotates the image) beside the prediction (the `top_k` best
    detections after class-agnostic NMS with a score of at least `score_thresh`), boxes, masks and labels drawn
    by detectron2's Visualizer at a size where the labels read."""
    files: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise MaeTransferError(f"--infer: image not found: {p}")
    if not files:
        raise MaeTransferError("--infer: no images found")
    if not weights:
        raise MaeTransferError("--infer needs trained weights: none in train.output_dir and no train.init_checkpoint")
    model = build_model(cfg).eval()
    checkpointer = detection_checkpointer(model, cfg.train.output_dir, allow_pickle,
                                          check_model=class_count_check(model, "--infer"))
    checkpointer.load(prepare_init_checkpoint(weights, model, cfg.train.output_dir, allow_pickle))
    augs = T.AugmentationList([instantiate(a) for a in cfg.dataloader.test.mapper.augmentations])
    fmt = cfg.dataloader.train.mapper.image_format
    metadata = MetadataCatalog.get(cfg.dataloader.test.dataset.names
                                   if isinstance(cfg.dataloader.test.dataset.names, str) else "__unused")
    truth = ground_truth_records(cfg)
    out_dir = Path(pictures_dir or os.path.join(cfg.train.output_dir, "vis"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        try:
            image = utils.read_image(str(f), format=fmt)
        except Exception as err:  # noqa: BLE001  (PIL raises many types for unreadable files)
            raise MaeTransferError(f"--infer: cannot read image {f}: {err}") from None
        h, w = image.shape[:2]
        aug_in = T.AugInput(image)
        augs(aug_in)
        tensor = torch.as_tensor(aug_in.image.transpose(2, 0, 1).copy()).to(cfg.train.device)
        with torch.no_grad():
            inst = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
        record = truth.get(str(f.resolve()))
        picture = prediction_picture(utils.convert_image_to_rgb(image, fmt), inst, metadata, record, score_thresh,
                                     top_k)
        dst = out_dir / f"{f.stem}_pred.png"
        picture.save(dst)
        logger.info("%s: %d detections, top %d >= %.2f drawn%s -> %s", f, len(inst), top_k, score_thresh,
                    " beside the ground truth" if record is not None else "", dst)
        written.append(str(dst))
    return written


# ----------------------------------------------------------------------------------------- entry point
def run(args: argparse.Namespace) -> Any:
    """One process of tools/train_det.py (detectron2's `launch` starts one per GPU): --infer, --eval-only or
    training. URL-valued weights are fetched (or refused) before the model is built."""
    cfg = setup(args)
    out, init = cfg.train.output_dir, cfg.train.init_checkpoint
    if args.infer:
        weights = last_checkpoint(out) or init
        return do_infer(cfg, args.infer, local_checkpoint_path(weights) if weights else weights, args.pictures_dir,
                        args.score_thresh, args.allow_pickle, args.top_k)
    if args.eval_only:
        weights = local_checkpoint_path(eval_weights(args.eval_only, out, init),
                                        override="train.init_checkpoint" if args.eval_only == "auto" else "--eval-only")
        return do_eval_only(cfg, weights, args.allow_pickle)
    resuming = args.resume not in (None, "auto") or (args.resume == "auto" and last_checkpoint(out) is not None)
    if init and not resuming:
        cfg.train.init_checkpoint = local_checkpoint_path(init)
    return do_train(cfg, args.resume, args.allow_pickle)
