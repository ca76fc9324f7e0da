"""Layer-wise lr decay (LLRD), no-weight-decay rules and partial fine-tuning — one implementation for all.

Layer ids follow BEiT / MAE fine-tuning: patch embedding, pos embedding and cls token are layer 0,
block i is layer i+1, and everything else (final norm, fc_norm, head, and every parameter outside
the backbone: FPN, RPN, ROI heads, decode heads) is layer L+1, so its lr multiplier is 1:

    lr_scale(param) = layer_decay ** (L + 1 - layer_id(param))

No weight decay on 1-D parameters (norms, biases, layer scales), pos_embed, cls_token, mask_token
and rel-pos tables.

Hooks:
  detectron2 LazyConfig: `optimizer.params = L(d2_param_groups)(base_lr="${..lr}", weight_decay=0.1,
      layer_decay=0.7)` (the training tool sets `optimizer.params.model = model`), or keep detectron2's
      `get_default_optimizer_params` and set `optimizer.params.lr_factor_func =
      partial(lr_decay_factor, num_layers=12, layer_decay=0.7)`.
  mmseg / mmengine: `optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-4,
      weight_decay=0.05), constructor="MaeLayerDecayOptimizerConstructor",
      paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.65))` — registered on import of this module.
Partial fine-tuning: `freeze_blocks(vit, k)`; frozen parameters are left out of every group.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import types
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from mae_transfer.errors import MaeTransferError

logger = logging.getLogger(__name__)

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "rel_pos_h", "rel_pos_w")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_id(name: str, num_layers: int, backbone_prefix: str = "") -> int:
    """Layer id of a parameter name: embeddings 0, `blocks.i` i+1, anything else num_layers+1."""
    if not name.startswith(backbone_prefix):
        return num_layers + 1
    name = name[len(backbone_prefix):]
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed."):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def lr_decay_factor(name: str, num_layers: int = 12, layer_decay: float = 1.0,
                    backbone_prefix: str = "backbone.net.") -> float:
    """lr multiplier of one parameter: a drop-in for detectron2's `lr_factor_func` (same signature shape
    as `get_vit_lr_decay_rate`), defaulting to the detectron2 prefix `backbone.net.`."""
    return layer_decay ** (num_layers + 1 - layer_id(name, num_layers, backbone_prefix))


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES


def count_blocks(model: nn.Module, backbone_prefix: str = "") -> int:
    """Number of ViT blocks under `backbone_prefix` (from the parameter names)."""
    ids = {int(m.group(1)) for n, _ in model.named_parameters()
           if n.startswith(backbone_prefix) and (m := _BLOCK.match(n[len(backbone_prefix):]))}
    if not ids:
        raise MaeTransferError(f"no ViT blocks found under the prefix {backbone_prefix!r} "
                               "(set backbone_prefix to where the ViT sits in the model)")
    return max(ids) + 1


def param_groups(model: nn.Module, base_lr: float | None = None, weight_decay: float = 0.05,
                 layer_decay: float = 1.0, num_layers: int | None = None, backbone_prefix: str = "",
                 skip_frozen: bool = True) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise lr decay and no-decay rules.

    One group per (layer id, decay / no decay), each a dict with `params`, `param_names`, `lr_scale`,
    `weight_decay`, `layer_id` and, if `base_lr` is given, `lr = base_lr * lr_scale` (torch optimizers
    keep the extra keys). Frozen parameters (requires_grad False) are left out unless `skip_frozen=False`.
    """
    if num_layers is None:
        num_layers = count_blocks(model, backbone_prefix)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if skip_frozen and not param.requires_grad:
            continue
        lid = layer_id(name, num_layers, backbone_prefix)
        decay = not no_weight_decay(name, param)
        group = groups.get((lid, decay))
        if group is None:
            scale = layer_decay ** (num_layers + 1 - lid)
            group = groups[(lid, decay)] = {
                "params": [], "param_names": [], "lr_scale": scale, "layer_id": lid,
                "weight_decay": weight_decay if decay else 0.0,
            }
            if base_lr is not None:
                group["lr"] = base_lr * scale
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """torch AdamW with the fused kernel (CPU and CUDA; what HF's Trainer also defaults to on torch >= 2.8):
    one pass over each tensor instead of the foreach chain (0.11 s vs 0.37 s per MAE-B step on CPU)."""
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def d2_param_groups(model: nn.Module, base_lr: float, weight_decay: float = 0.1, layer_decay: float = 1.0,
                    num_layers: int | None = None, backbone_prefix: str = "backbone.net.") -> list[dict[str, Any]]:
    """`param_groups` with detectron2's backbone prefix, for `optimizer.params` in a LazyConfig."""
    return param_groups(model, base_lr, weight_decay, layer_decay, num_layers, backbone_prefix)


def d2_lr_factor_func(num_layers: int = 12, layer_decay: float = 1.0,
                      backbone_prefix: str = "backbone.net.") -> Callable[[str], float]:
    """`lr_factor_func` for detectron2's `get_default_optimizer_params` (frozen params are skipped there)."""
    return partial(lr_decay_factor, num_layers=num_layers, layer_decay=layer_decay, backbone_prefix=backbone_prefix)


# ------------------------------------------------------------------------------------------- partial FT
def _train_keeping_frozen_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    type(self).train(self, mode)
    for module in self._mae_frozen_modules:  # frozen blocks: no drop path / dropout
        module.train(False)
    return self


def freeze_blocks(vit: nn.Module, k: int) -> list[str]:
    """Partial fine-tuning of a `VisionTransformer` in place; returns the frozen parameter names.

    k > 0: patch embedding, cls/pos embedding and blocks 0..k-1 frozen; k == -1: the whole backbone
    except `head` (linear-probe style); k == 0: nothing. Frozen parameters get requires_grad=False (so
    `param_groups` leaves them out and autograd keeps no activations for them) and the frozen modules stay
    in eval mode whenever the model is put in train mode.
    """
    depth = len(vit.blocks)
    if k < -1 or k > depth:
        raise MaeTransferError(f"freeze_blocks must be -1 (whole backbone), 0 or 1..{depth}, got {k}")
    if k == 0:
        return []
    if k == -1:
        modules = [m for n, m in vit.named_children() if n != "head"]
        names = [n for n, _ in vit.named_parameters() if not n.startswith("head.")]
    else:
        modules = [vit.patch_embed, *vit.blocks[:k]]
        prefixes = ("patch_embed.", *(f"blocks.{i}." for i in range(k)))
        names = [n for n, _ in vit.named_parameters() if n.startswith(prefixes) or n in ("cls_token", "pos_embed")]
    params = dict(vit.named_parameters())
    for n in names:
        params[n].requires_grad_(False)
    vit._mae_frozen_modules = modules
    vit.train = types.MethodType(_train_keeping_frozen_in_eval, vit)
    vit.train(vit.training)
    logger.info("freeze_blocks=%d: %d parameter tensors frozen", k, len(names))
    return names


# ------------------------------------------------------------------------------------------- mmengine hook
class MaeLayerDecayOptimizerConstructor:
    """mmengine optimizer-wrapper constructor that calls `param_groups` (registered as
    `constructor="MaeLayerDecayOptimizerConstructor"`).

    paramwise_cfg: layer_decay_rate (or decay_rate), num_layers (default: counted from the model),
    backbone_prefix (default 'backbone.'). Base lr and weight decay come from the optimizer config.
    mmengine's `DefaultOptimWrapperConstructor` does the building; only its `add_params` is ours. It is
    imported on call, so importing this module stays cheap for detectron2 users.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        cfg = dict(paramwise_cfg or {})
        self.layer_decay = float(cfg.pop("layer_decay_rate", cfg.pop("decay_rate", 1.0)))
        self.num_layers = cfg.pop("num_layers", None)
        self.backbone_prefix = cfg.pop("backbone_prefix", "backbone.")
        if cfg:
            raise MaeTransferError(f"MaeLayerDecayOptimizerConstructor: unknown paramwise_cfg keys {sorted(cfg)}")
        self.optim_wrapper_cfg = dict(optim_wrapper_cfg)

    def __call__(self, model: nn.Module) -> Any:
        from mmengine.optim import DefaultOptimWrapperConstructor

        # A non-empty paramwise_cfg makes the base class call add_params (else it takes model.parameters()).
        base = DefaultOptimWrapperConstructor(self.optim_wrapper_cfg, {"layer_decay_rate": self.layer_decay})

        def add_params(params: list[dict], module: nn.Module, **kwargs: Any) -> None:
            params.extend(param_groups(module, base.base_lr, base.base_wd or 0.0, self.layer_decay,
                                       self.num_layers, self.backbone_prefix))

        base.add_params = add_params  # type: ignore[method-assign]
        return base(model)


def _register_mmengine_constructor() -> None:
    """Register in mmengine's root registry; mmseg's registry finds it through its parent. mmengine's
    registry is already imported by `mae_transfer` (via mmcv), so this costs nothing."""
    if importlib.util.find_spec("mmengine") is None:
        return
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    if "MaeLayerDecayOptimizerConstructor" not in OPTIM_WRAPPER_CONSTRUCTORS.module_dict:
        OPTIM_WRAPPER_CONSTRUCTORS.register_module(module=MaeLayerDecayOptimizerConstructor)


_register_mmengine_constructor()
