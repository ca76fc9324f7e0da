"""Pretraining of the plain ViT (after facebookresearch/mae `main_pretrain.py`): MAE, and the supervised baseline.

`objective = "mae"` (default) trains a `MaskedAutoencoder` on any image folder. `objective = "supervised"`
trains the same ViT with a linear head on the cls token (cross-entropy with `label_smoothing`) on a
labelled ImageFolder (class = first-level subfolder, `num_classes` inferred from the folders), so MAE
and supervised pretraining can be compared on equal data with equal data loading, schedule, AMP, DDP,
checkpoints and TensorBoard. Both models keep the ViT under `encoder.*`, so `export_encoder` writes the
same backbone file for either (the classifier head is left out).

`pretrain(cfg)` runs the shared training loop (`mae_transfer.runtime.train`: DDP, AMP, accumulation, exact
resume, checkpoints, log.jsonl, TensorBoard) with this module's task. Recipe: RandomResizedCrop(0.2-1) + flip,
AdamW betas (0.9, 0.95) with weight decay 0.05 on weight matrices only, lr = blr * effective batch / 256,
per-iteration warmup + cosine. Besides the runtime's outputs, MAE runs write `recon_epochXXXX.png` with each
numbered checkpoint.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backbones.lr_decay import no_weight_decay, param_groups
from backbones.vit import VisionTransformer, create_vit, vit_config
from mae_transfer import runtime
from mae_transfer.checkpoint import save_backbone
from mae_transfer.config import check_keyword_overrides, check_kinds, check_number_pair, check_ranges
from mae_transfer.data import ImageFolderDataset, LabelledImageFolder, eval_transform, pretrain_transform, unnormalize
from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write, check_output_dir
from mae_transfer.mae import MASKING_STRATEGIES, MaskedAutoencoder, unpatchify
from mae_transfer.pictures import label_rows
from mae_transfer.runtime import AMP_MODES, Task

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mae_transfer_pretrain"
RECON_MIN_SIZE = 160  # px per image in recon_epoch*.png, at least
TOOL = "tools/pretrain.py"
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
    save_epochs=(),  # further epochs with a numbered checkpoint (a study takes several epochs of one run)
    recon_images=4,
    progress=True,  # tqdm bar on rank 0
)


# ---------------------------------------------------------------------------------------------- config
# the kinds of the keys whose default does not say (None, or an integer where a fraction is fine); the other keys
# take the kind of their default
_KINDS_NOT_OF_DEFAULT = {"save_epochs": ("a list of positive integers",),
                         "num_classes": ("an integer", "None"), "lr": ("a number", "None"),
                         "warmup_epochs": ("a number",), "data_path": ("a string", "None"),
                         "output_dir": ("a string", "None")}
_RANGES = {**{key: "[0, 1)" for key in ("mask_ratio", "label_smoothing", "betas")}, "crop_scale": "(0, 1]",
           **{key: "[0, inf)" for key in ("warmup_epochs", "min_lr", "weight_decay", "num_workers", "recon_images")},
           **{key: "(0, inf)" for key in ("blr", "lr")}}


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and values checked; unknown keys and bad values raise `MaeTransferError`."""
    unknown = sorted(set(cfg) - set(PRETRAIN_DEFAULTS))
    if unknown:
        raise MaeTransferError(
            f"unknown pretraining config key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(sorted(PRETRAIN_DEFAULTS))}"
        )
    cfg = {**copy.deepcopy(PRETRAIN_DEFAULTS), **copy.deepcopy(cfg)}
    check_kinds(cfg, PRETRAIN_DEFAULTS, _KINDS_NOT_OF_DEFAULT)  # every value's type first: the checks below compare
    check_keyword_overrides(VisionTransformer, cfg["encoder_overrides"], "encoder_overrides")
    vit_config(cfg["encoder"])  # unknown model name -> MaeTransferError
    if cfg["objective"] not in OBJECTIVES:
        raise MaeTransferError(f"objective must be one of {OBJECTIVES}, got {cfg['objective']!r}")
    if cfg["amp"] not in AMP_MODES:
        raise MaeTransferError(f"amp must be one of {AMP_MODES}, got {cfg['amp']!r}")
    if cfg["masking"] not in MASKING_STRATEGIES:
        raise MaeTransferError(f"masking must be one of {MASKING_STRATEGIES}, got {cfg['masking']!r}")
    for key in ("batch_size", "accum_iter", "epochs", "save_every", "img_size", "decoder_embed_dim",
                "decoder_depth", "decoder_num_heads", "num_classes"):
        if cfg[key] is not None and cfg[key] < 1:
            raise MaeTransferError(f"config key {key!r} must be a positive integer, got {cfg[key]!r}")
    check_number_pair(cfg, "betas")
    check_number_pair(cfg, "crop_scale")
    check_ranges(cfg, _RANGES)  # values that make no sense: refused here rather than training on them
    if not cfg["data_path"]:
        raise MaeTransferError("no image folder given: set data_path in the config or pass --data PATH")
    if not cfg["output_dir"]:
        raise MaeTransferError("no output folder given: set output_dir in the config or pass --output-dir PATH")
    check_output_dir(cfg["output_dir"], "output_dir")
    return cfg


def encoder_arch(cfg: dict[str, Any]) -> dict[str, Any]:
    """VisionTransformer kwargs of the encoder a pretraining config builds."""
    return {**vit_config(cfg["encoder"]), **cfg.get("encoder_overrides", {}), "img_size": cfg["img_size"]}


# ---------------------------------------------------------------------------------------------- models
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


def build_optimizer(model: nn.Module, cfg: dict[str, Any], base_lr: float) -> torch.optim.AdamW:
    """AdamW on the shared parameter groups (`backbones.lr_decay.param_groups`) without layer-wise decay:
    weight matrices with `weight_decay`; norms, biases, position tables, cls / mask tokens without."""
    # No parameter name starts with ".", so every parameter sits outside "the backbone", in one layer (lr_scale 1):
    # two groups, decay / no decay, each in parameter order. No-decay first: the layout of the checkpoints written
    # before pretraining used the shared builder, so they still resume.
    groups = param_groups(model, weight_decay=cfg["weight_decay"], layer_decay=1.0, num_layers=0, backbone_prefix=".")
    groups.sort(key=lambda g: not no_weight_decay(g["param_names"][0], g["params"][0]))
    return runtime.adamw(groups, base_lr, cfg["betas"])


# ---------------------------------------------------------------------------------------------- task
class PretrainingTask(Task):
    """MAE (masking noise from the epoch's generator; reconstruction pictures) or the supervised classifier
    (labels; training accuracy `acc` in the history, the class folders in each checkpoint)."""

    checkpoint_format = CHECKPOINT_FORMAT
    tool = TOOL
    epoch_scalars = {"acc": "train/epoch_acc"}

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.supervised = cfg["objective"] == "supervised"

    def build_data(self) -> ImageFolderDataset:
        cfg = self.cfg
        transform = pretrain_transform(cfg["img_size"], cfg["crop_scale"])
        folder = LabelledImageFolder if self.supervised else ImageFolderDataset
        self.dataset = folder(cfg["data_path"], transform)
        # Fails early if nothing decodes; the images are the reconstruction pictures' inputs.
        self.recon_idx = self.dataset.readable_indices(max(1, cfg["recon_images"]))[:cfg["recon_images"]]
        if self.supervised:
            self.recon_idx = []  # no reconstruction pictures for a classifier
            found = len(self.dataset.classes)
            if cfg["num_classes"] is not None and cfg["num_classes"] != found:
                raise MaeTransferError(f"num_classes={cfg['num_classes']} but {cfg['data_path']} "
                                       f"has {found} class folders")
            cfg["num_classes"] = found
        return self.dataset

    def build_model(self) -> nn.Module:
        self.model = build_model(self.cfg)  # unwrapped: the masking noise comes from it
        return self.model

    def build_optimizer(self, model: nn.Module, base_lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg, base_lr)

    def forward(self, net: nn.Module, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        if self.supervised:
            imgs, labels = (t.to(self.device, non_blocking=True) for t in batch)
            loss, logits = net(imgs, labels)
            return loss, {"correct": float((logits.argmax(-1) == labels).sum()), "images": float(len(labels))}
        imgs = batch.to(self.device, non_blocking=True)
        loss, _, _ = net(imgs, self.model.make_noise(imgs.shape[0], self.device, generator))
        return loss, {}

    def describe(self) -> str:
        kind = "supervised" if self.supervised else "MAE"
        return f"{kind} pretraining {self.cfg['encoder']}: {len(self.dataset)} images"

    def end_epoch(self, net: nn.Module, record: dict[str, Any], totals: dict[str, float], seconds: float) -> None:
        if self.supervised:
            record["acc"] = totals["correct"] / totals["images"]

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"classes": list(self.dataset.classes)} if self.supervised else {}  # class index -> folder name

    def after_checkpoint(self, model: nn.Module, epoch: int, numbered: Path | None) -> None:
        if numbered is None or not self.recon_idx:
            return
        cfg = self.cfg
        imgs = torch.stack([eval_transform(cfg["img_size"])(self.dataset.load(i)) for i in self.recon_idx])
        picture = save_reconstruction(model, imgs, Path(cfg["output_dir"]) / f"recon_epoch{epoch:04d}.png", cfg["seed"])
        logger.info("saved %s and %s", numbered, picture)


def pretrain(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Run (or resume) pretraining; returns the per-epoch history [{"epoch", "loss", "lr"}, ...]
    (supervised runs add "acc", the training accuracy of the epoch)."""
    return runtime.train(PretrainingTask(resolve_config(cfg)))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by `pretrain` (`runtime.load_checkpoint` of this format)."""
    return runtime.load_checkpoint(path, CHECKPOINT_FORMAT, TOOL)


# ---------------------------------------------------------------------------------------------- pictures
@torch.no_grad()
def save_reconstruction(model: MaskedAutoencoder, imgs: torch.Tensor, path: Path, seed: int) -> Path:
    """Rows, labelled on the left: original / masked input / reconstruction with the visible patches pasted back."""
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
    rows = torch.cat([unnormalize(imgs), masked_view, unnormalize(pasted)]).cpu()
    # small inputs (96 px on CPU) are enlarged by a whole factor, nearest, so the patches stay crisp
    factor = -(-RECON_MIN_SIZE // rows.shape[-1])
    if factor > 1:
        rows = torch.nn.functional.interpolate(rows, scale_factor=factor, mode="nearest")
    pad = 2
    grid = make_grid(rows, nrow=imgs.shape[0], padding=pad, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    from PIL import Image

    labels = ("original", f"masked ({model.mask_ratio:.0%})", "reconstruction")
    picture = label_rows(Image.fromarray(array), labels, row_height=rows.shape[-2], padding=pad)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------- export
def export_encoder(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, epoch: int | None = None) -> Path:
    """Write the encoder of a pretraining checkpoint (MAE or supervised) alone, as the backbone file of
    `mae_transfer.checkpoint.save_backbone`: {"model": ViT state_dict (our keys, no 'encoder.' prefix, no classifier
    head), "arch": VisionTransformer kwargs, "name": backbones.vit name, "format": "mae_transfer_backbone",
    "objective": "mae" | "supervised", "source": the checkpoint, "epoch": its completed epochs}. Load with
    `create_vit(ckpt["name"], **ckpt["arch"]).load_state_dict(ckpt["model"])`.

    The checkpoint must be of a finished run (all its `epochs` done), or hold exactly `epoch` completed epochs:
    an interrupted run's `checkpoint_last.pth` is refused, so that it is not taken for the pretrained backbone.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise MaeTransferError(f"pretraining checkpoint not found: {path}")
    ckpt = load_checkpoint(path)
    done, total = int(ckpt["epoch"]), int(ckpt["config"]["epochs"])
    if epoch is not None and done != epoch:
        raise MaeTransferError(f"{path} holds the weights after epoch {done}, not after epoch {epoch} as asked")
    if epoch is None and done < total:
        raise MaeTransferError(f"{path} is from an unfinished run ({done} of {total} epochs): resume the run "
                               f"(tools/pretrain.py ... --resume) and export its end, or export this epoch on purpose "
                               f"with --epoch {done}")
    prefix = "encoder."
    # The supervised classifier's head is task-specific: the backbone is everything else.
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items()
             if k.startswith(prefix) and not k.startswith(prefix + "head.")}
    if not state:
        raise MaeTransferError(f"{path} holds no 'encoder.*' weights")
    cfg = ckpt["config"]
    out = save_backbone(state, out_path, encoder_arch(cfg), name=cfg["encoder"], objective=cfg.get("objective", "mae"),
                        source=str(path), epoch=ckpt["epoch"])
    logger.info("exported the encoder of %s (%d tensors, epoch %d) to %s", path, len(state), ckpt["epoch"], out)
    return out
