"""Backbone families at ViT-B: the `VisionTransformer` options each one needs, its timm model name, and notes.

`family_config(name)` gives keyword arguments for `VisionTransformer` / `ViTBackbone` / `MAEViT`; depth/width come
from `vit_config("vit_base_patch16_224")` with the family's patch size. Values follow timm's model definitions
(`vit_base_patch14_dinov2`, `deit3_base_patch16_224`, `vit_base_patch16_clip_quickgelu_224`,
`beitv2_base_patch16_224`, `eva02_base_patch14_224`), which reproduce the original repositories' outputs.
"""
from __future__ import annotations

from typing import Any

from backbones.errors import BackboneError

FAMILIES: dict[str, dict[str, Any]] = {
    "mae": dict(timm="vit_base_patch16_224.mae", kwargs={}),
    "deit3": dict(timm="deit3_base_patch16_224.fb_in22k_ft_in1k", kwargs=dict(init_values=1e-6)),
    "dinov2": dict(timm="vit_base_patch14_dinov2.lvd142m",
                   kwargs=dict(patch_size=14, img_size=518, init_values=1e-5)),
    "dinov2_reg": dict(timm="vit_base_patch14_reg4_dinov2.lvd142m",
                       kwargs=dict(patch_size=14, img_size=518, init_values=1e-5, reg_tokens=4)),
    "clip": dict(timm="vit_base_patch16_clip_quickgelu_224.openai",
                 kwargs=dict(pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu")),
    "beitv2": dict(timm="beitv2_base_patch16_224.in1k_ft_in22k_in1k",
                   kwargs=dict(init_values=0.1, use_rel_pos_bias=True)),
    "eva02": dict(timm="eva02_base_patch14_224.mim_in22k",
                  kwargs=dict(patch_size=14, mlp_layer="swiglu", scale_mlp=True, mlp_ratio=4 * 2 / 3,
                              use_rot_pos_emb=True, ref_feat_shape=16)),
}


def family_config(name: str) -> dict[str, Any]:
    """ViT-B keyword arguments of a family (architecture only: depth, width, heads and the family's options)."""
    if name not in FAMILIES:
        raise BackboneError(f"unknown backbone family {name!r}; expected one of: {', '.join(FAMILIES)}")
    return {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16, **FAMILIES[name]["kwargs"]}
