"""Optimizers for mae_transfer's own training loops, on the shared LLRD rule of `backbones.lr_decay`.

The layer-wise lr decay and no-weight-decay rules (`layer_id`, `lr_decay_factor`, `no_weight_decay`,
`count_blocks`, `param_groups`) have one implementation, in `backbones.lr_decay`, which the framework adapters
use too (backbones/ cannot import this package); they are re-exported here. The mmengine constructor
(`MaeLayerDecayOptimizerConstructor`) is registered by the mmseg adapter, `backbones.mmseg`. Partial fine-tuning
is `VisionTransformer.freeze_blocks`.
"""
from __future__ import annotations

from typing import Any

import torch

from backbones.lr_decay import count_blocks, layer_id, lr_decay_factor, no_weight_decay, param_groups

__all__ = ["adamw", "count_blocks", "layer_id", "lr_decay_factor", "no_weight_decay", "param_groups"]


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """torch AdamW with the fused kernel (CPU and CUDA; what HF's Trainer also defaults to on torch >= 2.8):
    one pass over each tensor instead of the foreach chain (measured: benchmarks/README.md)."""
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)

