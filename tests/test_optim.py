"""LLRD tables on ViT-B, parity with detectron2's `get_vit_lr_decay_rate` and mmseg's
`LayerDecayOptimizerConstructor`, and partial fine-tuning (frozen params unchanged, fewer saved activations)."""
from __future__ import annotations

import re
from functools import partial

import pytest
import torch
from torch import nn

from backbones.errors import BackboneError
from backbones.lr_decay import layer_id, lr_decay_factor, param_groups
from backbones.vit import VisionTransformer, create_vit

DECAY = 0.65
D2_PREFIX = "backbone.net."  # where detectron2's ViTDet keeps the ViT


def vit_b(**kw) -> VisionTransformer:
    """The ViT-B/16 architecture (built on CPU: its constructor needs real tensors; ~1 s)."""
    return create_vit("vit_base_patch16_224", **kw)


def expected_layer(name: str) -> int:
    """Independent table for a bare ViT-B (12 blocks): written out, not computed by the code under test."""
    if name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 13


def scales(groups) -> dict[str, float]:
    return {n: g["lr_scale"] for g in groups for n in g["param_names"]}


def test_llrd_table_vit_b():
    vit = vit_b(num_classes=1000)
    groups = param_groups(vit, base_lr=1e-3, weight_decay=0.05, layer_decay=DECAY)
    table = scales(groups)
    names = [n for n, _ in vit.named_parameters()]
    assert sorted(table) == sorted(names) and len(names) == 152  # ViT-B/16 with a head: 4 + 12 * 12 + 2 + 2
    for name in names:
        assert table[name] == pytest.approx(DECAY ** (13 - expected_layer(name)), rel=1e-12), name
        assert layer_id(name, 12) == expected_layer(name)
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    for name, p in vit.named_parameters():
        no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token")
        assert wd[name] == (0.0 if no_decay else 0.05), name
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    # rel-pos tables: no weight decay, block layer id.
    rel = param_groups(vit_b(use_rel_pos=True, window_size=14), weight_decay=0.1, layer_decay=DECAY)
    for g in rel:
        for n in g["param_names"]:
            if "rel_pos" in n:
                assert g["weight_decay"] == 0.0 and g["layer_id"] == int(n.split(".")[1]) + 1


class _D2Like(nn.Module):
    """detectron2 ViTDet layout: backbone.net = ViT, pyramid convs under backbone, heads outside."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.net = vit
        self.backbone.simfp_2 = nn.Conv2d(768, 256, 1, device=vit.pos_embed.device)
        self.roi_heads = nn.Linear(256, 81, device=vit.pos_embed.device)


def test_detectron2_parity_get_vit_lr_decay_rate():
    from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
    from detectron2.solver import get_default_optimizer_params

    # ViTDet has no cls token; detectron2's rule does not know one (it would put it in the last layer).
    model = _D2Like(vit_b(class_token=False, use_rel_pos=True, window_size=14, global_block_indexes=(2, 5, 8, 11)))
    ours = scales(param_groups(model, base_lr=1e-4, weight_decay=0.1, layer_decay=DECAY, backbone_prefix=D2_PREFIX))
    assert len(ours) == len(list(model.parameters()))
    for name, _ in model.named_parameters():
        expect = get_vit_lr_decay_rate(name, lr_decay_rate=DECAY, num_layers=12)
        assert ours[name] == pytest.approx(expect, rel=1e-12), name
        assert lr_decay_factor(name, 12, DECAY) == pytest.approx(expect, rel=1e-12), name
    # Through detectron2's own optimizer-params builder, with our lr_factor_func in place of theirs.
    real = nn.Module()  # get_default_optimizer_params needs real tensors for its de-duplication
    real.backbone = nn.Module()
    real.backbone.net = VisionTransformer(embed_dim=64, depth=4, num_heads=2, img_size=32, class_token=False)
    real.head = nn.Linear(64, 3)

    def lrs(factor):
        groups = get_default_optimizer_params(real, base_lr=1.0, lr_factor_func=factor)
        return {id(p): g["lr"] for g in groups for p in g["params"]}

    # as the configs set it: optimizer.params.lr_factor_func = partial(lr_decay_factor, num_layers=..., layer_decay=...)
    assert lrs(partial(lr_decay_factor, num_layers=4, layer_decay=DECAY)) == lrs(
        lambda n: get_vit_lr_decay_rate(n, DECAY, 4))


def test_mmseg_parity_and_constructor():
    from mmengine.optim import build_optim_wrapper
    from mmseg.engine.optimizers import LearningRateDecayOptimizerConstructor
    from mmseg.models.backbones import MAE
    from mmseg.utils import register_all_modules

    import backbones.mmseg  # noqa: F401  (registers MaeLayerDecayOptimizerConstructor, like custom_imports)

    register_all_modules(init_default_scope=True)  # as tools/train.py does: default scope 'mmseg'
    depth, opt = 4, dict(type="AdamW", lr=1e-3, weight_decay=0.05)
    theirs_model = nn.Module()
    theirs_model.backbone = MAE(img_size=32, patch_size=16, embed_dims=64, num_layers=depth, num_heads=2,
                                final_norm=True)
    theirs_model.decode_head = nn.Linear(64, 5)
    # LayerDecayOptimizerConstructor is a deprecated alias of this with decay_type='layer_wise_vit'.
    theirs = LearningRateDecayOptimizerConstructor(
        dict(optimizer=opt), dict(num_layers=depth, decay_rate=DECAY, decay_type="layer_wise_vit"))
    theirs_scale = {n: g["lr_scale"] for g in theirs(theirs_model).optimizer.param_groups for n in g["param_names"]}

    ours_model = nn.Module()
    ours_model.backbone = VisionTransformer(img_size=32, embed_dim=64, depth=depth, num_heads=2)
    ours_model.decode_head = nn.Linear(64, 5)
    wrapper = build_optim_wrapper(ours_model, dict(
        optimizer=opt, constructor="MaeLayerDecayOptimizerConstructor",
        paramwise_cfg=dict(num_layers=depth, layer_decay_rate=DECAY)))
    ours_groups = wrapper.optimizer.param_groups
    ours_scale = {n: g["lr_scale"] for g in ours_groups for n in g["param_names"]}
    assert len(ours_scale) == len(list(ours_model.parameters()))
    for g in ours_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])

    def ours_name(mmseg_name: str) -> str:  # the parameter at the same place in our ViT
        m = re.match(r"backbone\.layers\.(\d+)\.", mmseg_name)
        if m:
            return f"backbone.blocks.{m.group(1)}.attn.qkv.weight"
        if mmseg_name.startswith("backbone.patch_embed"):
            return "backbone.patch_embed.proj.weight"
        if mmseg_name in ("backbone.cls_token", "backbone.pos_embed"):
            return mmseg_name
        return "backbone.norm.weight" if mmseg_name.startswith("backbone.") else "decode_head.weight"

    compared = 0
    for name, scale in theirs_scale.items():
        assert ours_scale[ours_name(name)] == pytest.approx(scale, rel=1e-12), name
        compared += 1
    assert compared == len(list(theirs_model.parameters()))
    # Same table whether built for detectron2 or mmseg (prefixes differ only).
    vit = VisionTransformer(img_size=32, embed_dim=64, depth=depth, num_heads=2)
    d2 = nn.Module()
    d2.backbone = nn.Module()
    d2.backbone.net = vit
    d2_groups = param_groups(d2, 1e-3, 0.05, DECAY, backbone_prefix=D2_PREFIX)
    d2_table = {n[len("backbone.net."):]: s for n, s in scales(d2_groups).items()}
    mm_table = {n[len("backbone."):]: s for n, s in ours_scale.items() if n.startswith("backbone.")}
    assert d2_table == mm_table


def test_detectron2_lazyconfig_param_groups_hook():
    """`optimizer.params = L(param_groups)(...)` in a LazyConfig, as the training tool instantiates it."""
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from omegaconf import OmegaConf

    from backbones.lr_decay import param_groups as hook

    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.net = VisionTransformer(img_size=32, embed_dim=64, depth=4, num_heads=2, class_token=False)
    model.roi_heads = nn.Linear(64, 3)
    model.backbone.net.freeze_blocks(2)
    cfg = OmegaConf.create({"optimizer": L(torch.optim.AdamW)(
        params=L(hook)(base_lr="${..lr}", weight_decay=0.1, layer_decay=DECAY, backbone_prefix=D2_PREFIX), lr=1e-4)})
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    names = {n for g in opt.param_groups for n in g["param_names"]}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("backbone.net.patch_embed", "backbone.net.blocks.0.", "backbone.net.blocks.1."))
                   for n in names)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-4 * DECAY ** (5 - g["layer_id"]))


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return total


@pytest.mark.parametrize("k", [0, 2, 4, -1])
def test_freeze_blocks_one_step(k):
    torch.manual_seed(0)
    # No drop path here: a dropped residual branch gives zero grads, which would leave params unchanged.
    vit = VisionTransformer(img_size=32, embed_dim=64, depth=4, num_heads=2, num_classes=5)
    frozen = set(vit.freeze_blocks(k))
    vit.train()
    if k > 0:
        assert not any(b.training for b in vit.blocks[:k]) and all(b.training for b in vit.blocks[k:])
        assert frozen == {n for n, _ in vit.named_parameters()
                          if n.startswith(("patch_embed.", "cls_token", "pos_embed"))
                          or any(n.startswith(f"blocks.{i}.") for i in range(k))}
    if k == -1:
        assert frozen == {n for n, _ in vit.named_parameters() if not n.startswith("head.")}
    groups = param_groups(vit, base_lr=1e-3, weight_decay=0.05, layer_decay=DECAY)
    in_opt = {n for g in groups for n in g["param_names"]}
    assert in_opt.isdisjoint(frozen) and in_opt | frozen == {n for n, _ in vit.named_parameters()}
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    opt = torch.optim.AdamW(groups)
    vit(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
    opt.step()
    for n, p in vit.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]) and p.grad is None, n
        else:
            assert not torch.equal(p, before[n]), n


def test_freezing_saves_activations_and_validates():
    x = torch.randn(2, 3, 32, 32)
    saved = {}
    for k in (0, 1, 2, 3, 4, -1):
        torch.manual_seed(0)
        vit = VisionTransformer(img_size=32, embed_dim=64, depth=4, num_heads=2, num_classes=5)
        vit.freeze_blocks(k)
        saved[k] = _saved_activation_bytes(vit.train(), x)
    assert saved[0] > saved[1] > saved[2] > saved[3] > saved[4] >= saved[-1]
    # Frozen blocks run in eval mode even in model.train(): their drop path is off.
    vit = VisionTransformer(img_size=32, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.9)
    vit.freeze_blocks(4)
    vit.train()
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), vit.forward_features(x))
        unfrozen = VisionTransformer(img_size=32, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.9).train()
        assert not torch.equal(unfrozen.forward_features(x), unfrozen.forward_features(x))
    with pytest.raises(BackboneError, match="freeze_blocks must be"):
        VisionTransformer(img_size=32, embed_dim=64, depth=4, num_heads=2).freeze_blocks(5)
