#!/usr/bin/env python
"""Train / evaluate / run Mask R-CNN with our plain ViT in detectron2 (LazyConfig, ViTDet recipe).

  python tools/train_det.py --config configs/coco_mask_rcnn_vit_b.py train.init_checkpoint=mae.pth
  python tools/train_det.py --config configs/coco_mask_rcnn_vit_tiny_cpu.py \
      --train-json D/trainval.json --train-images D/images --val-json ... --val-images ...
  python tools/train_det.py --config ... --eval-only train.init_checkpoint=output/model_final.pth
  python tools/train_det.py --config ... --resume            # continue from output_dir/last_checkpoint
  python tools/train_det.py --config ... --infer a.jpg b.jpg --output vis/   # pictures with boxes + masks
  python tools/train_det.py --config ... --num-gpus 8 [--num-machines 2 --machine-rank 0 --dist-url tcp://...]

Follows detectron2's tools/lazyconfig_train_net.py (SimpleTrainer / AMPTrainer, hooks, COCOEvaluator,
DetectionCheckpointer). Additions: `key=value` overrides are checked to exist, user datasets are
validated before detectron2 sees them, `train.init_checkpoint` in any format `mae_transfer.checkpoint`
reads is converted on the fly, optional gradient clipping, a clean stop on a non-finite loss.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mae_transfer  # noqa: E402,F401  (compat shims before detectron2)
import backbones.detectron2  # noqa: E402,F401  (registers build_mae_vit_backbone)
from mae_transfer.cli import run_cli  # noqa: E402
from mae_transfer.detectron2_data import register_coco_instances_checked  # noqa: E402
from mae_transfer.errors import MaeTransferError  # noqa: E402
from mae_transfer.framework_checkpoints import detection_checkpointer, local_checkpoint_path  # noqa: E402

logger = logging.getLogger("mae_transfer.train_det")

_MISSING = object()
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="LazyConfig file, e.g. configs/coco_mask_rcnn_vit_b.py")
    p.add_argument("--resume", action="store_true", help="continue from train.output_dir/last_checkpoint")
    p.add_argument("--eval-only", action="store_true", help="evaluate train.init_checkpoint (or the last checkpoint)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="trust the checkpoints given: let them hold pickled objects (e.g. model-zoo .pkl files)")
    p.add_argument("--freeze-blocks", type=int, default=None,
                   help="freeze patch embed + the first k ViT blocks (-1: the whole ViT)")
    p.add_argument("--train-json", help="COCO-format annotation json for training (instead of coco_2017_train)")
    p.add_argument("--train-images", help="image folder for --train-json")
    p.add_argument("--val-json", help="COCO-format annotation json for evaluation (instead of coco_2017_val)")
    p.add_argument("--val-images", help="image folder for --val-json")
    p.add_argument("--infer", nargs="+", metavar="IMAGE", help="run the model on these images (or folders)")
    p.add_argument("--output", help="folder for --infer pictures (default: train.output_dir/vis)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="--infer: minimum score drawn")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="e.g. tcp://host:port for multi-machine runs")
    p.add_argument("opts", nargs="*", default=[], help="config overrides key=value, e.g. train.max_iter=100")
    return p


# ----------------------------------------------------------------------------------------- config
def load_config(path: str, overrides: Sequence[str]) -> Any:
    """LazyConfig.load + apply_overrides, refusing keys that do not exist in the config."""
    from detectron2.config import LazyConfig
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise MaeTransferError(f"config file not found: {path}")
    cfg = LazyConfig.load(path)
    overrides = [o for o in overrides if o != "--"]
    for item in overrides:
        if "=" not in item:
            raise MaeTransferError(f"config override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            known = ", ".join(sorted(map(str, node.keys()))) if hasattr(node, "keys") else ""
            raise MaeTransferError(
                f"config override {key!r}: no such key in {path}" + (f" (keys under {parent!r}: {known})" if known else "")
            )
    return LazyConfig.apply_overrides(cfg, overrides)


# ----------------------------------------------------------------------------------------- datasets
def register_coco_json(split: str, json_path: str, image_root: str) -> tuple[str, list[str]]:
    """Check a COCO instances json + image folder (errors; invalid annotations skipped with a warning)
    and register it, minus the skipped annotations, under a name derived from the paths; returns
    (name, class names in category-id order, detectron2's contiguous-id order)."""
    key = hashlib.sha1(f"{Path(json_path).resolve()}|{Path(image_root).resolve()}".encode()).hexdigest()[:8]
    name = f"{split}_{Path(json_path).stem}_{key}"
    return name, register_coco_instances_checked(name, json_path, image_root)


def check_builtin_coco(name: str) -> None:
    from detectron2.data import MetadataCatalog

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


def setup_datasets(cfg: Any, args: argparse.Namespace) -> None:
    """Point the config's loaders at the chosen datasets and set num_classes from them."""
    classes: dict[str, list[str]] = {}
    for split, js, im in (("train", args.train_json, args.train_images), ("val", args.val_json, args.val_images)):
        if bool(js) != bool(im):
            raise MaeTransferError(f"--{split}-json and --{split}-images must be given together")
        if js:
            name, classes[split] = register_coco_json(split, js, im)
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
    needed = [] if args.infer else ([cfg.dataloader.test.dataset.names] if args.eval_only else
                                    [cfg.dataloader.train.dataset.names, cfg.dataloader.test.dataset.names])
    for split, name in zip(("train", "val") if not args.eval_only else ("val",), needed):
        if split not in classes:
            check_builtin_coco(name)
    found = classes.get("train") or classes.get("val")
    if found:
        cfg.model.roi_heads.num_classes = len(found)
        logger.info("num_classes = %d from the dataset json (%s)", len(found), ", ".join(found[:10]))
    if "evaluator" in cfg.dataloader and cfg.dataloader.evaluator.get("output_dir", None) is None:
        cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")


# ----------------------------------------------------------------------------------------- checkpoints
def prepare_init_checkpoint(path: str, model: Any, output_dir: str, allow_pickle: bool = False) -> str:
    """Return a file DetectionCheckpointer can load for `path`, converting foreign formats on the fly.

    detectron2 files (ours, ViTDet's `backbone.net.*`, .pkl model-zoo files) are used as they are after
    a shape check; anything else goes through `mae_transfer.checkpoint` (our MAE pretraining, official
    MAE, timm, HF, mmseg, ...), whose load report is logged, and is written as a detectron2 file
    (`backbone.net.<key>`) in `output_dir`. Files are read safely unless `allow_pickle`.
    """
    from mae_transfer import checkpoint as ckpt

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


# ----------------------------------------------------------------------------------------- train / test
def do_test(cfg: Any, model: Any) -> dict:
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    return ret


def build_optimizer(cfg: Any, model: Any) -> Any:
    from detectron2.config import instantiate
    from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping
    import torch

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    clip = cfg.train.get("clip_grad", None)
    if clip is not None and clip.enabled:
        value, norm_type = float(clip.clip_value), float(clip.get("norm_type", 2.0))
        if clip.clip_type == "full_model":  # one global norm over all parameters
            def clipper(params: Any) -> None:
                torch.nn.utils.clip_grad_norm_(list(params), value, norm_type)
            cls = _generate_optimizer_class_with_gradient_clipping(type(optimizer), global_clipper=clipper)
        elif clip.clip_type in ("norm", "value"):
            def per_param(p: Any) -> None:
                if clip.clip_type == "norm":
                    torch.nn.utils.clip_grad_norm_(p, value, norm_type)
                else:
                    torch.nn.utils.clip_grad_value_(p, value)
            cls = _generate_optimizer_class_with_gradient_clipping(type(optimizer), per_param_clipper=per_param)
        else:
            raise MaeTransferError(f"train.clip_grad.clip_type must be full_model, norm or value, got {clip.clip_type!r}")
        optimizer.__class__ = cls  # detectron2's own way (maybe_add_gradient_clipping) of adding clipping
    return optimizer


def build_model(cfg: Any) -> Any:
    from detectron2.config import instantiate

    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %.2fM parameters (%.2fM trainable)", n_all / 1e6, n_train / 1e6)
    return model


def do_train(args: argparse.Namespace, cfg: Any) -> dict:
    from detectron2.config import instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.utils import comm

    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = detection_checkpointer(model, cfg.train.output_dir, args.allow_pickle, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        # eval_period 0 disables evaluation (detectron2's EvalHook would still evaluate after the last iter)
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)) if cfg.train.eval_period > 0 else None,
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    resuming = args.resume and checkpointer.has_checkpoint()
    init = "" if resuming else prepare_init_checkpoint(cfg.train.init_checkpoint, model, cfg.train.output_dir,
                                                       args.allow_pickle)
    checkpointer.resume_or_load(init, resume=args.resume)
    start_iter = trainer.iter + 1 if resuming else 0
    if resuming:
        logger.info("resuming from %s at iteration %d", checkpointer.get_checkpoint_file(), start_iter)
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as err:
        last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else "none saved yet"
        raise MaeTransferError(
            f"training stopped: non-finite loss ({str(err).splitlines()[0]}); last good checkpoint: {last}. "
            "Lower optimizer.lr or enable train.clip_grad.enabled=True, then --resume."
        ) from None
    return {}


def do_eval_only(cfg: Any, allow_pickle: bool = False) -> dict:
    from detectron2.engine.defaults import create_ddp_model

    model = build_model(cfg)
    model = create_ddp_model(model)
    checkpointer = detection_checkpointer(model, cfg.train.output_dir, allow_pickle)
    init = cfg.train.init_checkpoint or (checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else "")
    checkpointer.load(prepare_init_checkpoint(init, model, cfg.train.output_dir, allow_pickle))
    return do_test(cfg, model)


def do_infer(cfg: Any, images: Sequence[str], output: str, score_thresh: float, allow_pickle: bool = False) -> list[str]:
    """Run the model on images and save pictures with boxes and masks (detectron2 Visualizer)."""
    import torch
    from detectron2.config import instantiate
    from detectron2.data import MetadataCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T
    from detectron2.utils.visualizer import ColorMode, Visualizer

    files: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise MaeTransferError(f"--infer: image not found: {p}")
    if not files:
        raise MaeTransferError("--infer: no images found")
    model = build_model(cfg).eval()
    checkpointer = detection_checkpointer(model, cfg.train.output_dir, allow_pickle)
    weights = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else cfg.train.init_checkpoint
    if not weights:
        raise MaeTransferError("--infer needs trained weights: none in train.output_dir and no train.init_checkpoint")
    checkpointer.load(prepare_init_checkpoint(weights, model, cfg.train.output_dir, allow_pickle))
    augs = T.AugmentationList([instantiate(a) for a in cfg.dataloader.test.mapper.augmentations])
    fmt = cfg.dataloader.train.mapper.image_format
    metadata = MetadataCatalog.get(cfg.dataloader.test.dataset.names
                                   if isinstance(cfg.dataloader.test.dataset.names, str) else "__unused")
    out_dir = Path(output or os.path.join(cfg.train.output_dir, "vis"))
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
        inst = inst[inst.scores >= score_thresh]
        rgb = utils.convert_image_to_rgb(image, fmt)
        vis = Visualizer(rgb, metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(inst)
        dst = out_dir / f"{f.stem}_pred.png"
        vis.save(str(dst))
        logger.info("%s: %d instances >= %.2f -> %s", f, len(inst), score_thresh, dst)
        written.append(str(dst))
    return written


# ----------------------------------------------------------------------------------------- entry points
def setup(args: argparse.Namespace) -> Any:
    import torch

    opts = list(args.opts)
    if args.freeze_blocks is not None:
        opts.append(f"model.backbone.net.freeze_blocks={args.freeze_blocks}")
    cfg = load_config(args.config, opts)
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("no CUDA device: running on CPU in fp32")
        cfg.train.device = "cpu"
    if cfg.train.device == "cpu" and cfg.train.amp.enabled:
        cfg.train.amp.enabled = False  # detectron2's AMPTrainer needs CUDA
    from detectron2.engine import default_setup

    default_setup(cfg, argparse.Namespace(config_file=args.config, eval_only=args.eval_only or bool(args.infer)))
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="mae_transfer")
    setup_datasets(cfg, args)
    resuming = args.resume and Path(cfg.train.output_dir, "last_checkpoint").is_file()
    if cfg.train.init_checkpoint and not resuming:  # a URL is fetched (or refused) before the model is built
        cfg.train.init_checkpoint = local_checkpoint_path(cfg.train.init_checkpoint)
    return cfg


def worker(args: argparse.Namespace) -> Any:
    cfg = setup(args)
    if args.infer:
        return do_infer(cfg, args.infer, args.output, args.score_thresh, args.allow_pickle)
    if args.eval_only:
        return do_eval_only(cfg, args.allow_pickle)
    return do_train(args, cfg)


def main(argv: Sequence[str] | None = None) -> int:
    from detectron2.engine import launch

    args = build_parser().parse_intermixed_args(argv)  # key=value overrides and flags in any order
    if args.num_gpus * args.num_machines > 1:
        launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    else:
        worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
