"""Backbone families (issue 35): DeiT III, DINOv2 (+ registers), CLIP, BEiTv2 and EVA-02 in the one ViT.

Every reference is independent of our code: timm's models (random weights from a seed), transformers' CLIP and
DINOv2 models, and timm's own checkpoint filters for the original repositories' layouts (dinov2, OpenAI CLIP,
EVA-02). Features and input/patch-embedding gradients must agree to 1e-5 relative at the family's native patch
size, and after import into the detectron2 and mmseg backbones (ViT trunk outputs).
"""
from __future__ import annotations

import re

import pytest
import torch

import mae_transfer  # noqa: F401
from backbones.families import FAMILIES, family_config
from backbones.vit import VisionTransformer
from mae_transfer.checkpoint import load_backbone, load_backbone_state_dict
from mae_transfer.errors import MaeTransferError

timm = pytest.importorskip("timm")

DIM, DEPTH, HEADS = 64, 2, 2
REL = 1e-5

# family -> (timm model, native test size, our options besides depth/width)
CASES = {
    "deit3": ("deit3_base_patch16_224", 64, dict(init_values=1e-6)),
    "dinov2": ("vit_base_patch14_dinov2", 56, dict(patch_size=14, init_values=1e-5)),
    "dinov2_reg": ("vit_base_patch14_reg4_dinov2", 56, dict(patch_size=14, init_values=1e-5, reg_tokens=4)),
    "dinov2_g": ("vit_giant_patch14_dinov2", 56, dict(patch_size=14, init_values=1e-5, mlp_layer="swiglu_packed")),
    "clip": ("vit_base_patch16_clip_quickgelu_224", 64, dict(pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu")),
    "beitv2": ("beitv2_base_patch16_224", 64, dict(init_values=0.1, use_rel_pos_bias=True)),
    "eva02": ("eva02_base_patch14_224", 56, dict(patch_size=14, mlp_layer="swiglu", scale_mlp=True,
                                                 mlp_ratio=4 * 2 / 3, use_rot_pos_emb=True, ref_feat_shape=16)),
}
TIMM_KW = {"dinov2_g": dict(mlp_ratio=4)}  # ViT-g's 5.33334 gives an odd fc1 width at 64 channels
AVG_POOL = {"beitv2", "eva02"}  # timm's Beit / Eva pool the mean of patch tokens through fc_norm


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (layer scales, tables and norms too, so none is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def reference(family: str, **kw) -> torch.nn.Module:
    name, size, _ = CASES[family]
    return randomize(timm.create_model(name, depth=DEPTH, embed_dim=DIM, num_heads=HEADS, img_size=size,
                                       num_classes=0, **{**TIMM_KW.get(family, {}), **kw}))


def our_kwargs(family: str) -> dict:
    _, size, opts = CASES[family]
    return dict(img_size=size, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, **opts)


def image(family: str, batch: int = 2) -> torch.Tensor:
    size = CASES[family][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_parity(ref_fn, our_fn, x: torch.Tensor, ref_params=(), our_params=()) -> float:
    """Outputs, input gradients and the given parameters' gradients within REL; returns the worst error."""
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    r, o = ref_fn(xr), our_fn(xo)
    assert r.shape == o.shape
    cot = torch.randn(r.shape, generator=torch.Generator().manual_seed(2))
    (r * cot).sum().backward()
    (o * cot).sum().backward()
    errs = [rel_err(o.detach(), r.detach()), rel_err(xo.grad, xr.grad)]
    errs += [rel_err(po.grad, pr.grad) for pr, po in zip(ref_params, our_params, strict=True)]
    assert max(errs) <= REL, errs
    return max(errs)


@pytest.mark.parametrize("family", list(CASES))
def test_timm_parity_features_and_gradients(family):
    ref = reference(family)
    model = VisionTransformer(**our_kwargs(family), global_pool="avg" if family in AVG_POOL else "token")
    report = load_backbone(ref.state_dict(), model)
    assert not report.missing and not report.unexpected, report
    assert_parity(ref.forward_features, model.forward_features, image(family),
                  [ref.patch_embed.proj.weight], [model.patch_embed.proj.weight])
    with torch.no_grad():  # pooled features (cls token, or mean of patches through fc_norm)
        x = image(family)
        assert rel_err(model.forward_head(model.forward_features(x), pre_logits=True),
                       ref.forward_head(ref.forward_features(x), pre_logits=True)) <= REL


@pytest.mark.parametrize("family", list(CASES))
def test_mmseg_backbone_trunk_parity(family):
    """Block outputs of our mmseg `MAEViT` (tokens with cls [+ registers] in the sequence) == timm's
    `forward_intermediates` patch maps."""
    pytest.importorskip("mmseg")
    from backbones.mmseg import MAEViT

    ref = reference(family)
    kw = our_kwargs(family)
    model = MAEViT(out_indices=(0, 1), drop_path_rate=0.0, **kw).eval()
    load_backbone(ref.state_dict(), model)
    x = image(family)
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=[0, 1], norm=False, output_fmt="NCHW", intermediates_only=True)
        got = model(x)
    for w, g in zip(want, got, strict=True):
        assert rel_err(g, w) <= REL


def _timm_patch_trunk(ref, family: str, x: torch.Tensor) -> torch.Tensor:
    """timm's blocks run on the patch tokens only (the ViTDet layout: no cls token or registers)."""
    tokens = ref.patch_embed(x)
    prefix = 0 if getattr(ref, "no_embed_class", False) else 1
    tokens = tokens + ref.pos_embed[:, prefix:]
    if hasattr(ref, "norm_pre"):
        tokens = ref.norm_pre(tokens)
    rope = ref.rope.get_embed() if getattr(ref, "rope", None) is not None else None
    for blk in ref.blocks:
        if rope is not None:
            blk.attn.num_prefix_tokens = 0
            tokens = blk(tokens, rope=rope)
        else:
            tokens = blk(tokens)
    side = x.shape[-1] // ref.patch_embed.patch_size[0]
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side)


@pytest.mark.parametrize("family", [f for f in CASES if f != "beitv2"])
def test_detectron2_backbone_trunk_parity(family):
    """Our detectron2 `ViTBackbone` (spatial layout, global attention) == timm's blocks on the patch tokens.
    (BEiT's bias is indexed with its cls rows inside timm's attention, so BEiT is compared through mmseg.)"""
    pytest.importorskip("detectron2")
    from backbones.detectron2 import ViTBackbone

    ref = reference(family)
    net = ViTBackbone(window_size=0, use_rel_pos=False, drop_path_rate=0.0, **our_kwargs(family)).eval()
    load_backbone(ref.state_dict(), net)
    assert_parity(lambda x: _timm_patch_trunk(ref, family, x), lambda x: net(x)["last_feat"], image(family),
                  [ref.blocks[0].mlp.fc2.weight], [net.blocks[0].mlp.fc2.weight])


def test_rope_in_windows_follows_the_window_grid():
    """EVA-02 in ViTDet windows: a window's RoPE is built for the window grid scaled to the pretraining grid,
    so a window of the whole image equals global attention."""
    from backbones.detectron2 import ViTBackbone

    kw = our_kwargs("eva02")
    glob = randomize(ViTBackbone(window_size=0, use_rel_pos=False, drop_path_rate=0.0, **kw))
    win = ViTBackbone(window_size=4, use_rel_pos=False, drop_path_rate=0.0, **kw).eval()
    win.load_state_dict(glob.state_dict())
    x = image("eva02")
    with torch.no_grad():
        assert rel_err(win(x)["last_feat"], glob(x)["last_feat"]) <= REL
        small = ViTBackbone(window_size=2, use_rel_pos=False, drop_path_rate=0.0, **kw).eval()
        small.load_state_dict(glob.state_dict())
        assert rel_err(small(x)["last_feat"], glob(x)["last_feat"]) > 1e-3  # windows do change it


# ------------------------------------------------------------------------------------------- own formats
def _original_clip(ref) -> dict[str, torch.Tensor]:
    """A random OpenAI CLIP state dict (image tower `visual.*` and a text tower) for the reference's shape."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    n = ref.pos_embed.shape[1]
    sd = {"visual.class_embedding": r(DIM), "visual.positional_embedding": r(n, DIM),
          "visual.conv1.weight": r(DIM, 3, 16, 16), "visual.ln_pre.weight": r(DIM), "visual.ln_pre.bias": r(DIM),
          "visual.ln_post.weight": r(DIM), "visual.ln_post.bias": r(DIM), "visual.proj": r(DIM, 32),
          "token_embedding.weight": r(100, 32), "positional_embedding": r(8, 32), "text_projection": r(32, 32),
          "logit_scale": r(()), "ln_final.weight": r(32), "ln_final.bias": r(32),
          "transformer.resblocks.0.ln_1.weight": r(32)}
    for i in range(DEPTH):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": r(DIM), p + "ln_1.bias": r(DIM), p + "ln_2.weight": r(DIM),
                   p + "ln_2.bias": r(DIM), p + "attn.in_proj_weight": r(3 * DIM, DIM),
                   p + "attn.in_proj_bias": r(3 * DIM), p + "attn.out_proj.weight": r(DIM, DIM),
                   p + "attn.out_proj.bias": r(DIM), p + "mlp.c_fc.weight": r(4 * DIM, DIM),
                   p + "mlp.c_fc.bias": r(4 * DIM), p + "mlp.c_proj.weight": r(DIM, 4 * DIM),
                   p + "mlp.c_proj.bias": r(DIM)})
    return sd


def test_openai_clip_format_against_timms_converter():
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = timm.create_model(CASES["clip"][0], depth=DEPTH, embed_dim=DIM, num_heads=HEADS, img_size=64,
                            num_classes=32).eval()
    sd = _original_clip(ref)
    ref.load_state_dict(checkpoint_filter_fn(dict(sd), ref))
    model = VisionTransformer(**our_kwargs("clip"), num_classes=32).eval()
    out, report = load_backbone_state_dict(sd, model)
    model.load_state_dict(out)
    assert report.format == "openai_clip"
    assert "token_embedding.weight" in report.unexpected and any("text tower" in n for n in report.notes)
    assert_parity(ref, model, image("clip"), [ref.blocks[1].attn.qkv.weight], [model.blocks[1].attn.qkv.weight])


def test_clip_text_tower_only_is_an_error():
    sd = {k: v for k, v in _original_clip(reference("clip")).items() if not k.startswith("visual.")}
    with pytest.raises(MaeTransferError, match="text tower only") as err:
        load_backbone(sd, VisionTransformer(**our_kwargs("clip")))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("with_text", [False, True])
def test_hf_clip_vision_model(with_text):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=DEPTH,
                           num_attention_heads=HEADS, image_size=64, patch_size=16)
    ref = randomize(CLIPVisionModel(cfg))
    sd = {"vision_model." + k if not k.startswith("vision_model.") else k: v for k, v in ref.state_dict().items()}
    if with_text:  # a CLIPModel file: the text tower is reported unused
        sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8), "logit_scale": torch.ones(())})
    model = VisionTransformer(**our_kwargs("clip"))
    out, report = load_backbone_state_dict(sd, model)
    model.load_state_dict(out)
    assert report.format == "hf_clip" and not report.missing
    assert with_text == any("text tower" in n for n in report.notes)
    # HF: last_hidden_state is before post_layernorm; pooler_output = post_layernorm(cls) == our normed cls.
    x = image("clip")
    assert_parity(lambda t: ref(pixel_values=t).pooler_output, lambda t: model.forward_features(t)[:, 0], x)
    assert_parity(lambda t: ref(pixel_values=t).last_hidden_state,
                  lambda t: model.run_blocks(model.embed_tokens(t), hw=(4, 4)), x)


def test_hf_dinov2_model():
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=56,
                       patch_size=14, mlp_ratio=4)
    ref = randomize(Dinov2Model(cfg))
    model = VisionTransformer(**our_kwargs("dinov2"))
    out, report = load_backbone_state_dict(ref.state_dict(), model)
    model.load_state_dict(out)
    assert report.format == "hf_dinov2" and not report.missing
    assert report.unexpected == ["embeddings.mask_token"]
    assert_parity(lambda t: ref(pixel_values=t).last_hidden_state, model.forward_features, image("dinov2"))


@pytest.mark.parametrize("family,chunked", [("dinov2", False), ("dinov2", True), ("dinov2_reg", False),
                                            ("dinov2_g", False)])
def test_dinov2_original_format_against_timms_converter(family, chunked):
    """facebookresearch/dinov2 layout: `mask_token`, `register_tokens` + a cls row in pos_embed, optionally the
    FSDP-chunked `blocks.0.i.` names; timm's `checkpoint_filter_fn` is the reference."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = reference(family)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}  # not views of ref's parameters, reloaded below
    g = torch.Generator().manual_seed(4)
    sd["mask_token"] = torch.randn(1, DIM, generator=g)
    if family == "dinov2_reg":
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = torch.cat([torch.randn(1, 1, DIM, generator=g), sd["pos_embed"]], dim=1)
    if family == "dinov2_g":  # dinov2's SwiGLUFFNFused names
        sd = {k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3."): v for k, v in sd.items()}
    ref.load_state_dict(checkpoint_filter_fn(dict(sd), ref))
    if chunked:
        sd = {re.sub(r"^blocks\.", "blocks.0.", k): v for k, v in sd.items()}
    model = VisionTransformer(**our_kwargs(family))
    out, report = load_backbone_state_dict(sd, model)
    model.load_state_dict(out)
    assert report.format == "dinov2" and report.unexpected == ["mask_token"] and not report.missing
    assert_parity(ref.forward_features, model.forward_features, image(family))


def test_beit_unilm_shared_rel_pos_bias():
    """unilm BEiT/BEiTv2 pretraining layout: one shared `rel_pos_bias` table, `lm_head`, `mask_token`,
    `cls_pt_layers`; fine-tuning copies the shared table into every block (timm: per-block tables)."""
    ref = reference("beitv2")
    sd = {k: v for k, v in ref.state_dict().items() if "relative_position_bias_table" not in k}
    table = torch.randn_like(ref.blocks[0].attn.relative_position_bias_table)
    with torch.no_grad():
        for blk in ref.blocks:
            blk.attn.relative_position_bias_table.copy_(table)
    sd.update({"rel_pos_bias.relative_position_bias_table": table, "mask_token": torch.zeros(1, 1, DIM),
               "lm_head.weight": torch.zeros(8, DIM), "cls_pt_layers.0.norm1.weight": torch.ones(DIM)})
    model = VisionTransformer(**our_kwargs("beitv2"), global_pool="avg")
    out, report = load_backbone_state_dict(sd, model)
    model.load_state_dict(out)
    assert report.format == "beit" and not report.missing
    assert {"mask_token", "lm_head.weight", "cls_pt_layers.0.norm1.weight"} <= set(report.unexpected)
    assert_parity(ref.forward_features, model.forward_features, image("beitv2"))


def test_eva02_original_format_against_timms_converter():
    """baaivision EVA-02 names (`mlp.w1/w2/w3`, `ffn_ln`, `q_bias`/`v_bias`, rope buffers); timm's Eva
    `checkpoint_filter_fn` is the reference."""
    from timm.models.eva import checkpoint_filter_fn

    ref = reference("eva02")
    sd = {}
    for k, v in ref.state_dict().items():
        k = (k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.").replace("mlp.fc2.", "mlp.w3.")
             .replace("mlp.norm.", "mlp.ffn_ln.").replace("attn.q_proj.bias", "attn.q_bias")
             .replace("attn.v_proj.bias", "attn.v_bias"))
        sd[k] = v
    sd["rope.freqs_cos"] = torch.zeros(16, 32)
    ref2 = timm.create_model(CASES["eva02"][0], depth=DEPTH, embed_dim=DIM, num_heads=HEADS, img_size=56,
                             num_classes=0).eval()
    ref2.load_state_dict(checkpoint_filter_fn(dict(sd), ref2))
    model = VisionTransformer(**our_kwargs("eva02"), global_pool="avg")
    out, report = load_backbone_state_dict(sd, model)
    model.load_state_dict(out)
    assert report.format == "eva02" and report.unexpected == ["rope.freqs_cos"] and not report.missing
    assert_parity(ref2.forward_features, model.forward_features, image("eva02"))


# ------------------------------------------------------------------------------------------- the rest
def test_default_vit_unchanged_by_the_options():
    """No option on: the same parameters and buffers as before (no norm_pre / reg_token / rope state)."""
    names = set(VisionTransformer(embed_dim=DIM, depth=DEPTH, num_heads=HEADS).state_dict())
    assert not any(re.search(r"norm_pre|reg_token|rope|fc1_g", n) for n in names)


def test_family_presets_build_at_vit_b_shapes():
    for name in FAMILIES:
        cfg = family_config(name)
        assert cfg["embed_dim"] == 768 and cfg["depth"] == 12
    with pytest.raises(Exception, match="unknown backbone family"):
        family_config("resnet")


def test_llrd_and_no_weight_decay_of_the_new_parameters():
    from backbones.lr_decay import layer_id, param_groups

    model = VisionTransformer(**our_kwargs("dinov2_reg"), pre_norm=True)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    where = {n: (g["layer_id"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert where["reg_token"] == (0, 0.0) and where["norm_pre.weight"] == (0, 0.0)
    assert where["blocks.1.gamma_1"] == (2, 0.0) and where["blocks.1.mlp.fc1.weight"] == (2, 0.05)
    assert layer_id("blocks.0.mlp.fc1_g.weight", DEPTH) == 1


def test_unknown_family_file_is_one_error_line():
    sd = {"stem.conv.weight": torch.zeros(4, 3, 3, 3), "layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1)}
    with pytest.raises(MaeTransferError, match="unknown checkpoint format") as err:
        load_backbone(sd, VisionTransformer(embed_dim=DIM, depth=DEPTH, num_heads=HEADS))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- patch 14 -> 16
def test_patch_kernel_resampling_is_flexivits_pseudo_inverse():
    """14 -> 16 upsampling: the resampled kernel on the (bicubic, antialiased) 16-px resize of a patch gives the
    14-px kernel's token on the patch, exactly (R^T pinv(R^T) = I); our torch fallback == timm's function."""
    from timm.layers import resample_patch_embed as timm_resample

    from backbones.patch_resample import resample_patch_embed, resample_patch_embed_torch

    g = torch.Generator().manual_seed(5)
    w14 = torch.randn(8, 3, 14, 14, generator=g)
    w16 = resample_patch_embed(w14, 16)
    assert rel_err(resample_patch_embed_torch(w14, (16, 16)), timm_resample(w14, [16, 16])) <= REL
    patches = torch.randn(4, 3, 14, 14, generator=g)
    up = torch.nn.functional.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True)
    assert rel_err(torch.einsum("bchw,ochw->bo", up, w16), torch.einsum("bchw,ochw->bo", patches, w14)) <= 1e-4


def _dinov2_file(tmp_path):
    ref = reference("dinov2")
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, DIM)
    path = tmp_path / "dinov2_vitb14.pth"
    torch.save(sd, path)
    return path


def test_patch14_file_into_16px_backbone_needs_resampling(tmp_path):
    from backbones.detectron2 import ViTBackbone

    path = _dinov2_file(tmp_path)
    kw = dict(our_kwargs("dinov2"), patch_size=16, img_size=128)  # the 4x4 table of 56 px goes to 8x8
    with pytest.raises(MaeTransferError, match=r"has 14x14 patches but the model 16x16: resample it") as err:
        load_backbone(path, ViTBackbone(window_size=0, use_rel_pos=False, **kw))
    assert "\n" not in str(err.value)
    net = ViTBackbone(window_size=0, use_rel_pos=False, resample_patch_embed=True, **kw).eval()
    report = load_backbone(path, net)
    assert report.resized["patch_embed.proj.weight"] == ((DIM, 3, 14, 14), (DIM, 3, 16, 16))
    assert report.resized["pos_embed"] == ((1, 17, DIM), (1, 65, DIM))
    assert any("FlexiViT" in n for n in report.notes)
    assert net(torch.randn(1, 3, 64, 64))["last_feat"].shape == (1, DIM, 4, 4)


# ------------------------------------------------------------------------------------------- hub names
def test_unknown_hub_name_is_one_error_line():
    from mae_transfer.checkpoint.hub import resolve_hub_name

    for name, msg in (("timm:vit_base_patch14_nosuchmodel.lvd142m", "unknown timm pretrained model"),
                      ("hf-hub:not-a-repo", "expected hf-hub:<organisation>/<repository>")):
        with pytest.raises(MaeTransferError, match=re.escape(msg)) as err:
            resolve_hub_name(name, local_files_only=True)
        assert "\n" not in str(err.value)


def test_hub_name_offline_names_cache_and_init_checkpoint(tmp_path):
    from mae_transfer.checkpoint.hub import resolve_hub_name

    with pytest.raises(MaeTransferError, match=r"not in the Hugging Face cache \(.*\).*train\.init_checkpoint=PATH"):
        resolve_hub_name("timm:vit_base_patch14_dinov2.lvd142m", local_files_only=True, cache_dir=tmp_path)


def test_hub_name_from_the_cache_loads(tmp_path):
    """A file in huggingface_hub's cache layout (models--org--repo/snapshots/<rev>/) is found without network and
    `load_backbone("timm:...")` reads it through the family's format row."""
    import huggingface_hub.constants as hub_constants

    ref = reference("dinov2")
    snap = tmp_path / "models--timm--vit_base_patch14_dinov2.lvd142m" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    mp = pytest.MonkeyPatch()
    mp.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    try:
        model = VisionTransformer(**our_kwargs("dinov2"))
        report = load_backbone("timm:vit_base_patch14_dinov2.lvd142m", model)
    finally:
        mp.undo()
    assert report.format == "timm" and report.source.endswith("model.safetensors")
    with torch.no_grad():
        assert rel_err(model.forward_features(image("dinov2")), ref.forward_features(image("dinov2"))) <= REL


# ------------------------------------------------------------------------------------------- study spec
def _value(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def test_backbone_families_spec_cells_build_each_familys_vit(tmp_path):
    """configs/studies/backbone_families.py: every family x task cell carries the family's options in the task
    kind's spelling, and those options build the family's ViT in each framework's backbone (depth 2 here)."""
    from detectron2.config import LazyConfig

    from backbones.detectron2 import ViTBackbone
    from backbones.mmseg import MAEViT
    from backbones.vit import create_vit
    from mae_transfer.study.spec import Cell, cell_command, load_study

    study = load_study("configs/studies/backbone_families.py", tmp_path / "out")
    assert list(study.backbones) == ["MAE", "DeiT III", "DINOv2", "CLIP", "BEiTv2", "EVA-02"]
    assert study.backbones["DINOv2"]["checkpoint"] == "timm:vit_base_patch14_dinov2.lvd142m"
    det_cfg = LazyConfig.load("configs/coco_mask_rcnn_vit_b.py")
    for name in study.backbones:
        for task in study.tasks:
            _, args = cell_command(study, Cell(name, task, 0, 0), "CKPT", resume=False)
            kind = study.kind(task).name
            arch = [a for a in args if a.startswith(("model.backbone", "encoder_overrides."))]
            opts = (study.backbones[name].get("opts", {}) if isinstance(study.backbones[name], dict) else {})
            assert arch == opts.get(kind, [])
            kw = {a.split("=", 1)[0].rsplit(".", 1)[1]: _value(a.split("=", 1)[1]) for a in arch}
            if kind == "det":
                cfg = LazyConfig.apply_overrides(LazyConfig.load("configs/coco_mask_rcnn_vit_b.py"), arch)
                net = {k: v for k, v in cfg.model.backbone.net.items() if k != "_target_"}
                assert all(net[k] == v for k, v in kw.items())
                vit = ViTBackbone(**{**net, "depth": 2, "global_block_indexes": (1,)})
                assert vit.patch_size == 16  # 14-px families resampled in det
            elif kind == "seg":
                vit = MAEViT(**{**kw, "depth": 2, "out_indices": (0, 1), "img_size": 512})
                assert vit.patch_size == 16
            else:
                vit = create_vit("vit_base_patch16_224", **{**kw, "depth": 2})
                assert vit.patch_size == (14 if name in ("DINOv2", "EVA-02") else 16)
            if name == "EVA-02":
                assert vit.rope_ref_grid == (16, 16) and type(vit.blocks[0].mlp).__name__ == "SwiGLU"
    assert det_cfg.model.backbone.net.patch_size == 16


# ------------------------------------------------------------------------------------------- bad input, CLI
@pytest.mark.parametrize("case", ["unknown_family", "patch14_into_16", "unknown_hub_name", "clip_text_only"])
def test_bad_inputs_are_one_error_line_and_nothing_written(case, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src.pth"
    if case == "unknown_family":
        torch.save({"stem.conv.weight": torch.zeros(4, 3, 3, 3), "layer1.0.bn1.weight": torch.zeros(4)}, src)
    elif case == "patch14_into_16":  # a DINOv2 file at the width of the tool's vit_tiny target
        ref = timm.create_model(CASES["dinov2"][0], depth=2, embed_dim=192, num_heads=3, img_size=56)
        torch.save({**ref.state_dict(), "mask_token": torch.zeros(1, 192)}, src)
    elif case == "clip_text_only":
        torch.save({k: v for k, v in _original_clip(reference("clip")).items() if not k.startswith("visual.")}, src)
    else:
        src = "timm:vit_base_patch14_nosuchmodel.lvd142m"
    dst = tmp_path / "out.pth"
    proc = subprocess.run([sys.executable, str(repo / "tools/convert_checkpoint.py"), str(src), str(dst),
                           "--to", "backbone", "--model", "vit_tiny_patch16_224", "--depth", "2"],
                          capture_output=True, text=True, cwd=repo, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    expect = {"unknown_family": "unknown checkpoint format", "patch14_into_16": "has 14x14 patches but the model 16x16",
              "unknown_hub_name": "unknown timm pretrained model", "clip_text_only": "text tower only"}[case]
    assert expect in errors[0]
    assert not dst.exists() and list(tmp_path.glob("out*")) == []


def test_keep_patch_size_reads_the_files_patch(tmp_path):
    from mae_transfer.checkpoint.fitting import checkpoint_patch_size

    assert checkpoint_patch_size(_dinov2_file(tmp_path)) == 14
    sd = _original_clip(reference("clip"))
    torch.save(sd, tmp_path / "clip.pth")
    assert checkpoint_patch_size(tmp_path / "clip.pth") == 16


def test_finetune_cls_keep_patch_size_builds_a_patch14_classifier(tmp_path):
    """tools/finetune_cls.py --keep-patch-size with a DINOv2 file: the classifier is built at 14 px and the file
    loads (one epoch on a tiny synthetic ImageFolder)."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (64, 64), (40 * i, 100 if c == "a" else 0, 7)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    ckpt = _dinov2_file(tmp_path)
    cmd = [sys.executable, str(repo / "tools/finetune_cls.py"), "--config", "configs/cls_finetune_vit_tiny_cpu.py",
           "--data", str(tmp_path / "data"), "--finetune", str(ckpt), "--output-dir", str(tmp_path / "out"),
           "--keep-patch-size", "epochs=1", "warmup_epochs=0", "img_size=56", "batch_size=2",
           "model=vit_tiny_patch16_224", "encoder_overrides.embed_dim=64", "encoder_overrides.num_heads=2",
           "encoder_overrides.depth=2", "encoder_overrides.init_values=1e-5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "format dinov2" in log and "resampled" not in log, log[-3000:]
    without = subprocess.run([c for c in cmd if c != "--keep-patch-size"], capture_output=True, text=True, cwd=repo,
                             timeout=600)
    errors = [line for line in without.stderr.splitlines() if line.startswith("error:")]
    assert without.returncode != 0 and len(errors) == 1 and "has 14x14 patches but the model 16x16" in errors[0]


@pytest.mark.parametrize("tool,flag", [("tools/train_seg.py", "--init-checkpoint"), ("tools/finetune_cls.py",
                                                                                      "--finetune")])
def test_tools_resolve_hub_names_offline_one_error_line(tool, flag, tmp_path):
    """An uncached hub name offline: the tool's one error line names the cache and train.init_checkpoint=PATH."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    config = "configs/ade20k_upernet_vit_tiny_cpu.py" if "seg" in tool else "configs/cls_finetune_vit_tiny_cpu.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, str(repo / tool), "--config", config, flag,
                           "timm:vit_base_patch14_dinov2.lvd142m", "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=repo, timeout=300, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert str(tmp_path / "hub") in errors[0] and "train.init_checkpoint=PATH" in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pth"))


def test_detection_checkpoint_path_resolves_hub_names(tmp_path):
    """train_det's `train.init_checkpoint` goes through `local_checkpoint_path`: hub names resolve there (offline:
    the one error line)."""
    import huggingface_hub.constants as hub_constants

    from mae_transfer.detection.checkpoint import local_checkpoint_path

    mp = pytest.MonkeyPatch()
    mp.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    try:
        with pytest.raises(MaeTransferError, match="train.init_checkpoint=PATH"):
            local_checkpoint_path("timm:vit_base_patch14_dinov2.lvd142m")
    finally:
        mp.undo()
