"""Layer-wise lr decay (LLRD) and no-weight-decay rules: the one implementation for every framework.

Layer ids follow BEiT / MAE fine-tuning: patch embedding, pos embedding and cls token are layer 0,
block i is layer i+1, and everything else (final norm, fc_norm, head, and every parameter outside
the backbone: FPN, RPN, ROI heads, decode heads) is layer L+1, so its lr multiplier is 1:

    lr_scale(param) = layer_decay ** (L + 1 - layer_id(param))

No weight decay on 1-D parameters (norms, biases, layer scales), pos_embed, cls_token, mask_token,
register tokens and rel-pos tables (RoPE has no parameters). Register tokens and the CLIP `norm_pre` are
embedding-side, layer 0, as in timm's `group_matcher` stem. Frozen parameters
(`VisionTransformer.freeze_blocks`) are left out of every group.

Framework hooks, all calling `param_groups` / `lr_decay_factor`:
  detectron2 LazyConfig: keep detectron2's `get_default_optimizer_params` and set
      `optimizer.params.lr_factor_func = partial(lr_decay_factor, num_layers=12, layer_decay=0.7)` (the
      configs do), or `optimizer.params = L(param_groups)(base_lr="${..lr}", weight_decay=0.1,
      layer_decay=0.7, backbone_prefix="backbone.net.")` (the training tool sets `optimizer.params.model`).
  mmseg / mmengine: `constructor="MaeLayerDecayOptimizerConstructor"` in `optim_wrapper`, registered by the
      mmseg adapter (`backbones.mmseg`, which the configs import through `custom_imports`).
Plain torch (the toolkit's own loops) uses `param_groups` directly.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from backbones.errors import BackboneError

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "reg_token", "rel_pos_h", "rel_pos_w",
                   "relative_position_bias_table", "gamma_1", "gamma_2")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_id(name: str, num_layers: int, backbone_prefix: str = "") -> int:
    """Layer id of a parameter name: embeddings 0, `blocks.i` i+1, anything else num_layers+1."""
    if not name.startswith(backbone_prefix):
        return num_layers + 1
    name = name[len(backbone_prefix):]
    if name in ("cls_token", "pos_embed", "mask_token", "reg_token") or name.startswith(("patch_embed.", "norm_pre.")):
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
        raise BackboneError(f"no ViT blocks found under the prefix {backbone_prefix!r} "
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

