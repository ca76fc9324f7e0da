"""MAE pretraining loop (after facebookresearch/mae `main_pretrain.py` + `engine_pretrain.py`), and the
supervised baseline on the same engine.

`objective = "mae"` (default) trains a `MaskedAutoencoder` on any image folder. `objective = "supervised"`
trains the same ViT with a linear head on the cls token (cross-entropy with `label_smoothing`) on a
labelled ImageFolder (class = first-level subfolder, `num_classes` inferred from the folders), so MAE
and supervised pretraining can be compared on equal data with equal data loading, schedule, AMP, DDP,
checkpoints and TensorBoard. Both models keep the ViT under `encoder.*`, so `export_encoder` writes the
same backbone format for either (the classifier head is left out).

One function, `pretrain(cfg)`, runs single-process or under `torchrun` (DDP; gloo on CPU, nccl on
GPU). Recipe: RandomResizedCrop(0.2-1) + flip, AdamW betas (0.9, 0.95) with weight decay 0.05 on
weight matrices only, lr = blr * effective batch / 256, per-iteration warmup + cosine schedule,
gradient accumulation, optional bf16 / fp16 (GPU, with GradScaler) autocast.

Exact resume: every random stream (sampler order, augmentation, masking noise, drop path) is reseeded
at the start of each epoch from (seed, epoch, rank), so a run resumed from the checkpoint written after
epoch k repeats the uninterrupted run's losses; the checkpoint therefore needs no RNG state. Incomplete
accumulation groups at the end of an epoch are dropped, so no gradient is carried across epochs.

Outputs in `output_dir`: `checkpoint_last.pth` (every epoch), `checkpoint_XXXX.pth` every `save_every`
epochs and at the end (XXXX = completed epochs), `recon_epochXXXX.png` with each numbered checkpoint,
TensorBoard scalars in `tensorboard/`, and `log.jsonl` (one line per epoch).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from backbones.vit import create_vit, vit_config
from mae_transfer.checkpoint import read_checkpoint
from mae_transfer.data import (ImageFolderDataset, LabelledImageFolder, eval_transform, pretrain_transform,
                               unnormalize)
from mae_transfer.errors import MaeTransferError, PickledCheckpointError
from mae_transfer.hardware import autocast_dtype
from mae_transfer.io import atomic_torch_save, atomic_write, atomic_write_text
from mae_transfer.mae import MASKING_STRATEGIES, MaskedAutoencoder, unpatchify
from mae_transfer.optim import adamw, no_weight_decay

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mae_transfer_pretrain"
BACKBONE_FORMAT = "mae_transfer_backbone"
LAST_CHECKPOINT = "checkpoint_last.pth"
AMP_MODES = ("none", "bf16", "fp16")
OBJECTIVES = ("mae", "supervised")

# Every key a pretraining config may set, with its default. Config files set the recipe explicitly.
PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    objective="mae",  # mae | supervised (ViT classifier on a labelled ImageFolder: the baseline on equal data)
    # supervised objective only
    num_classes=None,  # None: the number of class subfolders of data_path (a given value must match it)
    label_smoothing=0.1,
    # model
    encoder="vit_base_patch16_224",  # a backbones.vit name
    encoder_overrides={},  # extra VisionTransformer kwargs (e.g. depth for tiny CPU runs)
    img_size=224,
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    mask_ratio=0.75,
    masking="random",
    norm_pix_loss=True,
    # data
    data_path=None,
    batch_size=64,  # per process
    accum_iter=1,
    num_workers=8,
    crop_scale=(0.2, 1.0),
    # optimisation
    epochs=800,
    warmup_epochs=40,
    blr=1.5e-4,  # base lr: lr = blr * batch_size * accum_iter * world_size / 256
    lr=None,  # absolute lr; overrides blr when set
    min_lr=0.0,
    weight_decay=0.05,
    betas=(0.9, 0.95),
    amp="none",  # none | bf16 | fp16 (GPU only, with GradScaler)
    compile=False,  # torch.compile (inductor) the training forward+backward; checkpoints hold the plain model
    # run
    seed=0,
    device="auto",  # auto | cpu | cuda
    output_dir=None,
    resume="",  # "" (fresh), "auto" (output_dir/checkpoint_last.pth if present) or a checkpoint path
    save_every=20,  # numbered checkpoint + reconstruction picture every N epochs (and at the end)
    recon_images=4,
    progress=True,  # tqdm bar on rank 0
)


# ---------------------------------------------------------------------------------------------- config
def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and values checked; unknown keys and bad values raise `MaeTransferError`."""
    unknown = sorted(set(cfg) - set(PRETRAIN_DEFAULTS))
    if unknown:
        raise MaeTransferError(
            f"unknown pretraining config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(PRETRAIN_DEFAULTS))}"
        )
    cfg = {**copy.deepcopy(PRETRAIN_DEFAULTS), **copy.deepcopy(cfg)}
    vit_config(cfg["encoder"])  # unknown model name -> MaeTransferError
    if cfg["objective"] not in OBJECTIVES:
        raise MaeTransferError(f"objective must be one of {OBJECTIVES}, got {cfg['objective']!r}")
    if not 0.0 <= float(cfg["label_smoothing"]) < 1.0:
        raise MaeTransferError(f"label_smoothing must be in [0, 1), got {cfg['label_smoothing']!r}")
    if cfg["amp"] not in AMP_MODES:
        raise MaeTransferError(f"amp must be one of {AMP_MODES}, got {cfg['amp']!r}")
    if cfg["masking"] not in MASKING_STRATEGIES:
        raise MaeTransferError(f"masking must be one of {MASKING_STRATEGIES}, got {cfg['masking']!r}")
    if not isinstance(cfg["compile"], bool):
        raise MaeTransferError(f"compile must be True or False, got {cfg['compile']!r}")
    if not isinstance(cfg["encoder_overrides"], dict):
        raise MaeTransferError(f"encoder_overrides must be a dict, got {cfg['encoder_overrides']!r}")
    for key in ("batch_size", "accum_iter", "epochs", "save_every", "img_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise MaeTransferError(f"config key {key!r} must be a positive integer, got {cfg[key]!r}")
    if not cfg["data_path"]:
        raise MaeTransferError("no image folder given: set data_path in the config or pass --data PATH")
    if not cfg["output_dir"]:
        raise MaeTransferError("no output folder given: set output_dir in the config or pass --output-dir PATH")
    return cfg


def encoder_arch(cfg: dict[str, Any]) -> dict[str, Any]:
    """VisionTransformer kwargs of the encoder a pretraining config builds."""
    return {**vit_config(cfg["encoder"]), **cfg.get("encoder_overrides", {}), "img_size": cfg["img_size"]}


class SupervisedClassifier(nn.Module):
    """The supervised baseline: our ViT with a linear head on the cls token, cross-entropy loss.

    The ViT sits under `encoder` as in `MaskedAutoencoder`, so checkpoints, resume and `export_encoder`
    share one code path. `forward(imgs, labels) -> (loss, logits)`.
    """

    def __init__(self, encoder: str, img_size: int, num_classes: int, label_smoothing: float = 0.1,
                 encoder_overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        overrides = {"global_pool": "token", **(encoder_overrides or {}), "num_classes": num_classes}
        self.encoder = create_vit(encoder, img_size=img_size, **overrides)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.encoder(imgs)
        return self.criterion(logits.float(), labels), logits


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """The model a (resolved) config trains: `MaskedAutoencoder` or `SupervisedClassifier`."""
    if cfg.get("objective", "mae") == "supervised":
        if not cfg.get("num_classes"):
            raise MaeTransferError("objective='supervised' needs num_classes (inferred from the data folder)")
        return SupervisedClassifier(cfg["encoder"], cfg["img_size"], int(cfg["num_classes"]),
                                    float(cfg["label_smoothing"]), cfg["encoder_overrides"])
    return build_mae(cfg)


def build_mae(cfg: dict[str, Any]) -> MaskedAutoencoder:
    return MaskedAutoencoder(
        encoder=cfg["encoder"], img_size=cfg["img_size"], decoder_embed_dim=cfg["decoder_embed_dim"],
        decoder_depth=cfg["decoder_depth"], decoder_num_heads=cfg["decoder_num_heads"],
        mask_ratio=cfg["mask_ratio"], masking=cfg["masking"], norm_pix_loss=cfg["norm_pix_loss"],
        encoder_overrides=cfg["encoder_overrides"],
    )


# ---------------------------------------------------------------------------------------------- optimiser
def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight matrices with decay; norms, biases, position tables, cls / mask tokens without
    (the project's one rule, `mae_transfer.optim.no_weight_decay`). No layer-wise decay in pretraining."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # fixed sin-cos position tables
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(epoch: float, cfg: dict[str, Any], base_lr: float) -> float:
    """Linear warmup for `warmup_epochs`, then half-cycle cosine to `min_lr` (epoch is fractional)."""
    warmup, total, min_lr = cfg["warmup_epochs"], cfg["epochs"], cfg["min_lr"]
    if epoch < warmup:
        return base_lr * epoch / warmup
    progress = (epoch - warmup) / max(total - warmup, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------- runtime
def init_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref == "cuda":
        if not torch.cuda.is_available():
            raise MaeTransferError("device='cuda' but no CUDA device is available (use device=cpu or auto)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_pref == "cpu":
        device = torch.device("cpu")
    else:
        raise MaeTransferError(f"device must be 'auto', 'cpu' or 'cuda', got {device_pref!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One seed per (run seed, epoch, rank), so every epoch's randomness is reproducible on resume."""
    return ((seed * 1_000_003 + epoch) * 4099 + rank) % (2 ** 63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def find_resume_checkpoint(cfg: dict[str, Any]) -> Path | None:
    resume = cfg["resume"]
    if not resume:
        return None
    if resume == "auto":
        path = Path(cfg["output_dir"]) / LAST_CHECKPOINT
        if path.is_file():
            return path
        logger.info("no %s in %s: starting from scratch", LAST_CHECKPOINT, cfg["output_dir"])
        return None
    path = Path(resume)
    if not path.is_file():
        raise MaeTransferError(f"resume checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | os.PathLike, fmt: str = CHECKPOINT_FORMAT,
                    tool: str = "tools/pretrain.py") -> dict[str, Any]:
    """Read a training checkpoint of format `fmt`. These hold only tensors and plain values, so a file with
    pickled objects is never one of them and is refused without an opt-in."""
    try:
        ckpt = read_checkpoint(path)
    except PickledCheckpointError:
        raise MaeTransferError(f"{path}: holds pickled Python objects, which checkpoints written by {tool} never do; "
                               "refusing to unpickle it") from None
    except MaeTransferError as err:
        raise MaeTransferError(f"{err}; expected a checkpoint written by {tool}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt or "model" not in ckpt:
        raise MaeTransferError(f"{path} is not a checkpoint of {tool} (expected format {fmt!r}, "
                               f"found {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})")
    return ckpt


def _load_state(module: Any, state: dict[str, Any], what: str, path: Path) -> None:
    if isinstance(module, nn.Module):  # name the first mismatch instead of torch's multi-line report
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            example = (missing or unexpected or shapes)[0]
            raise MaeTransferError(
                f"cannot resume from {path}: {what} does not match the config ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(shapes)} wrong-shape keys, e.g. {example!r}); "
                "resume with the config the checkpoint was trained with"
            )
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        raise MaeTransferError(f"cannot resume from {path}: {what} does not match the config ({' '.join(first[:2])})") from err


def restore_training_state(ckpt: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler | None) -> tuple[int, list[dict[str, Any]]]:
    """Load model, optimizer and scaler state from a training checkpoint (read by `load_checkpoint`);
    returns (completed epochs, history)."""
    _load_state(model, ckpt["model"], "model", path)
    _load_state(optimizer, ckpt["optimizer"], "optimizer", path)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    start_epoch = int(ckpt["epoch"])
    logger.info("resumed from %s (%d epoch(s) done)", path, start_epoch)
    return start_epoch, list(ckpt.get("history", []))


# ---------------------------------------------------------------------------------------------- pictures
@torch.no_grad()
def save_reconstruction(model: MaskedAutoencoder, imgs: torch.Tensor, path: Path, seed: int) -> Path:
    """Rows: original / masked input / reconstruction with the visible patches pasted back."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    imgs = imgs.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    _, pred, mask = model(imgs, model.make_noise(imgs.shape[0], device, gen))
    masked, pasted = model.reconstruct(imgs, pred.float(), mask)
    model.train(was_training)
    # Masked patches are zeros in normalised space; show them as mid-grey after unnormalising.
    p = model.patch_size
    m = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * 3).float(), p, model.grid)
    masked_view = unnormalize(masked) * (1 - m) + 0.5 * m
    grid = make_grid(torch.cat([unnormalize(imgs), masked_view, unnormalize(pasted)]).cpu(), nrow=imgs.shape[0], padding=2)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    from PIL import Image

    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------- training
def pretrain(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Run (or resume) pretraining; returns the per-epoch history [{"epoch", "loss", "lr"}, ...]
    (supervised runs add "acc", the training accuracy of the epoch)."""
    cfg = resolve_config(cfg)
    rank, world, device = init_distributed(cfg["device"])
    try:
        return _pretrain(cfg, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _pretrain(cfg: dict[str, Any], rank: int, world: int, device: torch.device) -> list[dict[str, Any]]:
    main = rank == 0
    out = Path(cfg["output_dir"])
    if cfg["amp"] == "fp16" and device.type != "cuda":
        raise MaeTransferError("amp='fp16' needs a CUDA device (GradScaler); use amp='bf16' or 'none' on CPU")

    # Data first: a bad folder fails before a large model is built.
    supervised = cfg["objective"] == "supervised"
    transform = pretrain_transform(cfg["img_size"], cfg["crop_scale"])
    dataset = LabelledImageFolder(cfg["data_path"], transform) if supervised else ImageFolderDataset(cfg["data_path"], transform)
    recon_idx = dataset.readable_indices(max(1, cfg["recon_images"]))[:cfg["recon_images"]]  # fails early if nothing decodes
    if supervised:
        recon_idx = []  # no reconstruction pictures for a classifier
        found = len(dataset.classes)
        if cfg["num_classes"] is not None and cfg["num_classes"] != found:
            raise MaeTransferError(f"num_classes={cfg['num_classes']} but {cfg['data_path']} has {found} class folders")
        cfg["num_classes"] = found
    per_rank = math.ceil(len(dataset) / world)
    iters = per_rank // cfg["batch_size"] // cfg["accum_iter"] * cfg["accum_iter"]
    if iters == 0:
        raise MaeTransferError(
            f"{len(dataset)} images in {cfg['data_path']} give no full step of batch_size={cfg['batch_size']} x "
            f"accum_iter={cfg['accum_iter']} per process ({world} process(es)); lower batch_size"
        )

    seed_everything(cfg["seed"])  # model init
    model = build_model(cfg).to(device)
    eff_batch = cfg["batch_size"] * cfg["accum_iter"] * world
    base_lr = cfg["lr"] if cfg["lr"] is not None else cfg["blr"] * eff_batch / 256
    optimizer = adamw(param_groups_weight_decay(model, cfg["weight_decay"]), base_lr, cfg["betas"])
    scaler = torch.amp.GradScaler("cuda") if cfg["amp"] == "fp16" else None

    start_epoch, history = 0, []
    resume_path = find_resume_checkpoint(cfg)
    if resume_path is not None:
        start_epoch, history = restore_training_state(load_checkpoint(resume_path), resume_path, model, optimizer, scaler)
    if start_epoch >= cfg["epochs"]:
        logger.info("nothing to do: %d of %d epochs already done", start_epoch, cfg["epochs"])
        return history

    mae = model  # the unwrapped model (MaskedAutoencoder or SupervisedClassifier)
    if cfg["compile"]:
        model = torch.compile(model)  # inside DDP: DDP's gradient hooks stay eager, checkpoints keep plain keys
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    loader_gen = torch.Generator()
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=device.type == "cuda", drop_last=True, generator=loader_gen)
    recon_batch = (torch.stack([eval_transform(cfg["img_size"])(dataset.load(i)) for i in recon_idx])
                   if main and recon_idx else None)

    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_epoch * iters // cfg["accum_iter"])
        logger.info("%s pretraining %s: %d images, %d process(es), effective batch %d, lr %.3g, epochs %d-%d, output %s",
                    "supervised" if supervised else "MAE", cfg["encoder"], len(dataset), world, eff_batch, base_lr, start_epoch + 1, cfg["epochs"], out)
    amp_dtype = autocast_dtype(cfg["amp"], device)  # bf16 on a CPU without bf16 units: fp32
    accum = cfg["accum_iter"]
    last_good = resume_path
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            seed = epoch_seed(cfg["seed"], epoch, rank)
            seed_everything(seed)  # augmentation (main process / worker base seeds) and drop path
            loader_gen.manual_seed(seed)
            sampler.set_epoch(epoch)
            noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            start, loss_sum, lr = time.time(), torch.zeros((), dtype=torch.float64), base_lr
            correct = torch.zeros((), dtype=torch.float64)
            # Only whole accumulation groups: no gradient is carried into the next epoch.
            batches = itertools.islice(loader, iters)
            progress = _progress(batches, iters, f"epoch {epoch + 1}/{cfg['epochs']}", main and cfg["progress"])
            for it, batch in enumerate(progress):
                if it % accum == 0:
                    lr = lr_at(epoch + it / iters, cfg, base_lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                step_now = (it + 1) % accum == 0
                sync = contextlib.nullcontext() if step_now or world == 1 else model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        if supervised:
                            imgs, labels = (t.to(device, non_blocking=True) for t in batch)
                            loss, logits = model(imgs, labels)
                            correct += (logits.argmax(-1) == labels).sum().item()
                        else:
                            imgs = batch.to(device, non_blocking=True)
                            loss, _, _ = model(imgs, mae.make_noise(imgs.shape[0], device, noise_gen))
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise MaeTransferError(
                            f"loss is {loss_value} at epoch {epoch + 1} iteration {it + 1}; stopped "
                            f"(last good checkpoint: {last_good or 'none'}); try a lower lr or amp='none'"
                        )
                    loss = loss / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                if step_now:
                    optimizer_step(optimizer, scaler)
                loss_sum += loss_value
                log_iteration(writer if step_now else None, progress if main and cfg["progress"] else None,
                              loss_value, lr, (epoch * iters + it) // accum)
            # Epoch sums of all processes; moved to the device because nccl reduces CUDA tensors only.
            totals = torch.stack([loss_sum, correct]).to(device)
            if world > 1:
                dist.all_reduce(totals)
            record = {"epoch": epoch + 1, "loss": float(totals[0]) / (iters * world), "lr": lr}
            if supervised:
                record["acc"] = float(totals[1]) / (iters * cfg["batch_size"] * world)
            history.append(record)
            if main:
                seconds = time.time() - start
                logger.info("epoch %d/%d  loss %.4f  lr %.3e  %.1fs  %.1f img/s", epoch + 1, cfg["epochs"],
                            record["loss"], lr, seconds, iters * cfg["batch_size"] * world / max(seconds, 1e-9))
                writer.add_scalar("train/epoch_loss", record["loss"], epoch + 1)
                if supervised:
                    writer.add_scalar("train/epoch_acc", record["acc"], epoch + 1)
                extra = {"classes": list(dataset.classes)} if supervised else {}
                last_good = _save(cfg, mae, optimizer, scaler, history, epoch + 1, world, out, recon_batch, extra)
            if world > 1:
                dist.barrier()  # nobody reads checkpoint_last.pth before it is complete
    finally:
        if writer is not None:
            writer.close()
    return history


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   clip_grad: float | None = None, params: list[nn.Parameter] | None = None) -> None:
    """One update after the (accumulated) backward passes: unscale (fp16) + clip if asked, step, zero grads."""
    if clip_grad:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params or [p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def log_iteration(writer: Any, progress: Any, loss: float, lr: float, step: int) -> None:
    """TensorBoard scalars of an optimizer step (writer None: not a step / not rank 0) and the progress bar."""
    if writer is not None:
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", lr, step)
    if progress is not None:
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")


def _progress(loader: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _save(cfg: dict[str, Any], mae: nn.Module, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler | None, history: list[dict[str, Any]], epoch: int, world: int,
          out: Path, recon_batch: torch.Tensor | None, extra: dict[str, Any] | None = None) -> Path:
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": mae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,  # completed epochs; training resumes at this epoch index
        "config": copy.deepcopy(cfg),
        "history": copy.deepcopy(history),
        "world_size": world,
        **(extra or {}),  # supervised: "classes" (class index -> folder name)
    }
    last, numbered = save_epoch_checkpoint(state, out, epoch, cfg["save_every"], cfg["epochs"], history)
    if numbered is not None and recon_batch is not None and len(recon_batch) and isinstance(mae, MaskedAutoencoder):
        picture = save_reconstruction(mae, recon_batch, out / f"recon_epoch{epoch:04d}.png", cfg["seed"])
        logger.info("saved %s and %s", numbered, picture)
    return last


def save_epoch_checkpoint(state: dict[str, Any], out: Path, epoch: int, save_every: int, epochs: int,
                          history: list[dict[str, Any]]) -> tuple[Path, Path | None]:
    """`checkpoint_last.pth` every epoch, `checkpoint_XXXX.pth` every `save_every` epochs and at the end, and
    `log.jsonl` (one line per epoch), all written to a temp file and renamed. Returns (last, numbered or None)."""
    last, numbered = out / LAST_CHECKPOINT, None
    if epoch % save_every == 0 or epoch == epochs:
        numbered = atomic_torch_save(state, out / f"checkpoint_{epoch:04d}.pth")
        atomic_write(last, lambda tmp: shutil.copyfile(numbered, tmp))
    else:
        atomic_torch_save(state, last)
    atomic_write_text("".join(json.dumps(r) + "\n" for r in history), out / "log.jsonl")
    return last, numbered


# ---------------------------------------------------------------------------------------------- export
def export_encoder(mae_checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the encoder of a pretraining checkpoint (MAE or supervised) alone, as a backbone checkpoint:
    {"model": ViT state_dict (our keys, no 'encoder.' prefix, no classifier head), "arch":
     VisionTransformer kwargs, "name": backbones.vit name, "format": "mae_transfer_backbone",
     "objective": "mae" | "supervised", ...}. Load with
    `create_vit(ckpt["name"], **ckpt["arch"]).load_state_dict(ckpt["model"])`.
    """
    path = Path(mae_checkpoint_path)
    if not path.is_file():
        raise MaeTransferError(f"pretraining checkpoint not found: {path}")
    ckpt = load_checkpoint(path)
    prefix = "encoder."
    # The supervised classifier's head is task-specific: the backbone is everything else.
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items()
             if k.startswith(prefix) and not k.startswith(prefix + "head.")}
    if not state:
        raise MaeTransferError(f"{path} holds no 'encoder.*' weights")
    cfg = ckpt["config"]
    backbone = {
        "format": BACKBONE_FORMAT,
        "model": state,
        "arch": encoder_arch(cfg),
        "name": cfg["encoder"],
        "objective": cfg.get("objective", "mae"),
        "source": str(path),
        "epoch": ckpt["epoch"],
    }
    out = atomic_torch_save(backbone, out_path)
    logger.info("exported the encoder of %s (%d tensors, epoch %d) to %s", path, len(state), ckpt["epoch"], out)
    return out
