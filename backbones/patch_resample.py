"""Patch-embedding kernel resampling (FlexiViT's pseudo-inverse resize), for patch-14 families (DINOv2, EVA-02) in
the 16-pixel det/seg recipes: detectron2's ROI pooler wants power-of-two strides and the UperNet recipe whole
16-px patches. The kernel W' solves min ||resize(x)^T W' - x^T W|| for every patch x, so a token of a 16-px patch
matches the 14-px token of the same patch shrunk to 14 px (exact only for band-limited images: an approximation
whose cost is measured by fine-tuning, not by parity).

timm's `resample_patch_embed` is used when timm is installed (its default: bicubic resize with antialias); the
torch fallback computes the same matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """(new_h*new_w, old_h*old_w): the linear map of a bicubic, antialiased resize of an old-size patch."""
    eye = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)
    out = F.interpolate(eye.float(), size=new, mode="bicubic", antialias=True).double()
    return out.reshape(old[0] * old[1], -1).t()


def resample_patch_embed(weight: Tensor, new_size: tuple[int, int] | int) -> Tensor:
    """A (C_out, C_in, h, w) conv kernel resampled to new_size (FlexiViT pseudo-inverse)."""
    new = (new_size, new_size) if isinstance(new_size, int) else tuple(new_size)
    if tuple(weight.shape[-2:]) == new:
        return weight
    try:
        from timm.layers import resample_patch_embed as timm_resample
    except ImportError:
        timm_resample = None
    if timm_resample is not None:
        return timm_resample(weight, list(new))
    return resample_patch_embed_torch(weight, new)


def resample_patch_embed_torch(weight: Tensor, new: tuple[int, int]) -> Tensor:
    """The same resampling without timm."""
    old = tuple(weight.shape[-2:])
    pinv = torch.linalg.pinv(_resize_matrix(old, new).t())  # (new, old)
    flat = weight.reshape(-1, old[0] * old[1]).double()
    return (flat @ pinv.t()).reshape(*weight.shape[:2], *new).to(weight.dtype)
