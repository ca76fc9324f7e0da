"""Writing: our ViT's weights as the backbone file (`save_backbone`), and in the layouts detectron2's
`DetectionCheckpointer` and mmengine's `load_checkpoint` read (`to_detectron2`, `to_mmseg`); `convert_checkpoint`
reads any supported format and writes one of them. Every write is atomic."""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from backbones.vit import VisionTransformer
from mae_transfer.checkpoint.fitting import Source, load_backbone
from mae_transfer.checkpoint.formats import BACKBONE_FORMAT, DETECTRON2_PREFIX, MMSEG_PREFIX, StateDict
from mae_transfer.checkpoint.report import LoadReport
from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to a temp file in the same folder, then renamed (`mae_transfer.io.atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _arch_of(model: VisionTransformer) -> dict[str, Any]:
    return dict(img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
                depth=model.depth, num_heads=model.num_heads, class_token=model.cls_token is not None,
                window_size=model.window_size, global_block_indexes=list(model.global_block_indexes))


def _as_state_dict(model_or_sd: VisionTransformer | Mapping[str, Tensor]) -> StateDict:
    if isinstance(model_or_sd, torch.nn.Module):
        return {k: v.detach().cpu().clone() for k, v in model_or_sd.state_dict().items()}
    return {k: v.detach().cpu() for k, v in model_or_sd.items()}


def save_backbone(model_or_sd: VisionTransformer | Mapping[str, Tensor], path: str | os.PathLike,
                  arch: Mapping[str, Any] | None = None, **info: Any) -> Path:
    """The one backbone file (encoder-only export): {"format": "mae_transfer_backbone", "model": our ViT state
    dict, "arch": VisionTransformer kwargs, **info}; `info` holds plain values such as "name" (the backbones.vit
    name: `create_vit(ckpt["name"], **ckpt["arch"])` rebuilds the model) and where the weights come from."""
    if arch is None and isinstance(model_or_sd, VisionTransformer):
        arch = _arch_of(model_or_sd)
    return atomic_torch_save({**info, "format": BACKBONE_FORMAT, "model": _as_state_dict(model_or_sd),
                              "arch": dict(arch or {})}, path)


# Our keys detectron2's `ViT` has no tensor for: it keeps the cls row of the position table (pretrain_use_cls_token)
# but has no cls token, final norm or head.
_NOT_IN_DETECTRON2_VIT = re.compile(r"^(cls_token|(norm|fc_norm|head)\..*)$")


def to_detectron2(model_or_sd: VisionTransformer | Mapping[str, Tensor], path: str | os.PathLike,
                  prefix: str = DETECTRON2_PREFIX, detectron2_vit_keys_only: bool = False) -> Path:
    """File for detectron2's `DetectionCheckpointer`: {"model": {"backbone.net.<our key>": ...}}.

    detectron2_vit_keys_only: leave out the keys detectron2's own `ViT` lacks (`cls_token`, a final norm, a head),
    so that it loads the file with no unused key; our `ViTBackbone` then keeps its (unused) cls token's init.
    """
    sd = {prefix + k: v for k, v in _as_state_dict(model_or_sd).items()
          if not (detectron2_vit_keys_only and _NOT_IN_DETECTRON2_VIT.match(k))}
    return atomic_torch_save({"model": sd, "__author__": "mae_transfer", "matching_heuristics": False}, path)


def to_mmseg(model_or_sd: VisionTransformer | Mapping[str, Tensor], path: str | os.PathLike,
             prefix: str = MMSEG_PREFIX) -> Path:
    """File for mmengine's `load_checkpoint` / `load_from`: {"state_dict": {"backbone.<our key>": ...}, "meta": ...}."""
    sd = {prefix + k: v for k, v in _as_state_dict(model_or_sd).items()}
    return atomic_torch_save({"state_dict": sd, "meta": {"converted_by": "mae_transfer"}}, path)


# The converter's detectron2 file is for detectron2's own ViTDet as well as ours: only the keys its `ViT` has.
WRITERS: dict[str, Callable[..., Path]] = {"backbone": save_backbone, "mmseg": to_mmseg,
                                           "detectron2": partial(to_detectron2, detectron2_vit_keys_only=True)}


def convert_checkpoint(source: Source, dst: str | os.PathLike, to: str, model: VisionTransformer,
                       allow_pickle: bool = False) -> LoadReport:
    """Read `source` for `model`, load it, and write `dst` in the `to` layout (atomic; nothing left on failure)."""
    if to not in WRITERS:
        raise MaeTransferError(f"unknown target layout {to!r}; expected one of {', '.join(WRITERS)}")
    report = load_backbone(source, model, allow_pickle)
    WRITERS[to](model, dst)
    return report
