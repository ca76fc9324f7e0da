"""The recipe of a tools/train_seg.py run on the GPUs it has (`mae_transfer.recipe`), read from and written to an
mmengine config.

The reference: `train_dataloader.batch_size` images per GPU on `reference_world_size` GPUs (the ADE20K configs:
mmseg's MAE run, 8 x 2 = 16), under `amp` ('fp16' as mmseg's AmpOptimWrapper with a dynamic loss scale; 'bf16';
'none'). On another world size the per-GPU batch stays the reference's (or --images-per-gpu) and mmengine's
`optim_wrapper.accumulative_counts` fills the total batch.

Units: mmengine's IterBasedTrainLoop counts loader iterations (micro-batches), and param schedulers with
by_epoch=False, the val loop, CheckpointHook and LoggerHook step per loader iteration (mmengine 0.10.7:
runner/loops.py, hooks/param_scheduler_hook.py). The recipe's max_iter is in optimizer steps, so the config gets
train_cfg.max_iters, every scheduler's begin/end, val, checkpoint and log intervals x accumulation.

On the GPU, amp 'fp16' / 'bf16' makes the optim wrapper mmengine's AmpOptimWrapper (loss_scale 'dynamic', dtype
float16 / bfloat16; bf16 only where torch.cuda.is_bf16_supported()); on the CPU training stays fp32. In one
process mmengine turns SyncBN into BN (statistics over one process's micro-batch): the plan says so, and refuses
BN over a single image where UperHead's pool-scale-1 branch would see 1 value per channel (it cannot train).
Under a launcher (torchrun's WORLD_SIZE, Slurm's SLURM_NTASKS) --plan describes the processes it started.

Framework glue: reads mmengine Config objects (`build_config`, for --plan, comes from `segmentation.checks`).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch

from mae_transfer import recipe as rcp
from mae_transfer.errors import MaeTransferError
from mae_transfer.segmentation.checks import build_config

TOOL = "tools/train_seg.py"
BATCH_KEY = "train_dataloader.batch_size"
AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
NORM_PARTS = ("neck", "decode_head", "auxiliary_head")


# ---------------------------------------------------------------------------------------------- reading
def reference(cfg: Any, config: str) -> rcp.Reference:
    """The config's reference run: batch_size images per GPU on `reference_world_size` GPUs (None: its own batch
    on one process)."""
    per_gpu = rcp.positive(BATCH_KEY, cfg.train_dataloader.batch_size)
    world = cfg.get("reference_world_size", None)
    if world is not None:
        rcp.positive("reference_world_size", world)
    return rcp.Reference(per_gpu * (world or 1), world)


def check_batch_override(options: Sequence[str], cfg: Any, config: str) -> None:
    """A bare `--cfg-options train_dataloader.batch_size=K` on a config with a published reference is refused: it
    would change the total batch the lr and schedule are tuned for, silently."""
    for item in options:
        key, _, value = item.partition("=")
        if key.strip() == BATCH_KEY and cfg.get("reference_world_size", None) is not None:
            raise MaeTransferError(
                f"--cfg-options {item}: {config} is a published recipe ({BATCH_KEY} images per GPU on "
                f"reference_world_size={cfg.reference_world_size} GPUs); use --images-per-gpu {value} (the same "
                "total batch, gradient accumulation fills it) or --total-batch B (lr and schedule scaled by the "
                "linear rule)")


def amp_of(cfg: Any) -> str:
    amp = cfg.get("amp", None)
    if amp is None:
        amp = "fp16" if cfg.optim_wrapper.get("type", "OptimWrapper") == "AmpOptimWrapper" else "none"
    if amp not in rcp.AMP_MODES:
        raise MaeTransferError(f"amp must be one of {', '.join(rcp.AMP_MODES)}, got {amp!r}")
    return amp


def _schedulers(cfg: Any) -> list:
    sched = cfg.get("param_scheduler", None) or []
    return list(sched) if isinstance(sched, (list, tuple)) else [sched]


def warmup_iters(cfg: Any) -> int:
    for s in _schedulers(cfg):
        if s.get("type") == "LinearLR" and not s.get("by_epoch", True) and s.get("begin", 0) == 0:
            return int(s.get("end", 0))
    return 0


def poly_end(cfg: Any) -> int | None:
    for s in _schedulers(cfg):
        if s.get("type") == "PolyLR" and not s.get("by_epoch", True):
            return int(min(s.get("end", cfg.train_cfg.max_iters), cfg.train_cfg.max_iters))
    return None


def dataset_name(cfg: Any) -> str | None:
    ds = cfg.train_dataloader.get("dataset", {})
    if ds.get("type") == "ADE20KDataset" and ds.get("data_prefix", {}).get("img_path") == "images/training":
        return "ADE20K training"
    return None


def _batch_norms(kinds: set[str]) -> set[str]:
    return {k for k in kinds if "BN" in k and "Frozen" not in k}


def bn_images(kinds: set[str], world_size: int, images_per_gpu: int) -> int | None:
    """The images one batch-statistics computation covers: SyncBN over every process's micro-batch (one
    process: mmengine turns it into BN), BN over one process's micro-batch; None without batch norms."""
    batch_norms = _batch_norms(kinds)
    if not batch_norms:
        return None
    return world_size * images_per_gpu if world_size > 1 and batch_norms == {"SyncBN"} else images_per_gpu


def _norm_text(kinds: set[str], world_size: int, images_per_gpu: int) -> str:
    if not kinds:
        return "none configured"
    batch_norms = _batch_norms(kinds)
    if not batch_norms:
        return ", ".join(sorted(kinds))
    if world_size == 1:
        return f"BN over {images_per_gpu} image(s) (1 process: {'/'.join(sorted(batch_norms))} -> BN)"
    if batch_norms == {"SyncBN"}:
        return f"SyncBN over {world_size * images_per_gpu} images ({world_size} processes x {images_per_gpu})"
    return f"BN over {images_per_gpu} image(s) per process"


def norm_kinds(cfg: Any) -> set[str]:
    return {str(cfg.model[part].norm_cfg.type) for part in NORM_PARTS
            if cfg.model.get(part) and cfg.model[part].get("norm_cfg")}


def check_one_value_batch_norm(cfg: Any, config: str, recipe: rcp.Recipe) -> None:
    """A pyramid-pooling head (UPerHead, PSPHead) with pool scale 1 pools each image to a 1x1 map: its batch norm
    over one image sees 1 value per channel, which torch cannot train on ("Expected more than 1 value per channel
    when training", on the first iteration). No faithful way around it (BN in eval mode or another norm would be
    another model), so such a run is refused before it starts, --plan alike."""
    head = cfg.model.get("decode_head", None) or {}
    norm = head.get("norm_cfg", None)
    if 1 not in tuple(head.get("pool_scales", ()) or ()) or not norm or not _batch_norms({str(norm.type)}):
        return
    images = bn_images({str(norm.type)}, recipe.world_size, recipe.images_per_gpu)
    if images is None or images > 1:
        return
    per_gpu = recipe.total_batch // recipe.world_size
    if per_gpu > 1:
        choices = ", ".join(str(d) for d in rcp.divisors(per_gpu) if d > 1)
        instead = (f"use --images-per-gpu {choices} (gradient accumulation keeps the total batch of "
                   f"{recipe.total_batch})")
    else:
        instead = f"use a --total-batch of at least {2 * recipe.world_size} (2 images per process)"
    if norm.type == "SyncBN":
        instead += " or more processes (SyncBN then covers all of their images)"
    processes = f"{recipe.world_size} process{'es' if recipe.world_size > 1 else ''}"
    kind = f"{norm.type} (BN in one process)" if norm.type == "SyncBN" and recipe.world_size == 1 else norm.type
    raise MaeTransferError(
        f"{config}: 1 image per GPU on {processes}: the {kind} of {head.get('type', 'the decode head')}'s "
        f"pool-scale-1 branch would normalise 1 value per channel (each image pooled to 1x1), which cannot train; "
        f"{instead}")


def plan(cfg: Any, config: str, world_size: int, device: str, images_per_gpu: int | None = None,
         total_batch: int | None = None, activation_checkpointing: bool = False) -> rcp.Recipe:
    """The recipe of this config on `world_size` processes on `device` (the config as loaded, options applied)."""
    ref = reference(cfg, config)
    amp = amp_of(cfg)
    run_amp = amp if device.startswith("cuda") else "none"
    val = cfg.train_cfg.get("val_interval", None)
    ckpt = cfg.get("default_hooks", {}).get("checkpoint", {}).get("interval", None)
    recipe = rcp.plan(
        tool=TOOL, config=config, device=device, reference=ref, world_size=world_size,
        lr=float(cfg.optim_wrapper.optimizer.lr), max_iter=rcp.positive("train_cfg.max_iters",
                                                                          cfg.train_cfg.max_iters),
        warmup_iters=warmup_iters(cfg), amp=run_amp,
        activation_checkpointing=activation_checkpointing or bool(cfg.model.backbone.get("grad_checkpointing", False)),
        images_per_gpu=images_per_gpu, total_batch=total_batch, poly_end=poly_end(cfg),
        eval_period=None if val is None else int(val), checkpoint_period=None if ckpt is None else int(ckpt),
        dataset=dataset_name(cfg))
    kinds = norm_kinds(cfg)
    recipe.norm_layers = _norm_text(kinds, world_size, recipe.images_per_gpu)
    recipe.reference["norm_layers"] = _norm_text(kinds, ref.world_size or 1, ref.images_per_gpu)
    recipe.reference["amp"] = amp
    if run_amp != "none":
        recipe.amp_detail = (f"{run_amp}: mmengine AmpOptimWrapper (dtype {AMP_DTYPES[run_amp]}, loss_scale "
                             "'dynamic'); a run on a machine without a CUDA GPU trains in fp32 (amp none)")
    else:
        recipe.amp_detail = (f"fp32 on the CPU (the config's amp={amp!r} applies on CUDA GPUs)" if amp != "none"
                             else "fp32 (amp='none')")
    if recipe.accumulation > 1:
        recipe.notes.append(
            f"mmengine counts loader iterations (micro-batches): train_cfg.max_iters = {recipe.max_iter} x "
            f"{recipe.accumulation} = {recipe.max_iter * recipe.accumulation}; scheduler begin/end, val, checkpoint "
            f"and log intervals x {recipe.accumulation} too (optim_wrapper.accumulative_counts={recipe.accumulation})")
    run_images = bn_images(kinds, world_size, recipe.images_per_gpu)
    ref_images = bn_images(kinds, ref.world_size or 1, ref.images_per_gpu)
    if run_images is not None and ref_images is not None and run_images != ref_images:
        recipe.notes.append(f"BN statistics come from {'fewer' if run_images < ref_images else 'more'} images than "
                            f"in the reference run ({run_images} vs {ref_images}: the norm layers row)")
    check_one_value_batch_norm(cfg, config, recipe)
    return recipe


# ---------------------------------------------------------------------------------------------- applying
def optim_wrapper_amp(optim_wrapper: Any, amp: str) -> Any:
    """The optim wrapper config under `amp`: mmengine's AmpOptimWrapper with a dynamic loss scale for fp16 / bf16
    (as mmseg's MAE run), unchanged for 'none'."""
    if amp != "none":
        optim_wrapper.update(type="AmpOptimWrapper", loss_scale="dynamic", dtype=AMP_DTYPES[amp])
    return optim_wrapper


def apply(cfg: Any, recipe: rcp.Recipe) -> None:
    """Write the recipe into the config: per-GPU batch, accumulation, AMP, activation checkpointing, and the
    schedule in loader iterations (x accumulation), after the linear rule under --total-batch."""
    k, scale = recipe.accumulation, recipe.batch_scale
    cfg.train_dataloader.batch_size = recipe.images_per_gpu
    cfg.optim_wrapper.optimizer.lr = recipe.lr
    if k > 1:
        cfg.optim_wrapper.accumulative_counts = k
    optim_wrapper_amp(cfg.optim_wrapper, recipe.amp)
    if recipe.activation_checkpointing:
        cfg.model.backbone.grad_checkpointing = True

    def loader_iters(n: int) -> int:
        return rcp.scale_iters(int(n), scale) * k

    cfg.train_cfg.max_iters = recipe.max_iter * k
    if cfg.train_cfg.get("val_interval", None) is not None:
        cfg.train_cfg.val_interval = loader_iters(cfg.train_cfg.val_interval)
    for s in _schedulers(cfg):
        if not s.get("by_epoch", True):
            for key in ("begin", "end"):
                if isinstance(s.get(key, None), int) and s[key] < 2 ** 31:
                    s[key] = loader_iters(s[key])
    hooks = cfg.get("default_hooks", {})
    for name, interval in (("checkpoint", loader_iters), ("logger", lambda n: int(n) * k)):  # log: every n steps
        if hooks.get(name, {}).get("interval", None) is not None and not hooks[name].get("by_epoch", False):
            hooks[name].interval = interval(hooks[name].interval)


def launcher_variable(launcher: str) -> str:
    """The environment variable holding a launcher's process count: Slurm's SLURM_NTASKS, else torchrun's
    WORLD_SIZE (mmengine's `pytorch` launcher reads exactly torchrun's variables)."""
    return "SLURM_NTASKS" if launcher == "slurm" else "WORLD_SIZE"


def launched_processes(launcher: str) -> int | None:
    """The process count a launcher put in the environment (None: none there); a value that is not a positive
    integer is one error line."""
    variable = launcher_variable(launcher)
    value = os.environ.get(variable)
    if value is None:
        return None
    try:
        return rcp.positive(variable, int(value))
    except ValueError:
        raise MaeTransferError(f"{variable}={value!r} in the environment: expected a positive integer") from None


def world_size_of(args: argparse.Namespace) -> int:
    """The processes of this run: 1 without a launcher; under one, torchrun's WORLD_SIZE (Slurm: SLURM_NTASKS),
    which --num-gpus x --num-machines, when given, must equal. A launcher that started several processes with
    --launcher none would make as many independent 1-process runs: refused."""
    asked = (args.num_gpus or 1) * args.num_machines
    if args.launcher == "none":
        started = launched_processes("none")
        if started is not None and started > 1:
            raise MaeTransferError(
                f"WORLD_SIZE={started}: a launcher started {started} processes, but --launcher is none (each would "
                "train alone on its own copy); add --launcher pytorch")
        if asked > 1:
            raise MaeTransferError(
                f"--num-gpus {args.num_gpus} --num-machines {args.num_machines}: train_seg.py runs one process per "
                f"GPU under a launcher: python -m torch.distributed.run --nproc_per_node {args.num_gpus or 1} "
                "tools/train_seg.py ... --launcher pytorch (--plan shows the recipe without one)")
        return 1
    variable = launcher_variable(args.launcher)
    world = launched_processes(args.launcher) or 1
    if args.num_gpus is not None and asked != world:
        raise MaeTransferError(f"--num-gpus {args.num_gpus} x --num-machines {args.num_machines} = {asked}, but the "
                               f"launcher started {world} processes ({variable}={world})")
    return world


def plan_world_size(args: argparse.Namespace) -> int:
    """The world size --plan describes: under a launcher (its variable in the environment) the processes it
    started, checked as a real run checks them; otherwise --num-gpus x --num-machines (a plan for a run made
    elsewhere)."""
    if launched_processes(args.launcher) is not None:
        return world_size_of(args)
    return (args.num_gpus or 1) * args.num_machines


def resolve(cfg: Any, args: argparse.Namespace, world_size: int, device: str) -> rcp.Recipe:
    """plan() from the command line's recipe flags (a bare batch override refused first), then apply() it."""
    check_batch_override(args.cfg_options, cfg, args.config)
    recipe = plan(cfg, args.config, world_size, device, args.images_per_gpu, args.total_batch,
                  args.activation_checkpointing)
    apply(cfg, recipe)
    return recipe


def run_device() -> str:
    """Where a real run trains (mmengine takes the GPU when there is one); bf16 is checked here."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_amp_support(recipe: rcp.Recipe) -> None:
    """bf16 only on a GPU that has it (one error line otherwise)."""
    if recipe.amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise MaeTransferError(f"amp='bf16': {torch.cuda.get_device_name()} has no bf16; use --cfg-options amp=fp16")


def plan_from_args(args: argparse.Namespace) -> rcp.Recipe:
    """--plan: the config with the command line's options on the launcher's processes (plan_world_size), for the
    GPUs when --num-gpus is given or the machine has one, under a launcher for this machine's device (no data, no
    weights, no model)."""
    cfg = build_config(argparse.Namespace(**{**vars(args), "launcher": "none"}))  # no distributed set-up checks
    world_size = plan_world_size(args)
    if launched_processes(args.launcher) is not None:
        device = run_device()
    else:
        device = rcp.resolve_plan_device(None, args.num_gpus is not None, torch.cuda.is_available())
    return resolve(cfg, args, world_size, device)
