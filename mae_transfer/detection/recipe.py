"""The recipe of a tools/train_det.py run on the GPUs it has (`mae_transfer.recipe`), read from and written to a
detectron2 LazyConfig, and gradient accumulation as a detectron2 trainer step.

The reference: `dataloader.train.total_batch_size` (ViTDet: 64) on `train.reference_world_size` GPUs (64: one
image per GPU). detectron2's loader splits its total batch over the processes, so the config's loader gets
world_size x images_per_gpu (one micro-batch of every process) and `train.accumulation` micro-batches make one
optimizer step: `AccumulatingTrainer` / `AccumulatingAMPTrainer`. One iteration stays one optimizer step, so
max_iter, milestones, eval and checkpoint periods keep their meaning.

Each micro-batch's loss is divided by the accumulation count: every micro-batch weighs the same. detectron2
normalises some losses over what the batch holds (box classification / regression over all sampled proposals,
the mask loss over all foreground proposals); accumulated, they are normalised within each micro-batch, so an
image with fewer foreground proposals weighs a little more per proposal than in one large batch (equal when
the counts per micro-batch are equal). The RPN losses are normalised per image and come out the same.

Framework glue: imports detectron2.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from torch.nn.parallel import DistributedDataParallel

from mae_transfer import recipe as rcp
from mae_transfer.detection.checks import load_config, overrides_of
from mae_transfer.errors import MaeTransferError

TOOL = "tools/train_det.py"
BATCH_KEY = "dataloader.train.total_batch_size"
NORM_KEYS = ("norm", "conv_norm")
DATASETS = {"coco_2017_train": "COCO train2017"}


# ---------------------------------------------------------------------------------------------- reading
def reference(cfg: Any, config: str) -> rcp.Reference:
    """The config's reference run: its total batch on `train.reference_world_size` GPUs (None: its own batch on
    one process)."""
    total = rcp.positive(BATCH_KEY, cfg.dataloader.train.total_batch_size)
    world = cfg.train.get("reference_world_size", None)
    if world is not None:
        rcp.positive("train.reference_world_size", world)
        if total % world:
            raise MaeTransferError(f"{config}: {BATCH_KEY}={total} is not a multiple of "
                                   f"train.reference_world_size={world}")
    return rcp.Reference(total, world)


def check_batch_override(opts: Sequence[str], cfg: Any, config: str) -> None:
    """A bare `dataloader.train.total_batch_size=B` on a config with a published reference is refused: the lr and
    schedule of that config are tuned for its batch. --total-batch B scales them (linear rule)."""
    for item in opts:
        key, _, value = item.partition("=")
        if key.strip() == BATCH_KEY and cfg.train.get("reference_world_size", None) is not None:
            raise MaeTransferError(
                f"{item}: {config} is a published recipe for a total batch of its own (lr, max_iter, warmup and "
                f"milestones are tuned for it); use --total-batch {value} to scale them by the linear rule, or "
                "--images-per-gpu K / --num-gpus N to fit it on your GPUs (the same recipe, gradient accumulation)")


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    items = node.items() if hasattr(node, "items") else enumerate(node) if isinstance(node, (list, tuple)) or \
        type(node).__name__ == "ListConfig" else ()
    for key, value in items:
        here = f"{path}.{key}" if path else str(key)
        yield here, value
        yield from _walk(value, here)


def norm_layers(cfg: Any) -> str:
    """The norm layers the model config names (pyramid and heads) and whether they depend on the batch."""
    found: dict[str, list[str]] = {}
    for path, value in _walk(cfg.model):
        if path.rsplit(".", 1)[-1] in NORM_KEYS and isinstance(value, str) and value:
            found.setdefault(value, []).append(path.rsplit(".", 1)[0])
    if not found:
        return "none configured"
    parts = [f"{kind} in {', '.join(sorted({_place(w) for w in where}))}" for kind, where in found.items()]
    batch_dependent = [kind for kind in found if "BN" in kind and kind != "FrozenBN"]
    return "; ".join(parts) + (f": {', '.join(batch_dependent)} statistics per micro-batch" if batch_dependent
                               else ": batch-independent")


def _place(path: str) -> str:
    name = path.rsplit(".", 1)[-1]
    return "pyramid" if name == "backbone" else name.replace("_head", "").replace("_", " ")


def warmup_iters(cfg: Any, max_iter: int) -> int:
    warmup = cfg.lr_multiplier.get("warmup_length", 0.0) if hasattr(cfg.lr_multiplier, "get") else 0.0
    return int(round(float(warmup) * max_iter))


def effective_milestones(cfg: Any, max_iter: int) -> list[int] | None:
    """The step-decay iterations the schedule applies: detectron2 evaluates it at iter / max_iter, and
    MultiStepParamScheduler turns that into milestones of `num_updates` steps."""
    sched = cfg.lr_multiplier.get("scheduler", None) if hasattr(cfg.lr_multiplier, "get") else None
    if sched is None or sched.get("milestones", None) is None:
        return None
    updates = sched.get("num_updates", None) or max_iter
    return [int(round(m * max_iter / updates)) for m in sched.milestones]


def plan(cfg: Any, config: str, world_size: int, device: str, images_per_gpu: int | None = None,
         total_batch: int | None = None, activation_checkpointing: bool = False,
         train_json: str | None = None) -> rcp.Recipe:
    """The recipe of this config on `world_size` processes on `device` (the config as loaded, overrides applied);
    `train_json`: the run trains on that COCO json instead of the config's dataset (the plan reads no data, so it
    counts no epochs for it)."""
    ref = reference(cfg, config)
    max_iter = rcp.positive("train.max_iter", cfg.train.max_iter)
    amp = "fp16" if cfg.train.amp.enabled and device.startswith("cuda") else "none"
    names = cfg.dataloader.train.dataset.get("names", None)
    recipe = rcp.plan(
        tool=TOOL, config=config, device=device, reference=ref, world_size=world_size, lr=float(cfg.optimizer.lr),
        max_iter=max_iter, warmup_iters=warmup_iters(cfg, max_iter), amp=amp,
        activation_checkpointing=activation_checkpointing or bool(
            cfg.model.backbone.net.get("grad_checkpointing", False)),
        images_per_gpu=images_per_gpu, total_batch=total_batch, milestones=effective_milestones(cfg, max_iter),
        eval_period=int(cfg.train.eval_period), checkpoint_period=int(cfg.train.checkpointer.period),
        dataset=None if train_json else DATASETS.get(names) if isinstance(names, str) else None)
    if train_json:
        recipe.notes.append(f"epochs: not counted, the training set is --train-json {train_json} (the plan reads no "
                            f"data); epochs = {recipe.max_iter} optimizer steps x {recipe.total_batch} images / its "
                            "image count")
    if recipe.images_per_gpu != ref.images_per_gpu and cfg.model.get("roi_heads", None) is not None:
        recipe.notes.append(
            f"{recipe.images_per_gpu} image(s) per micro-batch instead of the reference's {ref.images_per_gpu} per "
            "GPU changes the loss weighting, not only speed: detectron2 averages the box losses over a micro-batch's "
            "sampled proposals and the mask loss over its foreground proposals, so each image's weight depends on "
            "what it shares a micro-batch with (equal only when the counts per image are equal)")
    recipe.norm_layers = recipe.reference["norm_layers"] = norm_layers(cfg)
    recipe.reference["amp"] = "fp16" if cfg.train.amp.enabled else "none"
    if amp == "fp16":
        recipe.amp_detail = ("fp16 autocast + GradScaler (detectron2's AMPTrainer); a run on a machine without a "
                             "CUDA GPU falls back to the CPU in fp32 (amp none)")
    elif cfg.train.amp.enabled:
        recipe.amp_detail = "the config asks for AMP (train.amp.enabled), but on the CPU detectron2 trains in fp32"
    else:
        recipe.amp_detail = "fp32 (train.amp.enabled=False)"
    return recipe


# ---------------------------------------------------------------------------------------------- applying
def apply(cfg: Any, recipe: rcp.Recipe) -> None:
    """Write the recipe into the config: the loader's batch (one micro-batch of every process), the accumulation
    count, and under --total-batch the linear rule (lr, max_iter, milestones, periods)."""
    cfg.dataloader.train.total_batch_size = recipe.world_size * recipe.images_per_gpu
    cfg.train.accumulation = recipe.accumulation
    if recipe.activation_checkpointing:
        cfg.model.backbone.net.grad_checkpointing = True
    if recipe.batch_scale == 1:
        return
    scale = recipe.batch_scale
    cfg.optimizer.lr = recipe.lr
    cfg.train.max_iter = recipe.max_iter
    sched = cfg.lr_multiplier.get("scheduler", None) if hasattr(cfg.lr_multiplier, "get") else None
    if sched is not None and sched.get("milestones", None) is not None:
        # milestones count in num_updates steps (a fraction of the run): scaled alike, the fractions stay
        sched.milestones = [rcp.scale_iters(int(m), scale) for m in sched.milestones]
        if sched.get("num_updates", None):
            sched.num_updates = rcp.scale_iters(int(sched.num_updates), scale)
    # warmup_length is a fraction of max_iter: unchanged, the warm-up scales with max_iter
    cfg.train.eval_period = recipe.eval_period
    cfg.train.checkpointer.period = recipe.checkpoint_period


def resolve(cfg: Any, args: argparse.Namespace, world_size: int, device: str) -> rcp.Recipe:
    """plan() from the command line's recipe flags (a bare batch override refused first), then apply() it to
    `cfg`."""
    check_batch_override(args.opts, cfg, args.config)
    recipe = plan(cfg, args.config, world_size, device, getattr(args, "images_per_gpu", None),
                  getattr(args, "total_batch", None), getattr(args, "activation_checkpointing", False),
                  getattr(args, "train_json", None))
    apply(cfg, recipe)
    return recipe


def plan_from_args(args: argparse.Namespace) -> rcp.Recipe:
    """--plan: the config with the command line's overrides, on --num-gpus x --num-machines processes, for the GPUs
    unless the config is pinned to the CPU (no data, no weights, no model)."""
    check_launcher()
    cfg = load_config(args.config, overrides_of(args))
    device = rcp.resolve_plan_device(cfg.train.device, args.num_gpus is not None, torch.cuda.is_available())
    world_size = (args.num_gpus or 1) * args.num_machines
    return resolve(cfg, args, world_size, device)


def check_launcher() -> None:
    """train_det.py starts its own processes (detectron2's `launch`: --num-gpus x --num-machines, which is the
    world size its plan and run use). Under torchrun each of the launcher's processes would be a separate
    1-process run of its own: refused, naming the flags to use instead."""
    value = os.environ.get("WORLD_SIZE")
    if value is not None and value.strip() not in ("", "0", "1"):
        raise MaeTransferError(
            f"WORLD_SIZE={value}: train_det.py is not run under torchrun (each of its processes would train alone); "
            "it starts its GPU processes itself: run it once per machine with --num-gpus G [--num-machines M "
            "--machine-rank R --dist-url tcp://HOST:PORT]")


def ddp_kwargs(cfg: Any) -> dict:
    """detectron2's create_ddp_model arguments: the config's, and on the CPU (gloo) no device ids and no fp16
    gradient compression."""
    kwargs = dict(cfg.train.ddp)
    if not str(cfg.train.device).startswith("cuda"):
        kwargs.update(device_ids=None, fp16_compression=False)
    return kwargs


# ---------------------------------------------------------------------------------------------- trainer step
class _Accumulation:
    """run_step over `accumulation` micro-batches: each loss / accumulation, DDP's gradient all-reduce only on the
    last backward (no_sync before), then the after_backward hooks (gradient clipping, on the accumulated gradient),
    the losses averaged over the micro-batches, one optimizer step (through the GradScaler under AMP)."""

    accumulation: int = 1

    def run_step(self) -> None:
        assert self.model.training, f"[{type(self).__name__}] model was changed to eval mode!"
        scaler = getattr(self, "grad_scaler", None)
        device_type = "cuda" if scaler is not None else "cpu"
        self.optimizer.zero_grad()
        sums: dict[str, torch.Tensor] = {}
        data_time = 0.0
        for micro in range(self.accumulation):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            reduce_now = micro == self.accumulation - 1 or not isinstance(self.model, DistributedDataParallel)
            with nullcontext() if reduce_now else self.model.no_sync():
                with torch.autocast(device_type, dtype=getattr(self, "precision", torch.float16),
                                    enabled=scaler is not None):
                    loss_dict = self.model(data)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    losses = sum(loss_dict.values()) / self.accumulation
                (scaler.scale(losses) if scaler is not None else losses).backward()
            for key, value in loss_dict.items():
                sums[key] = sums.get(key, 0.0) + value.detach()
        self.after_backward()
        self._write_metrics({k: v / self.accumulation for k, v in sums.items()}, data_time)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()


class AccumulatingTrainer(_Accumulation, SimpleTrainer):
    """detectron2's SimpleTrainer, one optimizer step over `accumulation` micro-batches."""

    def __init__(self, model: Any, data_loader: Any, optimizer: Any, accumulation: int, **kwargs: Any) -> None:
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.accumulation = rcp.positive("accumulation", accumulation)


class AccumulatingAMPTrainer(_Accumulation, AMPTrainer):
    """detectron2's AMPTrainer (fp16 autocast + GradScaler), one optimizer step over `accumulation` micro-batches."""

    def __init__(self, model: Any, data_loader: Any, optimizer: Any, accumulation: int, **kwargs: Any) -> None:
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.accumulation = rcp.positive("accumulation", accumulation)


def build_trainer(model: Any, data_loader: Any, optimizer: Any, amp: bool, accumulation: int = 1) -> SimpleTrainer:
    """detectron2's own trainers without accumulation; ours with it."""
    if accumulation == 1:
        return (AMPTrainer if amp else SimpleTrainer)(model, data_loader, optimizer)
    return (AccumulatingAMPTrainer if amp else AccumulatingTrainer)(model, data_loader, optimizer, accumulation)
