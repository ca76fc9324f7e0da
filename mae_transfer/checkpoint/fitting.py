"""Fitting: a state dict in our key names adapted to a target `VisionTransformer` (shapes checked, the absolute
position table resampled with `backbones.vit.resize_abs_pos`, rel-pos tables resized, cls row handled, BEiT layer
scale folded), and the loading API on top: `load_backbone_state_dict(source, model)` / `load_backbone(source,
model)` read any supported format (`formats`) and return a `LoadReport`.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from backbones.vit import VisionTransformer, resize_abs_pos, resize_rel_pos, resize_rel_pos_bias_table
from mae_transfer.checkpoint.families import fit_patch_size
from mae_transfer.checkpoint.formats import StateDict, match_format
from mae_transfer.checkpoint.hub import is_hub_name, resolve_hub_name
from mae_transfer.checkpoint.reading import read_checkpoint, unwrap_state_dict
from mae_transfer.checkpoint.report import LoadReport
from mae_transfer.errors import MaeTransferError

logger = logging.getLogger("mae_transfer.checkpoint")

Source = str | os.PathLike | Mapping[str, Any]


def _prefix_rows(num: int) -> int | None:
    """Number of prefix (cls/dist) rows of a (1, P+g*g, C) table, or None if no P in 0..2 fits."""
    for p in (1, 0, 2):
        side = math.isqrt(max(num - p, 0))
        if side > 0 and side * side == num - p:
            return p
    return None


_CORE = re.compile(r"^(patch_embed\.proj\.weight|blocks\.\d+\.(norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.weight)$")


def fit_state_dict(sd: StateDict, model: VisionTransformer, report: LoadReport) -> StateDict:
    """Adapt a state dict in our naming to `model`: shapes checked, pos-embed/rel-pos resized, cls handled.

    Returns a complete state dict for `model.load_state_dict(..., strict=True)`: keys the checkpoint
    lacks (rel-pos tables, cls token, norm for ViTDet/mmseg backbones) keep the model's current values.
    """
    target = model.state_dict()
    out: StateDict = {}
    sd = _fit_beit_extras(dict(sd), target, model, report)
    fit_patch_size(sd, model, report)  # 14-px families into 16-px recipes (checkpoint.families)
    src_blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if src_blocks and max(src_blocks) + 1 != model.depth:
        key = f"blocks.{min(max(src_blocks), model.depth)}.attn.qkv.weight"
        raise MaeTransferError(
            f"checkpoint has {max(src_blocks) + 1} blocks but the model has {model.depth} "
            f"(key '{key}'): the checkpoint is for a different architecture (depth)")
    for key, ref in target.items():
        if key not in sd and _BEIT_EXTRA.match(key):
            out[key] = ref  # counted in `_fit_beit_extras`'s note: started at their init, not missing
            continue
        if key not in sd:
            if _CORE.match(key):
                raise MaeTransferError(f"checkpoint ({report.format}) has no '{key}', which the model needs "
                                       f"(shape {tuple(ref.shape)})")
            report.missing.append(key)
            out[key] = ref
            continue
        v = sd[key]
        if key == "pos_embed":
            v = _fit_pos_embed(v, model, report)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and v.shape != ref.shape and v.shape[1:] == ref.shape[1:]:
            report.resized[key] = (tuple(v.shape), tuple(ref.shape))
            v = resize_rel_pos(v, ref.shape[0])
        elif key == "cls_token" and v.shape != ref.shape and v.numel() == ref.numel():
            v = v.reshape(ref.shape)
        if v.shape != ref.shape:
            if key.startswith("head."):  # another number of classes: keep the model's head
                report.notes.append(f"'{key}' has shape {tuple(v.shape)}, model {tuple(ref.shape)}: head not loaded")
                report.missing.append(key)
                out[key] = ref
                continue
            raise MaeTransferError(
                f"checkpoint key '{key}' has shape {tuple(v.shape)} but the model expects {tuple(ref.shape)}: "
                "the checkpoint is for a different architecture (width/depth/patch size)")
        out[key] = v.to(ref.dtype)
        report.loaded.append(key)
    report.unexpected.extend(k for k in sd if k not in target)
    return out


_BEIT_EXTRA = re.compile(r"^blocks\.(\d+)\.(gamma_[12]|attn\.relative_position_bias_table)$")


def _fit_beit_extras(sd: StateDict, target: StateDict, model: VisionTransformer, report: LoadReport) -> StateDict:
    """Layer scale and BEiT relative position bias tables (mmseg MAE/BEiT files) against `model`.

    The model has them: loaded as they are, a table resized to the model's grid if needed. The model lacks
    them: layer scale is folded into attn.proj / mlp.fc2 (exact); a non-zero table cannot be represented and
    is dropped with a warning. The checkpoint lacks them (e.g. MAE pretraining): the model's init is kept,
    which is how BEiT/mmseg start fine-tuning (gamma = init_values, zero table), so they are not `missing`.
    """
    folded, rel_nonzero = False, 0
    for key in [k for k in sd if _BEIT_EXTRA.match(k)]:
        i, name = _BEIT_EXTRA.match(key).groups()
        v = sd[key]
        if key in target:
            if name == "attn.relative_position_bias_table" and v.shape != target[key].shape:
                grid = model.blocks[int(i)].attn.rel_pos_bias_grid
                side = (math.isqrt(v.shape[0] - 3) + 1) // 2
                if (2 * side - 1) ** 2 + 3 != v.shape[0] or v.shape[1:] != target[key].shape[1:]:
                    raise MaeTransferError(f"checkpoint key '{key}' has shape {tuple(v.shape)} but the model "
                                           f"expects {tuple(target[key].shape)}: different heads or not a square grid")
                sd[key] = resize_rel_pos_bias_table(v, (side, side), grid)
                report.resized[key] = (tuple(v.shape), tuple(target[key].shape))
            continue
        del sd[key]
        if name.startswith("gamma"):
            # x + g * (W h + b) == x + (diag(g) W) h + g b, exactly.
            lin = f"blocks.{i}.{'attn.proj' if name == 'gamma_1' else 'mlp.fc2'}"
            if f"{lin}.weight" in sd:
                sd[f"{lin}.weight"] = sd[f"{lin}.weight"] * v[:, None]
                sd[f"{lin}.bias"] = sd[f"{lin}.bias"] * v
                folded = True
        elif bool(v.abs().max() > 0):
            rel_nonzero += 1
    if folded:
        report.notes.append("layer scale (gamma_1/gamma_2) folded into attn.proj and mlp.fc2 "
                            "(the model has no layer scale)")
    if rel_nonzero:
        report.notes.append(f"{rel_nonzero} blocks have non-zero BEiT relative position bias tables, which this "
                            "model has not (build it with use_rel_pos_bias=True): they are dropped and outputs "
                            "will differ from the source model")
        logger.warning(report.notes[-1])
    kept = [k for k in target if _BEIT_EXTRA.match(k) and k not in sd]
    if kept:
        report.notes.append(f"{len(kept)} layer-scale / relative-position-bias tensors are not in the checkpoint: "
                            "they keep the model's init (gamma = init_values, zero bias), as BEiT fine-tuning starts")
    return sd


def _fit_pos_embed(v: Tensor, model: VisionTransformer, report: LoadReport) -> Tensor:
    ref = model.pos_embed
    if v.ndim == 2:
        v = v.unsqueeze(0)
    if v.shape[-1] != ref.shape[-1]:
        raise MaeTransferError(
            f"checkpoint key 'pos_embed' has shape {tuple(v.shape)} but the model expects {tuple(ref.shape)}: "
            "different width")
    src_prefix = _prefix_rows(v.shape[1])
    if src_prefix is None:
        raise MaeTransferError(f"checkpoint 'pos_embed' with {v.shape[1]} rows is not a square grid (+cls)")
    tgt_prefix = model.num_prefix_tokens
    tgt_side = math.isqrt(ref.shape[1] - tgt_prefix)
    src_side = math.isqrt(v.shape[1] - src_prefix)
    # Resized once, as MAE fine-tuning (`interpolate_pos_embed`) and mmseg `MAE.resize_abs_pos_embed` do it: plain
    # bicubic, no antialias (timm's loader antialiases; no target here follows timm).
    grid = resize_abs_pos(v, (tgt_side, tgt_side), src_prefix, antialias=False).reshape(1, tgt_side * tgt_side, -1)
    if tgt_prefix:
        if src_prefix:
            cls_row = v[:, :1]
        else:
            cls_row = ref.detach()[:, :1]
            report.notes.append("checkpoint pos_embed has no cls row: the model's cls position kept")
        grid = torch.cat([cls_row, grid], dim=1)
    if src_side != tgt_side or src_prefix != tgt_prefix:
        report.resized["pos_embed"] = (tuple(v.shape), tuple(ref.shape))
    return grid


# ------------------------------------------------------------------------------------------- loading API
def load_backbone_state_dict(source: Source, model: VisionTransformer,
                             allow_pickle: bool = False) -> tuple[StateDict, LoadReport]:
    """Read any supported checkpoint (path, HF folder, or an already loaded dict) for `model`.

    Returns (state_dict, report); `model.load_state_dict(state_dict)` then loads strictly.
    """
    if is_hub_name(source):  # timm:<model> / hf-hub:<repo> (checkpoint.hub)
        source = resolve_hub_name(source)
    name = "<dict>" if isinstance(source, Mapping) else str(source)
    raw = source if isinstance(source, Mapping) else read_checkpoint(source, allow_pickle)
    sd, meta = unwrap_state_dict(raw, name)
    fmt = match_format(sd, meta)
    converted, dropped, notes = fmt.convert(sd)
    report = LoadReport(format=fmt.name, source=name, label=fmt.label, notes=list(notes))
    out = fit_state_dict(converted, model, report)
    report.unexpected = dropped + report.unexpected
    return out, report


def load_backbone(source: Source, model: VisionTransformer, allow_pickle: bool = False) -> LoadReport:
    """Load any supported checkpoint into `model` in place; logs and returns the report."""
    sd, report = load_backbone_state_dict(source, model, allow_pickle)
    model.load_state_dict(sd, strict=True)
    logger.info("%s", report)
    return report


def checkpoint_patch_size(source, allow_pickle: bool = False) -> int:
    """The patch size of a checkpoint's patch kernel (any supported format, hub names too): what
    `--keep-patch-size` builds the classifier with (DINOv2 / EVA-02 keep 14 px where the task allows)."""
    path = resolve_hub_name(source) if is_hub_name(source) else source
    sd, meta = unwrap_state_dict(read_checkpoint(path, allow_pickle), str(source))
    w = match_format(sd, meta).convert(sd)[0].get("patch_embed.proj.weight")
    if w is None or w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise MaeTransferError(f"{source}: no square patch embedding kernel (patch_embed.proj.weight) to keep the "
                               "patch size of")
    return int(w.shape[-1])
