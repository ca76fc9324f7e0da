"""The one training runtime: `train(task)` and the pieces around it, after facebookresearch/mae's
`engine_pretrain.py` / `engine_finetune.py` + `util/misc.py`.

MAE pretraining and the supervised baseline (`mae_transfer.pretraining`) and classification fine-tuning /
linear probing (`mae_transfer.classification`) all run `train`; a `Task` supplies what differs (data, model,
optimizer, the forward that returns the loss, what to evaluate after an epoch, what else a checkpoint holds).

The runtime: one process or `torchrun` (DDP; gloo on CPU, nccl on GPU), lr = blr * effective batch / 256 with a
per-iteration warmup + half-cycle cosine, gradient accumulation, AMP (`hardware.autocast_dtype`: bf16, or fp16 with
a GradScaler on CUDA only), optional `torch.compile` (config key `compile`), gradient clipping (`clip_grad`), a stop
on a non-finite loss that names the last good checkpoint, TensorBoard scalars, and in `output_dir`:
`checkpoint_last.pth` (every epoch), `checkpoint_XXXX.pth` every `save_every` epochs and at the end (XXXX =
completed epochs), `log.jsonl` (the history, one line per epoch), `tensorboard/`.

Exact resume: every random stream (sampler order, augmentation, masking noise, mixup, drop path) is reseeded at
the start of each epoch from (seed, epoch, rank), so a run resumed from the checkpoint written after epoch k
repeats the uninterrupted run; checkpoints therefore hold no RNG state. Incomplete accumulation groups at the end
of an epoch are dropped, so no gradient is carried across epochs.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mae_transfer.checkpoint import read_checkpoint
from mae_transfer.checkpoint.writing import atomic_torch_save
from mae_transfer.errors import MaeTransferError, PickledCheckpointError
from mae_transfer.hardware import autocast_dtype
from mae_transfer.io import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

AMP_MODES = ("none", "bf16", "fp16")
LAST_CHECKPOINT = "checkpoint_last.pth"


class Task:
    """What one kind of training supplies to `train`: subclasses set the class attributes, implement the first
    four hooks and override the others they need. `train` sets `rank`, `world`, `device` and `amp_dtype`
    before it calls the first hook."""

    checkpoint_format: str  # "format" of its training checkpoints
    tool: str  # the tool that writes them, named in errors
    epoch_scalars: dict[str, str] = {}  # history key -> TensorBoard tag, written after each epoch that has the key
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg  # resolved; hooks may complete it (e.g. num_classes), checkpoints save it

    def build_data(self) -> Dataset:
        """The training set; called first, so bad data fails before a large model is built."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The model to train (on the CPU; `train` moves it), built right after seeding with cfg['seed']."""
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module, base_lr: float) -> torch.optim.Optimizer:
        """Groups may carry `lr_scale`: the schedule sets lr = lr_at(...) * lr_scale."""
        raise NotImplementedError

    def forward(self, net: nn.Module, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, statistics) of one batch, run under autocast; `net` may be compiled / DDP-wrapped, `generator`
        is the epoch's own generator on the device. The statistics are summed over the epoch and all processes
        and given to `end_epoch`."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the run trains on what, for the log line at the start."""
        return type(self).__name__

    def end_epoch(self, net: nn.Module, record: dict[str, Any], totals: dict[str, float], seconds: float) -> None:
        """Complete the epoch's history record {"epoch", "loss", "lr"} (accuracy, an evaluation, ...); runs on
        every process."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Plain values every checkpoint holds beside the training state, which a resumed run must match."""
        return {}

    def after_checkpoint(self, model: nn.Module, epoch: int, numbered: Path | None) -> None:
        """Rank 0, after each epoch's checkpoint (`numbered`: the checkpoint_XXXX.pth written, if any)."""

    def finish(self, history: list[dict[str, Any]]) -> None:
        """Rank 0, after the last epoch (e.g. write eval_metrics.json)."""


# ---------------------------------------------------------------------------------------------- processes
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


@contextlib.contextmanager
def distributed(device_pref: str) -> Iterator[tuple[int, int, torch.device]]:
    """`init_distributed`, leaving the process group again on exit."""
    rank, world, device = init_distributed(device_pref)
    try:
        yield rank, world, device
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One seed per (run seed, epoch, rank), so every epoch's randomness is reproducible on resume."""
    return ((seed * 1_000_003 + epoch) * 4099 + rank) % (2 ** 63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_cpu_rngs(seed: int) -> Iterator[None]:
    """Python, numpy and torch's CPU RNG seeded with `seed` inside, as they were outside (mapping an item in the
    main process leaves the training's own draws alone)."""
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


def lr_at(epoch: float, cfg: dict[str, Any], base_lr: float) -> float:
    """Linear warmup for `warmup_epochs`, then half-cycle cosine to `min_lr` (epoch is fractional)."""
    warmup, total, min_lr = cfg["warmup_epochs"], cfg["epochs"], cfg["min_lr"]
    if epoch < warmup:
        return base_lr * epoch / warmup
    progress = (epoch - warmup) / max(total - warmup, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------- checkpoints
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


def load_checkpoint(path: str | os.PathLike, fmt: str, tool: str = "mae_transfer") -> dict[str, Any]:
    """Read a training checkpoint of format `fmt` (written by `tool`). These hold only tensors and plain values,
    so a file with pickled objects is never one of them and is refused without an opt-in."""
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
        raise MaeTransferError(f"cannot resume from {path}: {what} does not match the config "
                               f"({' '.join(first[:2])})") from err


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


def save_epoch_checkpoint(state: dict[str, Any], out: Path, epoch: int, save_every: int, epochs: int,
                          history: list[dict[str, Any]], save_epochs: tuple[int, ...] = ()) -> tuple[Path, Path | None]:
    """`checkpoint_last.pth` every epoch, `checkpoint_XXXX.pth` every `save_every` epochs, at each of `save_epochs`
    and at the end, and `log.jsonl` (one line per epoch), all written to a temp file and renamed.
    Returns (last, numbered or None)."""
    last, numbered = out / LAST_CHECKPOINT, None
    if epoch % save_every == 0 or epoch == epochs or epoch in save_epochs:
        numbered = atomic_torch_save(state, out / f"checkpoint_{epoch:04d}.pth")
        atomic_write(last, lambda tmp: shutil.copyfile(numbered, tmp))
    else:
        atomic_torch_save(state, last)
    atomic_write_text("".join(json.dumps(r) + "\n" for r in history), out / "log.jsonl")
    return last, numbered


# ---------------------------------------------------------------------------------------------- steps, logs
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


def progress_bar(batches: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- the loop
def train(task: Task) -> list[dict[str, Any]]:
    """Run (or resume) `task` with its resolved config; returns the per-epoch history
    [{"epoch", "loss", "lr", ...}, ...]."""
    with distributed(task.cfg["device"]) as (rank, world, device):
        return _train(task, rank, world, device)


def _train(task: Task, rank: int, world: int, device: torch.device) -> list[dict[str, Any]]:
    cfg, main, out = task.cfg, rank == 0, Path(task.cfg["output_dir"])
    if cfg["amp"] == "fp16" and device.type != "cuda":
        raise MaeTransferError("amp='fp16' needs a CUDA device (GradScaler); use amp='bf16' or 'none' on CPU")
    task.rank, task.world, task.device = rank, world, device
    task.amp_dtype = autocast_dtype(cfg["amp"], device)  # bf16 on a CPU without bf16 units: fp32

    dataset = task.build_data()
    iters = _iterations_per_epoch(len(dataset), cfg, world)
    seed_everything(cfg["seed"])  # model init
    model = task.build_model().to(device)
    eff_batch = cfg["batch_size"] * cfg["accum_iter"] * world
    base_lr = cfg["lr"] if cfg["lr"] is not None else cfg["blr"] * eff_batch / 256
    optimizer = task.build_optimizer(model, base_lr)
    scaler = torch.amp.GradScaler("cuda") if cfg["amp"] == "fp16" else None

    resume_path = find_resume_checkpoint(cfg)
    start_epoch, history = _resume(task, resume_path, model, optimizer, scaler)
    if start_epoch >= cfg["epochs"]:
        logger.info("nothing to do: %d of %d epochs already done", start_epoch, cfg["epochs"])
        return history

    net = _parallel_net(model, cfg, world, device)  # what the loop calls; checkpoints save the plain `model`
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=device.type == "cuda", drop_last=True, generator=torch.Generator())
    writer = None
    if main:
        writer = _start_writer(out, start_epoch * iters // cfg["accum_iter"])
        logger.info("%s, %d process(es), effective batch %d, lr %.3g, epochs %d-%d, output %s", task.describe(),
                    world, eff_batch, base_lr, start_epoch + 1, cfg["epochs"], out)
    last_good = resume_path
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            start = time.time()
            record, totals = train_one_epoch(net, task, loader, optimizer, scaler, epoch, base_lr, writer, last_good)
            seconds = time.time() - start
            task.end_epoch(net, record, totals, seconds)
            history.append(record)
            if main:
                _log_epoch(task, writer, record, epoch, seconds, iters * cfg["batch_size"] * world)
                last_good = _save_epoch(task, model, optimizer, scaler, epoch, history, out)
            if world > 1:
                dist.barrier()  # nobody reads checkpoint_last.pth before it is complete
    finally:
        if writer is not None:
            writer.close()
    if main:
        task.finish(history)
    return history


def _iterations_per_epoch(num_images: int, cfg: dict[str, Any], world: int) -> int:
    """Batches per process and epoch, whole accumulation groups only; none is an error."""
    accum = cfg["accum_iter"]
    iters = math.ceil(num_images / world) // cfg["batch_size"] // accum * accum
    if iters == 0:
        raise MaeTransferError(
            f"{num_images} training images in {cfg['data_path']} give no full step of "
            f"batch_size={cfg['batch_size']} x accum_iter={accum} per process ({world} process(es)); lower batch_size"
        )
    return iters


def _resume(task: Task, resume_path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None) -> tuple[int, list[dict[str, Any]]]:
    """(completed epochs, history) of the checkpoint resumed from, after checking it was trained on the same data
    (the task's checkpoint_extra); (0, []) without one."""
    if resume_path is None:
        return 0, []
    ckpt = load_checkpoint(resume_path, task.checkpoint_format, task.tool)
    for key, value in task.checkpoint_extra().items():
        if ckpt.get(key) != value:
            raise MaeTransferError(f"cannot resume from {resume_path}: it was trained on {key} {ckpt.get(key)}, "
                                   f"the data has {value}")
    return restore_training_state(ckpt, resume_path, model, optimizer, scaler)


def _parallel_net(model: nn.Module, cfg: dict[str, Any], world: int, device: torch.device) -> nn.Module:
    """`model` compiled (cfg compile) and wrapped in DDP (more than one process), as the loop calls it."""
    net = model
    if cfg.get("compile"):
        net = torch.compile(net)  # inside DDP: DDP's gradient hooks stay eager, checkpoints keep plain keys
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def _start_writer(out: Path, first_step: int) -> Any:
    """The TensorBoard writer of rank 0 under OUTPUT_DIR/tensorboard; scalars from `first_step` on are replaced
    (a resumed run rewrites what the interrupted one logged after its checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=first_step)


def _log_epoch(task: Task, writer: Any, record: dict[str, Any], epoch: int, seconds: float,
               images_per_epoch: int) -> None:
    """The epoch's log line (loss, lr, time, speed and the task's own numbers) and its TensorBoard scalars."""
    extra = "".join(f"  {k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "loss", "lr", "seconds"))
    logger.info("epoch %d/%d  loss %.4f  lr %.3e  %.1fs  %.1f img/s%s", epoch + 1, task.cfg["epochs"],
                record["loss"], record["lr"], seconds, images_per_epoch / max(seconds, 1e-9), extra)
    writer.add_scalar("train/epoch_loss", record["loss"], epoch + 1)
    for key, tag in task.epoch_scalars.items():
        if key in record:
            writer.add_scalar(tag, record[key], epoch + 1)


def _save_epoch(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                epoch: int, history: list[dict[str, Any]], out: Path) -> Path:
    """The training checkpoint after `epoch` (0-based); returns checkpoint_last.pth, the last good one."""
    cfg = task.cfg
    state = {
        "format": task.checkpoint_format,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch + 1,  # completed epochs; training resumes at this epoch index
        "config": copy.deepcopy(cfg),
        "history": copy.deepcopy(history),
        "world_size": task.world,
        **task.checkpoint_extra(),
    }
    last, numbered = save_epoch_checkpoint(state, out, epoch + 1, cfg["save_every"], cfg["epochs"], history,
                                           tuple(cfg["save_epochs"]))
    task.after_checkpoint(model, epoch + 1, numbered)
    return last


def train_one_epoch(net: nn.Module, task: Task, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, epoch: int, base_lr: float, writer: Any,
                    last_good: Path | None) -> tuple[dict[str, Any], dict[str, float]]:
    """One epoch over the whole accumulation groups of `loader`. Returns the history record {"epoch", "loss", "lr"}
    (mean loss of all processes, last lr) and the task's statistics summed over the epoch and all processes."""
    cfg, device, world = task.cfg, task.device, task.world
    accum = cfg["accum_iter"]
    iters = len(loader) // accum * accum  # only whole accumulation groups: no gradient is carried into the next epoch
    seed = epoch_seed(cfg["seed"], epoch, task.rank)
    seed_everything(seed)  # augmentation (main process / worker base seeds), mixup, drop path
    loader.generator.manual_seed(seed)
    loader.sampler.set_epoch(epoch)
    generator = torch.Generator(device=device).manual_seed(seed + 1)  # the task's own draws (MAE: masking noise)
    params = [p for p in net.parameters() if p.requires_grad]  # what gradient clipping sees
    net.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, sums, lr = 0.0, {}, base_lr
    show = task.rank == 0 and cfg["progress"]
    batches = progress_bar(itertools.islice(loader, iters), iters, f"epoch {epoch + 1}/{cfg['epochs']}", show)
    for it, batch in enumerate(batches):
        if it % accum == 0:
            lr = lr_at(epoch + it / iters, cfg, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        step_now = (it + 1) % accum == 0
        sync = contextlib.nullcontext() if step_now or world == 1 else net.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=task.amp_dtype or torch.float32, enabled=task.amp_dtype is not None):
                loss, stats = task.forward(net, batch, generator)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise MaeTransferError(
                    f"loss is {loss_value} at epoch {epoch + 1} iteration {it + 1}; stopped "
                    f"(last good checkpoint: {last_good or 'none'}); try a lower lr or amp='none'"
                )
            loss = loss / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if step_now:
            optimizer_step(optimizer, scaler, cfg.get("clip_grad"), params)
        loss_sum += loss_value
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
        log_iteration(writer if step_now else None, batches if show else None, loss_value, lr,
                      (epoch * iters + it) // accum)
    # Sums of all processes; on the device because nccl reduces CUDA tensors only.
    totals = torch.tensor([loss_sum, *sums.values()], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
    record = {"epoch": epoch + 1, "loss": float(totals[0]) / (iters * world), "lr": lr}
    return record, dict(zip(sums, totals[1:].tolist(), strict=False))


# ----------------------------------------------------------------------------------------- optimizer
def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """torch AdamW with the fused kernel (CPU and CUDA; what HF's Trainer also defaults to on torch >= 2.8):
    one pass over each tensor instead of the foreach chain (measured: benchmarks/README.md)."""
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)
