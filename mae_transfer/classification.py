"""Image classification on top of the one ViT: the MAE paper's own evaluation protocol.

After facebookresearch/mae `main_finetune.py` / `main_linprobe.py` + `engine_finetune.py`, with timm's data
pipeline (RandAugment, random erasing, Mixup/CutMix, soft-target losses, LARS) and this project's shared
pieces: `backbones.vit` (the model), `mae_transfer.checkpoint` (any pretrained format), `backbones.lr_decay`
(layer-wise lr decay, `freeze_blocks`) and the training loop of `mae_transfer.runtime` (AdamW, DDP, AMP, per-epoch
reseeding for exact resume, lr schedule, atomic checkpoints), which `finetune` runs with `ClassificationTask`.

Modes:
  finetune  end to end (or partially: `freeze_blocks=k` freezes patch embedding + blocks 0..k-1, -1 all but the
            head); global average pooling + `fc_norm` + linear head, AdamW with LLRD, mixup/cutmix, label
            smoothing, RandAugment, random erasing, drop path, warmup + cosine.
  linprobe  frozen encoder; cls-token feature (after the final norm) -> BatchNorm1d(affine=False) -> linear,
            LARS (momentum 0.9, trust ratio on weight matrices only), no weight decay, crop + flip only.

Data: an ImageFolder root with `train/<class>/...` and `val/<class>/...` (same class folders). Outputs in
`output_dir`: `checkpoint_last.pth` every epoch and `checkpoint_XXXX.pth` every `save_every` epochs (atomic),
`log.jsonl` (one line per epoch: train loss, lr, val top-1/top-5), `eval_metrics.json` (the final
evaluation, `mae_transfer.metrics`: task "cls", metrics top1 / top5 / loss) and TensorBoard scalars in `tensorboard/`.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from backbones.lr_decay import param_groups
from backbones.vit import VisionTransformer, create_vit, vit_config
from mae_transfer import runtime
from mae_transfer.checkpoint import load_backbone_state_dict
from mae_transfer.compat import patch_timm_posterize
from mae_transfer.config import check_keyword_overrides, check_kinds, check_number_pair, check_ranges, load_config
from mae_transfer.data import IMAGENET_MEAN, IMAGENET_STD, LabelledImageFolder, eval_transform
from mae_transfer.errors import MaeTransferError
from mae_transfer.hardware import autocast_dtype
from mae_transfer.input_checks import (
    Check,
    each_override,
    plain_override,
    raise_problem,
    tool_path,
)
from mae_transfer.io import check_output_dir
from mae_transfer.metrics import write_eval_metrics
from mae_transfer.runtime import AMP_MODES, LAST_CHECKPOINT, Task

logger = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "mae_transfer_classifier"
MODES = ("finetune", "linprobe")
OPTIMIZERS = ("adamw", "lars", "sgd")
TOOL = "tools/finetune_cls.py"

# Every key a classification config may set, with its default (the ViT-B fine-tuning recipe).
CLS_DEFAULTS: dict[str, Any] = dict(
    mode="finetune",  # finetune | linprobe
    # model
    model="vit_base_patch16_224",  # a backbones.vit name
    encoder_overrides={},  # extra VisionTransformer kwargs (e.g. depth for tiny CPU runs)
    img_size=224,
    num_classes=None,  # None: the number of class folders (a given value must match it)
    global_pool="avg",  # avg (+ fc_norm; fine-tuning) | token (cls token after the final norm; linear probe)
    drop_path=0.1,
    finetune="",  # pretrained weights in any format mae_transfer.checkpoint reads; "" = random init
    allow_pickle=False,  # let `finetune` be a pickled (non weights-only) file
    freeze_blocks=0,  # partial fine-tuning: k blocks frozen (-1: everything but the head)
    head_init_std=2e-5,  # trunc-normal std of the new head's weights (MAE: 2e-5 fine-tune, 0.01 linear probe)
    # data: root/train/<class>/*, root/val/<class>/*
    data_path=None,
    batch_size=32,  # per process
    accum_iter=1,
    num_workers=10,
    crop_scale=(0.08, 1.0),
    auto_augment="rand-m9-mstd0.5-inc1",  # timm RandAugment string; None: off
    color_jitter=None,
    reprob=0.25,  # random erasing probability
    remode="pixel",
    recount=1,
    eval_crop_pct=224 / 256,  # eval: resize to img_size / crop_pct, centre crop img_size
    mixup=0.8,  # mixup alpha (0: off)
    cutmix=1.0,  # cutmix alpha (0: off)
    cutmix_minmax=None,
    mixup_prob=1.0,
    mixup_switch_prob=0.5,
    mixup_mode="batch",
    smoothing=0.1,  # label smoothing
    # optimisation
    optimizer="adamw",  # adamw | lars | sgd (momentum)
    epochs=100,
    warmup_epochs=5,
    blr=5e-4,  # base lr: lr = blr * batch_size * accum_iter * world_size / 256
    lr=None,  # absolute lr; overrides blr when set
    min_lr=1e-6,
    weight_decay=0.05,
    layer_decay=0.65,
    betas=(0.9, 0.999),
    momentum=0.9,  # lars / sgd
    clip_grad=None,  # max gradient norm (None: no clipping)
    amp="none",  # none | bf16 | fp16 (GPU only, with GradScaler)
    # run
    seed=0,
    device="auto",
    output_dir=None,
    resume="",  # "" (fresh), "auto" (output_dir/checkpoint_last.pth if present) or a checkpoint path
    save_every=10,
    save_epochs=(),  # further epochs with a numbered checkpoint (a study takes several epochs of one run)
    eval_every=1,  # evaluate on val every N epochs (and after the last)
    progress=True,
)


# ---------------------------------------------------------------------------------------------- config
# the kinds of the keys whose default does not say (None, or an integer where a fraction is fine); the other keys
# take the kind of their default
_KINDS_NOT_OF_DEFAULT = {"save_epochs": ("a list of positive integers",),
                         "num_classes": ("an integer", "None"), "lr": ("a number", "None"),
                         "warmup_epochs": ("a number",), "clip_grad": ("a number", "None"),
                         "cutmix_minmax": ("a list", "None"),
                         "color_jitter": ("a number", "a list", "None"), "auto_augment": ("a string", "None"),
                         "data_path": ("a string", "None"), "output_dir": ("a string", "None")}
_RANGES = {**{key: "[0, 1)" for key in ("drop_path", "betas", "momentum", "smoothing")},
           **{key: "[0, 1]" for key in ("mixup_prob", "mixup_switch_prob", "reprob", "cutmix_minmax")},
           **{key: "(0, 1]" for key in ("layer_decay", "crop_scale", "eval_crop_pct")},
           **{key: "[0, inf)" for key in ("warmup_epochs", "min_lr", "weight_decay", "mixup", "cutmix", "recount",
                                          "num_workers", "head_init_std")},
           **{key: "(0, inf)" for key in ("blr", "lr", "clip_grad")}}


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and values checked; unknown keys and bad values raise `MaeTransferError`."""
    unknown = sorted(set(cfg) - set(CLS_DEFAULTS))
    if unknown:
        raise MaeTransferError(f"unknown classification config key(s) {', '.join(map(repr, unknown))}; "
                               f"valid keys: {', '.join(sorted(CLS_DEFAULTS))}")
    cfg = {**copy.deepcopy(CLS_DEFAULTS), **copy.deepcopy(cfg)}
    check_kinds(cfg, CLS_DEFAULTS, _KINDS_NOT_OF_DEFAULT)  # every value's type first: the checks below compare
    check_keyword_overrides(VisionTransformer, cfg["encoder_overrides"], "encoder_overrides")
    vit_config(cfg["model"])  # unknown model name -> MaeTransferError
    for key, allowed in (("mode", MODES), ("optimizer", OPTIMIZERS), ("amp", AMP_MODES),
                         ("global_pool", ("avg", "token"))):
        if cfg[key] not in allowed:
            raise MaeTransferError(f"config key {key!r} must be one of {allowed}, got {cfg[key]!r}")
    for key in ("batch_size", "accum_iter", "epochs", "save_every", "eval_every", "img_size", "num_classes"):
        if cfg[key] is not None and cfg[key] < 1:
            raise MaeTransferError(f"config key {key!r} must be a positive integer, got {cfg[key]!r}")
    check_number_pair(cfg, "betas")
    check_number_pair(cfg, "crop_scale")
    if cfg["cutmix_minmax"] is not None:
        check_number_pair(cfg, "cutmix_minmax")
    check_ranges(cfg, _RANGES)  # values that make no sense: refused here rather than training on them
    if not isinstance(cfg["freeze_blocks"], int) or cfg["freeze_blocks"] < -1:
        raise MaeTransferError(f"freeze_blocks must be -1, 0 or a number of blocks, got {cfg['freeze_blocks']!r}")
    if cfg["mode"] == "linprobe" and cfg["freeze_blocks"] != -1:
        raise MaeTransferError("mode='linprobe' trains the head only: set freeze_blocks=-1 (or use mode='finetune')")
    if mixup_active(cfg) and cfg["batch_size"] % 2:
        raise MaeTransferError(f"mixup/cutmix need an even batch_size, got {cfg['batch_size']}")
    if not cfg["data_path"]:
        raise MaeTransferError("no data given: set data_path in the config or pass --data ROOT (ROOT/train, ROOT/val)")
    if not cfg["output_dir"]:
        raise MaeTransferError("no output folder given: set output_dir in the config or pass --output-dir PATH")
    check_output_dir(cfg["output_dir"], "output_dir")
    return cfg


def mixup_active(cfg: dict[str, Any]) -> bool:
    return cfg["mixup"] > 0 or cfg["cutmix"] > 0 or cfg["cutmix_minmax"] is not None


# ---------------------------------------------------------------------------------------------- data
def train_transform(cfg: dict[str, Any]) -> Any:
    """timm's ImageNet training pipeline: RandomResizedCrop (bicubic) + flip [+ RandAugment, colour jitter,
    random erasing]. With auto_augment=None and reprob=0 it is the linear probe's crop + flip."""
    from timm.data import create_transform

    patch_timm_posterize()  # RandAugment's posterize can ask Pillow 13 for 0 bits (see mae_transfer.compat)
    return create_transform(cfg["img_size"], is_training=True, scale=tuple(cfg["crop_scale"]),
                            color_jitter=cfg["color_jitter"], auto_augment=cfg["auto_augment"] or None,
                            interpolation="bicubic", re_prob=cfg["reprob"], re_mode=cfg["remode"],
                            re_count=cfg["recount"], mean=IMAGENET_MEAN, std=IMAGENET_STD)


def build_datasets(cfg: dict[str, Any]) -> tuple[LabelledImageFolder, LabelledImageFolder]:
    """(train, val) ImageFolders under data_path; their class folders must be the same."""
    root = Path(cfg["data_path"])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise MaeTransferError(f"{root / split} not found: "
                                   "the data root needs train/<class>/ and val/<class>/ folders")
    train = LabelledImageFolder(root / "train", train_transform(cfg), strict=True)
    val = LabelledImageFolder(root / "val", eval_transform(cfg["img_size"], cfg["eval_crop_pct"]), strict=True)
    if val.classes != train.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise MaeTransferError(f"{root}: train and val class folders differ (only in train: {only_train}, "
                               f"only in val: {only_val})")
    return train, val


# ---------------------------------------------------------------------------------------------- model
def build_classifier(cfg: dict[str, Any], num_classes: int) -> VisionTransformer:
    """Our ViT with a classification head: `fc_norm` + linear (global_pool='avg'), or, for the linear probe,
    `head = Sequential(BatchNorm1d(affine=False), Linear)` on the cls token (the official linprobe layout,
    so its checkpoints use `head.1.weight`)."""
    vit = create_vit(cfg["model"], img_size=cfg["img_size"], **{
        **cfg["encoder_overrides"], "num_classes": num_classes, "global_pool": cfg["global_pool"],
        "drop_path_rate": cfg["drop_path"]})
    if cfg["mode"] == "linprobe":
        vit.head = nn.Sequential(nn.BatchNorm1d(vit.embed_dim, affine=False, eps=1e-6), vit.head)
    return vit


def classifier_head(model: VisionTransformer) -> nn.Linear:
    return model.head[-1] if isinstance(model.head, nn.Sequential) else model.head


def init_from_pretrained(path: str, model: VisionTransformer, cfg: dict[str, Any]) -> None:
    """Load pretrained weights (any supported format, pos-embed resampled) and start a new head, as the
    official fine-tuning does: a head in the checkpoint is not kept; fc_norm is kept if present."""
    sd, report = load_backbone_state_dict(path, model, cfg["allow_pickle"])
    model.load_state_dict(sd, strict=True)
    logger.info("%s", report)
    head = classifier_head(model)
    nn.init.trunc_normal_(head.weight, std=cfg["head_init_std"])
    nn.init.zeros_(head.bias)


def load_for_eval(path: str | Path, model: VisionTransformer, allow_pickle: bool = False) -> None:
    """Load a whole fine-tuned classifier (ours, official MAE fine-tuned / linprobe, timm, DeiT, HF ...):
    every tensor must be there and the head must have the data's number of classes."""
    sd, report = load_backbone_state_dict(str(path), model, allow_pickle)
    head_notes = [n for n in report.notes if n.startswith("'head")]
    if head_notes:
        raise MaeTransferError(f"{path}: checkpoint head does not match the data's "
                               f"{classifier_head(model).out_features} classes ({head_notes[0]})")
    if report.missing:
        raise MaeTransferError(f"{path}: not a fine-tuned classifier for this config: {len(report.missing)} tensor(s) "
                               f"missing, e.g. {report.missing[0]!r} (mode/global_pool must match the checkpoint)")
    model.load_state_dict(sd, strict=True)
    logger.info("%s", report)


# ---------------------------------------------------------------------------------------------- optimiser
def build_optimizer(model: VisionTransformer, cfg: dict[str, Any], base_lr: float) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay (the shared `param_groups`), or LARS / SGD for the linear probe.
    Every group carries `lr_scale`; the schedule sets `lr = lr_at(...) * lr_scale`."""
    groups = param_groups(model, base_lr, cfg["weight_decay"], cfg["layer_decay"], num_layers=len(model.blocks))
    if not groups:
        raise MaeTransferError("nothing to train: every parameter is frozen")
    if cfg["optimizer"] == "adamw":
        return runtime.adamw(groups, base_lr, cfg["betas"])
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=cfg["momentum"])
    from timm.optim import Lars

    # The official MAE LARS scales the update of weight matrices only (not biases / norms), even with no
    # weight decay: timm's Lars does that per group with always_adapt.
    for g in groups:
        g["always_adapt"] = any(p.ndim > 1 for p in g["params"])
    return Lars(groups, lr=base_lr, momentum=cfg["momentum"], trust_coeff=0.001)


def build_criterion(cfg: dict[str, Any]) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active(cfg):
        return SoftTargetCrossEntropy()  # mixup produces smoothed soft targets
    if cfg["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    return nn.CrossEntropyLoss()


def build_mixup(cfg: dict[str, Any], num_classes: int) -> Any:
    if not mixup_active(cfg):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], cutmix_minmax=cfg["cutmix_minmax"],
                 prob=cfg["mixup_prob"], switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                 label_smoothing=cfg["smoothing"], num_classes=num_classes)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             amp_dtype: torch.dtype | None = None, world: int = 1) -> dict[str, float]:
    """Top-1 / top-k (k = min(5, classes)) accuracy in percent and cross-entropy over the loader's images;
    under DDP every process evaluates its own shard and the sums are reduced (exact, no padding)."""
    model.eval()
    k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-k, count
    for imgs, labels in loader:
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(imgs)
        logits = logits.float()
        topk = logits.topk(k, dim=-1).indices
        totals += torch.stack([
            nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            (topk[:, 0] == labels).sum().double(),
            (topk == labels[:, None]).any(-1).sum().double(),
            torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(totals)
    n = max(float(totals[3]), 1.0)
    return {"acc1": 100.0 * float(totals[1]) / n, "acc5": 100.0 * float(totals[2]) / n, "topk": k,
            "loss": float(totals[0]) / n, "num_images": int(totals[3])}


def _val_loader(val: LabelledImageFolder, cfg: dict[str, Any], rank: int, world: int,
                device: torch.device) -> DataLoader:
    shard = Subset(val, range(rank, len(val), world)) if world > 1 else val
    return DataLoader(shard, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["num_workers"],
                      pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------------------------------- task
class ClassificationTask(Task):
    """Classifier on train/, mixup/cutmix + the config's criterion; val/ top-1 / top-5 every `eval_every` epochs
    and after the last (`acc1`, `acc5`, `val_loss` in the history); `eval_metrics.json` at the end."""

    checkpoint_format = CLASSIFIER_FORMAT
    tool = TOOL
    epoch_scalars = {"acc1": "val/acc1", "acc5": "val/acc5", "val_loss": "val/loss"}

    def build_data(self) -> LabelledImageFolder:
        cfg = self.cfg
        self.train_set, self.val_set = build_datasets(cfg)
        self.num_classes = cfg["num_classes"] = _num_classes(cfg, self.train_set)
        self.val_loader = _val_loader(self.val_set, cfg, self.rank, self.world, self.device)
        self.criterion, self.mixup = build_criterion(cfg), build_mixup(cfg, self.num_classes)
        return self.train_set

    def build_model(self) -> VisionTransformer:
        cfg = self.cfg
        model = build_classifier(cfg, self.num_classes)
        if cfg["finetune"]:
            if not Path(cfg["finetune"]).exists():
                raise MaeTransferError(f"pretrained checkpoint not found: {cfg['finetune']}")
            init_from_pretrained(cfg["finetune"], model, cfg)
        else:
            nn.init.trunc_normal_(classifier_head(model).weight, std=cfg["head_init_std"])
            logger.info("no pretrained weights (finetune=''): training from random init")
        if cfg["freeze_blocks"]:
            model.freeze_blocks(cfg["freeze_blocks"])
        return model

    def build_optimizer(self, model: nn.Module, base_lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg, base_lr)

    def forward(self, net: nn.Module, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        imgs, labels = (t.to(self.device, non_blocking=True) for t in batch)
        targets = labels
        if self.mixup is not None:
            imgs, targets = self.mixup(imgs, labels)  # (element-wise and indexing ops: autocast leaves them fp32)
        return self.criterion(net(imgs).float(), targets), {}

    def describe(self) -> str:
        cfg = self.cfg
        return (f"{cfg['mode']} {cfg['model']}: {self.num_classes} classes, {len(self.train_set)} train / "
                f"{len(self.val_set)} val images, freeze_blocks {cfg['freeze_blocks']}")

    def end_epoch(self, net: nn.Module, record: dict[str, Any], totals: dict[str, float], seconds: float) -> None:
        record["seconds"] = round(seconds, 1)
        if record["epoch"] % self.cfg["eval_every"] == 0 or record["epoch"] == self.cfg["epochs"]:
            metrics = evaluate(net, self.val_loader, self.device, self.num_classes, self.amp_dtype, self.world)
            record.update({"acc1": metrics["acc1"], "acc5": metrics["acc5"], "val_loss": metrics["loss"]})

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"classes": list(self.train_set.classes)}

    def finish(self, history: list[dict[str, Any]]) -> None:
        last = history[-1]  # the last epoch is always evaluated
        _write_metrics(self.cfg, {"acc1": last["acc1"], "acc5": last["acc5"], "loss": last["val_loss"],
                                  "topk": min(5, self.num_classes), "num_images": len(self.val_set)},
                       self.train_set.classes, Path(self.cfg["output_dir"]) / LAST_CHECKPOINT, last["epoch"],
                       max_acc1=max(h["acc1"] for h in history if "acc1" in h))


# ---------------------------------------------------------------------------------------------- entry points
def finetune(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or resume) a classifier; returns the per-epoch history (loss, lr, acc1, acc5, ...)."""
    return runtime.train(ClassificationTask(resolve_config(cfg)))


def evaluate_checkpoint(cfg: dict[str, Any], checkpoint: str | Path) -> dict[str, float]:
    """`--eval-only`: load a fine-tuned classifier ("auto": output_dir/checkpoint_last.pth), evaluate it on
    data_path/val, write output_dir/eval_metrics.json. Returns {"acc1", "acc5", "topk", "loss", "num_images",
    "checkpoint"}."""
    cfg = resolve_config(cfg)
    path = Path(cfg["output_dir"]) / LAST_CHECKPOINT if str(checkpoint) == "auto" else Path(checkpoint)
    if not path.is_file():  # before the data is read: a missing checkpoint is one line at once
        raise MaeTransferError(f"--eval-only: no checkpoint in {cfg['output_dir']} ({LAST_CHECKPOINT} not found); "
                               "pass --eval-only CKPT" if str(checkpoint) == "auto" else
                               f"--eval-only: checkpoint not found: {path}")
    with runtime.distributed(cfg["device"]) as (rank, world, device):
        _, val = build_datasets(cfg)
        nc = _num_classes(cfg, val)
        model = build_classifier(cfg, nc)
        load_for_eval(path, model, cfg["allow_pickle"])
        model.to(device)
        amp_dtype = autocast_dtype(cfg["amp"], device)  # bf16 on a CPU without bf16 units: fp32
        metrics = evaluate(model, _val_loader(val, cfg, rank, world, device), device, nc, amp_dtype, world)
        metrics["checkpoint"] = str(path)
        if rank == 0:
            _write_metrics(cfg, metrics, val.classes, path, None)
        return metrics


def _num_classes(cfg: dict[str, Any], dataset: LabelledImageFolder) -> int:
    found = len(dataset.classes)
    if cfg["num_classes"] is not None and cfg["num_classes"] != found:
        raise MaeTransferError(f"num_classes={cfg['num_classes']} but {dataset.root} has {found} class folders")
    return found


def _write_metrics(cfg: dict[str, Any], metrics: dict[str, Any], classes: list[str], checkpoint: Path,
                   epoch: int | None, **details: Any) -> Path:
    """eval_metrics.json (`mae_transfer.metrics`): task "cls", metrics top1 / top5 (percent) / loss (val
    cross-entropy); details: num_images, topk, classes, mode, freeze_blocks, finetune, ..."""
    return write_eval_metrics(
        cfg["output_dir"], "cls", {"top1": metrics["acc1"], "top5": metrics["acc5"], "loss": metrics["loss"]},
        tool=TOOL, epoch=epoch, checkpoint=checkpoint,
        details={"num_images": metrics["num_images"], "topk": metrics["topk"], "classes": list(classes),
                 "mode": cfg["mode"], "freeze_blocks": cfg["freeze_blocks"], "finetune": cfg["finetune"], **details})


# ----------------------------------------------------------------------------------------- a study's input check

def check_study_task(args: Any, check: Check) -> None:
    """A study cell's config (with its overrides, every unknown key reported) and data, before anything runs
    (`TaskKind.input_check` of its kind in mae_transfer/task_kinds.py)."""
    what = f"config {Path(args.config).name}"
    cfg = check(what, load_config, args.config)
    if cfg is None:
        return
    cfg = each_override(check, what, plain_override, cfg, args.overrides)
    for key, value in (("data_path", args.data), ("output_dir", args.output_dir), ("finetune", args.finetune),
                       ("freeze_blocks", args.freeze_blocks)):  # as tools/finetune_cls.py sets them
        if value is not None:
            cfg[key] = value
    if check(what, resolve_config, cfg) is None or not cfg.get("data_path"):
        return
    root = tool_path(cfg["data_path"])  # classification.build_datasets opens root/train and root/val
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        found = "not found" if not root.is_dir() else f"has no {' and no '.join(f'{s}/' for s in missing)} folder"
        check(None, raise_problem, f"data root {root} {found}: it needs train/<class>/ and val/<class>/ folders")
