"""What the GPU acceptance rows measure (harnesses/gpu_acceptance.py runs each in a process of its own): train
iterations of the real configs on synthetic inputs, as the tools run them (detectron2's trainers, mmseg's
train_step with the optim wrapper train_seg.py builds, the MAE pretraining step), and for --rehearse each row's
set-up without a GPU. Each returns plain numbers (seconds, peak memory, the last loss) for the report.
"""
from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from statistics import median
from typing import Any

from harnesses.timing import peak_memory_gib, timed_steps
from mae_transfer.errors import MaeTransferError


def synthetic_detection_batch(images: int, size: int, num_classes: int, instances: int = 8,
                              seed: int = 0) -> list[dict[str, Any]]:
    """detectron2 training inputs: random size x size RGB images, each with `instances` boxes and an octagon
    polygon mask filling each box (the box of the polygon is the box), random classes."""
    import numpy as np
    import torch
    from detectron2.structures import Boxes, Instances, PolygonMasks

    gen = torch.Generator().manual_seed(seed)
    angles = np.arange(8) * (2 * math.pi / 8)
    batch = []
    for _ in range(images):
        boxes, polygons = [], []
        for _ in range(instances):
            w, h = (int(v) for v in torch.randint(size // 16, size // 2, (2,), generator=gen))
            x0 = int(torch.randint(0, size - w, (1,), generator=gen))
            y0 = int(torch.randint(0, size - h, (1,), generator=gen))
            boxes.append([x0, y0, x0 + w, y0 + h])
            xs, ys = x0 + w / 2 * (1 + np.cos(angles)), y0 + h / 2 * (1 + np.sin(angles))
            polygons.append([np.stack([xs, ys], 1).reshape(-1)])
        target = Instances((size, size))
        target.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        target.gt_classes = torch.randint(0, num_classes, (instances,), generator=gen)
        target.gt_masks = PolygonMasks(polygons)
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
        batch.append({"image": image, "height": size, "width": size, "instances": target})
    return batch


def measure_detection(config: str | Path, device: str, images_per_iter: int = 1, warmup: int = 3, iters: int = 10,
                      deadline: float = math.inf, accumulation: int = 1) -> dict[str, Any]:
    """Mask R-CNN train iterations of a LazyConfig as tools/train_det.py runs them: detectron2's AMPTrainer
    (fp16 autocast + GradScaler) when train.amp.enabled, else SimpleTrainer; with `accumulation` > 1 our
    accumulating trainer step (`images_per_iter` images per micro-batch, one optimizer step per iteration); input
    size = the pyramid's square_pad (1024 for the ViTDet configs)."""
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    import backbones.detectron2  # noqa: F401  (our backbone in detectron2's registry)
    from mae_transfer.detection.recipe import build_trainer

    cfg = LazyConfig.load(str(config))
    size = int(cfg.model.backbone.square_pad)
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    # The schedule's value at iteration 0 (inside the warm-up), as in the first iterations of a real run: a
    # randomly initialised Mask R-CNN at the full rate can reach a non-finite loss within these few steps.
    factor = instantiate(cfg.lr_multiplier)(0.0)
    for group in optimizer.param_groups:
        group["lr"] *= factor
    amp = bool(cfg.train.amp.enabled)
    batch = synthetic_detection_batch(images_per_iter, size, int(cfg.model.roi_heads.num_classes))
    trainer = build_trainer(model, itertools.repeat(batch), optimizer, amp, accumulation)
    with EventStorage(0) as storage:
        counter = itertools.count()

        def step() -> None:
            trainer.iter = storage.iter = next(counter)
            trainer.run_step()

        times = timed_steps(step, device, warmup, iters, deadline)
        loss = storage.history("total_loss").latest()
    sec = median(times)
    return dict(config=str(config), image_size=size, images_per_iter=images_per_iter, accumulation=accumulation,
                amp="fp16 autocast + GradScaler (AMPTrainer)" if amp else "fp32", iters_timed=len(times),
                sec_per_iter=sec, sec_per_image=sec / (images_per_iter * accumulation), total_loss=loss,
                peak_mem_gib=peak_memory_gib(device))


def measure_segmentation(config: str | Path, device: str, amp: bool = False, warmup: int = 3, iters: int = 10,
                         deadline: float = math.inf) -> dict[str, Any]:
    """UperNet train iterations (model.train_step: data preprocessor, forward, backward, optimizer step) of an
    mmseg config at its crop size and per-GPU batch; amp=True swaps in mmengine's AmpOptimWrapper (fp16)."""
    import torch

    import backbones.mmseg  # noqa: F401  (first: the mmcv-lite stand-in; registers our backbone and the LLRD constructor)
    # isort: split
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(config))
    for part in (cfg.model.neck, cfg.model.decode_head, cfg.model.auxiliary_head):
        part.norm_cfg = dict(type="BN", requires_grad=True)  # one process: no SyncBN (as tools/train_seg.py)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).to(device)
    model.train()
    from mae_transfer.segmentation.recipe import optim_wrapper_amp

    wrapper_cfg = optim_wrapper_amp(copy.deepcopy(cfg.optim_wrapper), "fp16" if amp else "none")  # as train_seg.py
    optim_wrapper = build_optim_wrapper(model, wrapper_cfg)
    h, w = cfg.crop_size
    batch = int(cfg.train_dataloader.batch_size)
    num_classes = int(cfg.model.decode_head.num_classes)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(batch):
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, h, w), generator=gen))
        samples.append(sample)
    data = dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for _ in range(batch)],
                data_samples=samples)
    losses: list[float] = []

    def step() -> None:
        log_vars = model.train_step(data, optim_wrapper)
        losses.append(float(log_vars["loss"].detach()))

    times = timed_steps(step, device, warmup, iters, deadline)
    if not all(math.isfinite(v) for v in losses):
        raise MaeTransferError(f"non-finite segmentation loss: {losses}")
    sec = median(times)
    return dict(config=str(config), crop=[h, w], images_per_iter=batch, optim_wrapper=wrapper_cfg.type,
                iters_timed=len(times), sec_per_iter=sec, img_per_s=batch / sec, loss=losses[-1],
                peak_mem_gib=peak_memory_gib(device))


def measure_pretraining(config: str | Path, device: str, warmup: int = 3, iters: int = 10,
                        deadline: float = math.inf) -> dict[str, Any]:
    """MAE pretraining steps as mae_transfer.runtime runs them (autocast from the config's amp, GradScaler for
    fp16, fused AdamW on pretraining's parameter groups) at the config's per-process batch, random images."""
    import torch

    from mae_transfer.config import load_config
    from mae_transfer.hardware import autocast_dtype, resolve_amp
    from mae_transfer.pretraining import build_mae, build_optimizer, resolve_config
    from mae_transfer.runtime import optimizer_step

    cfg = resolve_config({**load_config(config), "data_path": "unused", "output_dir": "unused"})
    torch.manual_seed(0)
    model = build_mae(cfg).to(device)
    model.train()
    batch, img = cfg["batch_size"], cfg["img_size"]
    optimizer = build_optimizer(model, cfg, cfg["blr"] * batch / 256)
    amp = resolve_amp(cfg["amp"], device)
    dtype = autocast_dtype(amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    imgs = torch.randn(batch, 3, img, img, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    losses: list[torch.Tensor] = []

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _, _ = model(imgs, model.make_noise(batch, device, gen))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        optimizer_step(optimizer, scaler)
        losses.append(loss.detach())

    times = timed_steps(step, device, warmup, iters, deadline)
    values = [float(v) for v in losses]
    if not all(math.isfinite(v) for v in values):
        raise MaeTransferError(f"non-finite MAE loss: {values}")
    sec = median(times)
    return dict(config=str(config), encoder=cfg["encoder"], batch=batch, amp=amp if dtype is not None else "fp32",
                iters_timed=len(times), sec_per_iter=sec, img_per_s=batch / sec, loss=values[-1],
                peak_mem_gib=peak_memory_gib(device))


# ---------------------------------------------------------------------------------------------- rehearsal set-ups
def build_detection_model(config: str | Path) -> int:
    """A detection row's set-up without its GPU: the LazyConfig's model and optimizer; returns the parameters."""
    from detectron2.config import LazyConfig, instantiate

    import backbones.detectron2  # noqa: F401

    cfg = LazyConfig.load(str(config))
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    instantiate(cfg.optimizer)
    return sum(p.numel() for p in model.parameters())


def build_segmentation_model(config: str | Path, amp: bool = False) -> int:
    """A segmentation row's set-up without its GPU: the mmseg config's UperNet and the optimizer wrapper
    train_seg.py builds (fp16 AmpOptimWrapper for amp=True); returns the parameters."""
    import torch

    import backbones.mmseg  # noqa: F401  (first: the mmcv-lite stand-in mmseg's import needs)
    # isort: split
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import OPTIM_WRAPPERS
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from mae_transfer.segmentation.recipe import optim_wrapper_amp

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(config))
    for part in (cfg.model.neck, cfg.model.decode_head, cfg.model.auxiliary_head):
        part.norm_cfg = dict(type="BN", requires_grad=True)
    model = MODELS.build(cfg.model)
    wrapper_cfg = optim_wrapper_amp(copy.deepcopy(cfg.optim_wrapper), "fp16" if amp else "none")
    if amp and not torch.cuda.is_available():
        # mmengine builds an AmpOptimWrapper on a GPU only: without one, its class is looked up in the registry
        # and the rest (parameter groups, LLRD constructor, optimizer) is built as the fp32 wrapper.
        if OPTIM_WRAPPERS.get(wrapper_cfg.type) is None:
            raise MaeTransferError(f"mmengine has no optim wrapper {wrapper_cfg.type!r}")
        wrapper_cfg = copy.deepcopy(cfg.optim_wrapper)
    build_optim_wrapper(model, wrapper_cfg)
    return sum(p.numel() for p in model.parameters())


def build_pretraining_model(config: str | Path) -> int:
    """A pretraining row's set-up without its GPU: the MAE model and its optimizer; returns the parameters."""
    from mae_transfer.config import load_config
    from mae_transfer.pretraining import build_mae, build_optimizer, resolve_config

    cfg = resolve_config({**load_config(config), "data_path": "unused", "output_dir": "unused"})
    model = build_mae(cfg)
    build_optimizer(model, cfg, cfg["blr"])
    return sum(p.numel() for p in model.parameters())
