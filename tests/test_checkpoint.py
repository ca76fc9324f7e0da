"""Checkpoint import: every format is built from an independent, randomly initialised reference model
(timm, HF transformers, detectron2's ViT, mmseg's MAE/BEiT/ViT, official-MAE-style dicts) and our ViT's
outputs after import must equal the reference's. Writers are loaded back by the frameworks' own loaders."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mae_transfer  # noqa: F401
from backbones.vit import VisionTransformer, resize_abs_pos
from mae_transfer.checkpoint import (
    LoadReport,
    load_backbone,
    load_backbone_state_dict,
    save_backbone,
    to_detectron2,
    to_mmseg,
)
from mae_transfer.errors import MaeTransferError

REPO = Path(__file__).resolve().parents[1]
DIM, DEPTH, HEADS = 64, 2, 2
TOL = dict(atol=1e-5, rtol=1e-5)


def ours(**kw) -> VisionTransformer:
    cfg = dict(img_size=64, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


def timm_vit(**kw):
    import timm

    name = kw.pop("name", "vit_tiny_patch16_224")
    cfg = dict(pretrained=False, img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=7)
    cfg.update(kw)
    m = timm.create_model(name, **cfg)
    with torch.no_grad():  # timm zero-inits some tensors; make every tensor informative
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture
def img() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _load(src, model, **kw) -> LoadReport:
    report = load_backbone(src, model, **kw)
    assert "format" in str(report) and report.format in str(report)
    return report


# --------------------------------------------------------------------------- timm / official MAE / DeiT
def test_timm_parity(img, tmp_path):
    ref = timm_vit()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    model = ours(num_classes=7)
    report = _load(tmp_path / "timm.pth", model)
    assert report.format == "timm" and not report.missing and not report.unexpected
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(img), ref.forward_features(img), **TOL)
        torch.testing.assert_close(model(img), ref(img), **TOL)


def test_pos_embed_resampling_timm_mode_and_recipe_mode(tmp_path):
    """One resampler, two modes: antialias=True is timm's `resample_abs_pos_embed` bit for bit; the importer uses
    antialias=False, the fine-tuning recipes' resize (timm's function with antialias=False here; mmseg's and
    detectron2's own are compared in test_mmseg / test_detectron2)."""
    import timm
    from timm.layers import resample_abs_pos_embed as timm_resample
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref224 = timm_vit(img_size=224)
    sd = ref224.state_dict()
    for size in (512, 1024):  # table level: 224 -> 512 and 1024
        grid = size // 16
        timm_aa = timm_resample(sd["pos_embed"], new_size=[grid, grid], num_prefix_tokens=1)
        got = resize_abs_pos(sd["pos_embed"], (grid, grid), 1, antialias=True).reshape(1, grid * grid, DIM)
        torch.testing.assert_close(got, timm_aa[:, 1:], atol=0, rtol=0)
        plain = timm_resample(sd["pos_embed"], new_size=[grid, grid], num_prefix_tokens=1, antialias=False)
        model = ours(img_size=size)
        loaded, report = load_backbone_state_dict(sd, model)
        torch.testing.assert_close(loaded["pos_embed"], plain, atol=0, rtol=0)
        assert (loaded["pos_embed"] - timm_aa).abs().max() > 1e-3  # the two modes really differ
        assert report.resized["pos_embed"] == ((1, 197, DIM), (1, 1 + grid * grid, DIM))
    # Model level at 512: timm loading its own 224 weights with the recipes' mode vs our import.
    ref512 = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=512, embed_dim=DIM,
                               depth=DEPTH, num_heads=HEADS, num_classes=7).eval()
    ref512.load_state_dict(checkpoint_filter_fn(dict(sd), ref512, antialias=False))
    model = ours(img_size=512, num_classes=7)
    _load(sd, model)
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref512(x), **TOL)


def _official_mae_pretrain_dict(ref) -> dict:
    """The facebookresearch/mae pretrain layout: timm encoder keys + decoder keys at top level."""
    sd = dict(ref.state_dict())
    sd.pop("head.weight"), sd.pop("head.bias")
    dec = {"mask_token": (1, 1, 32), "decoder_pos_embed": (1, 17, 32), "decoder_embed.weight": (32, DIM),
           "decoder_embed.bias": (32,), "decoder_blocks.0.attn.qkv.weight": (96, 32),
           "decoder_norm.weight": (32,), "decoder_pred.weight": (768, 32), "decoder_pred.bias": (768,)}
    sd.update({k: torch.randn(s) for k, s in dec.items()})
    return {"model": sd}


def test_official_mae_pretrain(img, tmp_path):
    ref = timm_vit()
    torch.save(_official_mae_pretrain_dict(ref), tmp_path / "mae_pretrain.pth")
    model = ours()
    report = _load(tmp_path / "mae_pretrain.pth", model)
    assert report.format == "mae_official_pretrain"
    assert "mask_token" in report.unexpected and "decoder_embed.weight" in report.unexpected
    assert not report.missing
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(img), ref.forward_features(img), **TOL)


def test_official_mae_finetune(img):
    ref = timm_vit(global_pool="avg")  # timm's avg pool = MAE fine-tune layout: fc_norm, no final norm
    sd = {"model": ref.state_dict()}
    assert "fc_norm.weight" in sd["model"]
    model = ours(global_pool="avg", num_classes=7)
    report = _load(sd, model)
    assert report.format == "mae_official_finetune" and not report.unexpected and not report.missing
    with torch.no_grad():
        torch.testing.assert_close(model(img), ref(img), **TOL)
    # A backbone-only target keeps its own final norm and ignores fc_norm / head.
    report = _load(sd, ours())
    assert set(report.unexpected) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert report.missing == ["norm.weight", "norm.bias"]


def test_deit_distilled_drops_dist_token():
    ref = timm_vit(name="deit_tiny_distilled_patch16_224")
    sd = {"model": ref.state_dict()}
    model = ours()
    report = _load(sd, model)
    assert report.format == "deit" and "dist_token" in report.unexpected
    pos = ref.pos_embed.detach()
    torch.testing.assert_close(model.pos_embed.detach(), torch.cat([pos[:, :1], pos[:, 2:]], 1), atol=0, rtol=0)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight, atol=0, rtol=0)


# --------------------------------------------------------------------------- our own MAE checkpoints
def test_our_mae_pretrain_and_backbone_export(img, tmp_path):
    from mae_transfer.mae import MaskedAutoencoder

    mae = MaskedAutoencoder(encoder=ours(), decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    with torch.no_grad():
        for p in mae.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"model": mae.state_dict(), "optimizer": {}, "epoch": 3, "config": {"mask_ratio": 0.75}},
               tmp_path / "ours.pth")
    model = ours()
    report = _load(tmp_path / "ours.pth", model)
    assert report.format == "mae_transfer_pretrain" and "mask_token" in report.unexpected and not report.missing
    with torch.no_grad():
        expect = mae.encoder.eval().forward_features(img)
        torch.testing.assert_close(model.forward_features(img), expect, atol=0, rtol=0)
    save_backbone(model, tmp_path / "backbone.pth")
    again = ours()
    report = _load(tmp_path / "backbone.pth", again)
    assert report.format == "mae_transfer_backbone" and not report.missing and not report.unexpected
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(img), expect, atol=0, rtol=0)


# --------------------------------------------------------------------------- Hugging Face
def _hf_mae():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
                       decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                       decoder_intermediate_size=64, image_size=64, patch_size=16, mask_ratio=0.0,
                       layer_norm_eps=1e-6)
    torch.manual_seed(0)
    return ViTMAEForPreTraining(cfg).eval()


def test_hf_vitmae_parity_both_layouts(img, tmp_path):
    ref = _hf_mae()
    noise = torch.arange(16.0).expand(2, 16)  # mask_ratio 0 and sorted noise: no shuffling
    with torch.no_grad():
        expect = ref.vit(pixel_values=img, noise=noise).last_hidden_state
    ref.save_pretrained(tmp_path / "hf")  # hub layout (encoder.layer.i.attention.attention.query ...)
    for src, layout in ((ref.state_dict(), "v5"), (tmp_path / "hf", "hub")):
        model = ours()
        report = _load(src, model)
        assert report.format == "hf_vitmae", layout
        assert not report.missing and all(k.startswith("decoder.") for k in report.unexpected), layout
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(img), expect, **TOL)


def test_hf_vitmodel_parity(img, tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ref = ViTModel(ViTConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                             intermediate_size=4 * DIM, image_size=64, patch_size=16, layer_norm_eps=1e-6)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        expect = ref(pixel_values=img).last_hidden_state
    ref.save_pretrained(tmp_path / "hfvit")
    for src in (ref.state_dict(), tmp_path / "hfvit" / "model.safetensors"):
        model = ours()
        report = _load(src, model)
        assert report.format == "hf_vit" and not report.missing
        assert set(report.unexpected) == {"pooler.dense.weight", "pooler.dense.bias"}
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(img), expect, **TOL)


# --------------------------------------------------------------------------- detectron2
def _d2_vit(img_size: int = 64):
    from detectron2.modeling.backbone.vit import ViT

    torch.manual_seed(0)
    ref = ViT(img_size=img_size, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, window_size=2,
              window_block_indexes=[0], use_rel_pos=True, pretrain_img_size=img_size).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # rel-pos tables are zero-initialised: make them matter
    return ref


def test_detectron2_vitdet_parity_and_rel_pos_resize(img, tmp_path):
    ref = _d2_vit()
    torch.save({"model": {"backbone.net." + k: v for k, v in ref.state_dict().items()},
                "__author__": "test"}, tmp_path / "d2.pth")
    kw = dict(class_token=False, window_size=2, global_block_indexes=[1], use_rel_pos=True)
    model = ours(rel_pos_input_size=64, **kw)
    report = _load(tmp_path / "d2.pth", model)
    assert report.format == "detectron2_vitdet"
    assert report.missing == ["norm.weight", "norm.bias"]  # ViTDet has no final norm
    with torch.no_grad():
        torch.testing.assert_close(model.forward_spatial(img)[0], ref(img)["last_feat"], **TOL)
    # Target built for 128 px: the global block's rel-pos table is resized (linear) at import; d2 resizes
    # the same table at run time, so outputs at 128 px agree.
    big = ours(rel_pos_input_size=128, **kw)
    report = _load(tmp_path / "d2.pth", big)
    assert report.resized["blocks.1.attn.rel_pos_h"] == ((7, DIM // HEADS), (15, DIM // HEADS))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(big.forward_spatial(x)[0], ref(x)["last_feat"], **TOL)


def test_bare_detectron2_vit_is_labelled_detectron2_and_detector_report_says_what_is_unused(img):
    """detectron2's `ViT` module state dict (no cls token, no final norm) is called what it is, not `timm`; a
    whole ViTDet backbone's pyramid keys are reported as a feature pyramid this backbone does not use."""
    from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

    ref = _d2_vit()
    model = ours(class_token=False, window_size=2, global_block_indexes=[1], use_rel_pos=True, rel_pos_input_size=64)
    report = _load(ref.state_dict(), model)
    assert report.format == "detectron2_vit" and "detectron2" in report.label and "timm" not in report.label
    assert report.missing == ["norm.weight", "norm.bias"] and not report.unexpected
    with torch.no_grad():
        torch.testing.assert_close(model.forward_spatial(img)[0], ref(img)["last_feat"], **TOL)
    pyramid = SimpleFeaturePyramid(ref, "last_feat", out_channels=32, scale_factors=(4.0, 2.0, 1.0, 0.5),
                                   norm="LN", square_pad=64)
    n_pyramid = sum(1 for k in pyramid.state_dict() if not k.startswith("net."))
    assert n_pyramid > 0
    detector = {"backbone." + k: v for k, v in pyramid.state_dict().items()}
    detector["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(4, 32)
    report = _load(detector, ours(class_token=False, window_size=2, global_block_indexes=[1], use_rel_pos=True,
                                  rel_pos_input_size=64))
    assert report.format == "detectron2_vitdet" and len(report.unexpected) == n_pyramid + 1
    text = str(report)
    assert f"not used by this backbone: feature pyramid, {n_pyramid} keys" in text, text
    assert "not used by this backbone: box / mask heads, 1 key" in text, text
    assert "ignored" not in text and "backbone.*" not in text, text  # nothing reads as "the backbone was ignored"


def test_report_names_unused_and_kept_keys_by_what_they_are(tmp_path):
    sd = _official_mae_pretrain_dict(timm_vit())["model"]
    sd["mystery.weight"] = torch.zeros(3)
    text = str(_load(sd, ours(final_norm=False)))
    assert "format mae_official_pretrain (facebookresearch/mae pretraining checkpoint" in text, text
    assert "not used by this backbone: MAE decoder, 8 keys" in text, text  # mask token + 7 decoder tensors
    assert "not used by this backbone: final norm, 2 keys" in text, text
    assert "not used by this backbone: other keys, 1 key (mystery.weight)" in text, text
    text = str(_load(sd, ours(use_rel_pos=True, window_size=2, global_block_indexes=[1])))
    assert f"not in the checkpoint, model init kept: {2 * DEPTH} keys (blocks.*.attn.rel_pos_h (2)" in text, text


def test_format_priority_not_registration_order():
    """A format registered later with a higher priority wins over an earlier lower-priority match, and a lower
    one loses although registered last; priorities are unique."""
    from mae_transfer.checkpoint import Format, detect_format, register_format, registered_formats, unregister_format

    sd = timm_vit().state_dict()
    sd["mask_token"] = torch.zeros(1, 1, DIM)  # matches timm (30) and mae_official_pretrain (50)
    assert detect_format(sd) == "mae_official_pretrain"
    probe = lambda sd, meta: "mask_token" in sd  # noqa: E731
    keep = lambda sd: (dict(sd), [], [])  # noqa: E731
    low = register_format(Format("test_low", "a test format", probe, keep, priority=20))
    try:
        assert detect_format(sd) == "mae_official_pretrain"  # registered last, lower priority: loses
        high = register_format(Format("test_high", "a test format", probe, keep, priority=51))
        try:
            assert detect_format(sd) == "test_high"
            names = [f.name for f in registered_formats()]  # highest priority first
            assert names.index("test_high") < names.index("mae_official_pretrain") < names.index("test_low")
            with pytest.raises(ValueError, match="priority 51 is already 'test_high'"):
                register_format(Format("test_clash", "a test format", probe, keep, priority=51))
        finally:
            unregister_format(high.name)
    finally:
        unregister_format(low.name)
    assert detect_format(sd) == "mae_official_pretrain"
    assert not {"test_low", "test_high", "test_clash"} & {f.name for f in registered_formats()}


def test_load_backbone_takes_the_source_first():
    """load_backbone(source, model): the one order (the reversed order's shim was removed, CHANGELOG.md)."""
    sd = timm_vit().state_dict()
    new = ours(num_classes=7)
    assert load_backbone(sd, new).format == "timm"
    torch.testing.assert_close(new.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"], atol=0, rtol=0)


def test_rel_pos_tables_absent_are_created_fresh():
    src = ours()
    model = ours(use_rel_pos=True, window_size=2, global_block_indexes=[1])
    before = model.blocks[0].attn.rel_pos_h.detach().clone()
    report = _load(src.state_dict(), model)
    assert set(report.missing) == {f"blocks.{i}.attn.rel_pos_{a}" for i in range(DEPTH) for a in "hw"}
    torch.testing.assert_close(model.blocks[0].attn.rel_pos_h.detach(), before, atol=0, rtol=0)


# --------------------------------------------------------------------------- mmseg
def _perturb(m, skip=("relative_position_bias_table",)):
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not any(s in n for s in skip):
                p.add_(torch.randn_like(p) * 0.05)
    m.eval()  # mmseg's train() overrides do not return self
    return m


def _our_token_maps(model, x, out_indices):
    """Our blocks run on the token layout with the cls token (as mmseg does); maps without the cls row."""
    maps = []
    tokens = model.embed_tokens(x)
    hw = (x.shape[-2] // 16, x.shape[-1] // 16)

    def hook(i, t):
        maps.append(t[:, 1:].reshape(t.shape[0], *hw, -1).permute(0, 3, 1, 2))

    model.run_blocks(tokens, out_indices, hook=hook)
    return maps


def test_mmseg_mae_parity_layer_scale_folded(img):
    from mmseg.models.backbones import MAE

    ref = _perturb(MAE(img_size=64, patch_size=16, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
                       out_indices=(0, 1), norm_cfg=dict(type="LN", eps=1e-6), init_values=0.1))
    assert float(ref.layers[0].gamma_1.detach().std()) > 0  # random layer scale: folding must be exact
    model = ours()
    report = _load({"state_dict": {"backbone." + k: v for k, v in ref.state_dict().items()}}, model)
    assert report.format == "mmseg_mae" and any("folded" in n for n in report.notes)
    with torch.no_grad():
        for got, expect in zip(_our_token_maps(model, img, (0, 1)), ref(img), strict=True):
            torch.testing.assert_close(got, expect, **TOL)


def test_mmseg_beit_qv_bias(img):
    from mmseg.models.backbones import BEiT

    ref = _perturb(BEiT(img_size=64, patch_size=16, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
                        out_indices=(1,), qv_bias=True, norm_cfg=dict(type="LN", eps=1e-6)))
    with torch.no_grad():
        for layer in ref.layers:
            layer.attn.relative_position_bias_table.zero_()
    model = ours()
    with torch.no_grad():
        model.pos_embed.zero_()  # BEiT has no absolute positions
    report = _load(ref.state_dict(), model)
    assert report.format == "mmseg_mae" and "pos_embed" in report.missing
    with torch.no_grad():
        torch.testing.assert_close(_our_token_maps(model, img, (1,))[0], ref(img)[0], **TOL)


def _mae_with_tables(img_size=64, init_values=0.5):
    """mmseg `MAE` with everything random: weights, layer scale and non-zero BEiT rel-pos tables."""
    from mmseg.models.backbones import MAE

    ref = MAE(img_size=img_size, patch_size=16, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
              out_indices=(0, 1), norm_cfg=dict(type="LN", eps=1e-6), init_values=init_values)
    ref = _perturb(ref, skip=())
    with torch.no_grad():
        for layer in ref.layers:
            layer.attn.relative_position_bias_table.normal_(0, 0.5)
            layer.gamma_1.uniform_(0.5, 1.5)
            layer.gamma_2.uniform_(0.5, 1.5)
    return ref


def test_mmseg_mae_rel_pos_bias_and_layer_scale_load_losslessly(img, caplog):
    """Non-zero BEiT tables and layer scale map 1:1 onto a model built with them: no warning, same outputs."""
    ref = _mae_with_tables()
    model = ours(use_rel_pos_bias=True, init_values=1.0, final_norm=False)  # mmseg MAE: no final norm
    with caplog.at_level("WARNING"):
        report = _load({"state_dict": {"backbone." + k: v for k, v in ref.state_dict().items()}}, model)
    assert report.format == "mmseg_mae" and report.missing == [] and not caplog.records
    assert not any("folded" in n or "dropped" in n for n in report.notes)
    assert "blocks.1.attn.relative_position_bias_table" in report.loaded and "blocks.0.gamma_2" in report.loaded
    torch.testing.assert_close(model.blocks[1].gamma_1.detach(), ref.layers[1].gamma_1.detach(), atol=0, rtol=0)
    with torch.no_grad():
        for got, expect in zip(_our_token_maps(model, img, (0, 1)), ref(img), strict=True):
            torch.testing.assert_close(got, expect, **TOL)
        # Sensitive to the tables: without one block's, the outputs move.
        model.blocks[0].attn.relative_position_bias_table.zero_()
        assert (_our_token_maps(model, img, (0,))[0] - ref(img)[0]).abs().max() > 1e-3


def test_mmseg_mae_tables_without_rel_pos_bias_model_still_warn(img, caplog):
    ref = _mae_with_tables()
    with caplog.at_level("WARNING"):
        report = _load(ref.state_dict(), ours())
    assert any("dropped" in n for n in report.notes) and any("folded" in n for n in report.notes)
    assert any("relative position bias" in r.getMessage() for r in caplog.records)


def test_rel_pos_bias_table_resize():
    """BEiT table resize: cls rows kept; with the end offsets aligned, 4x4 -> 7x7 (7 -> 13 offsets) keeps every
    source offset's value on the even rows/columns; a constant table stays constant."""
    from backbones.vit import resize_rel_pos_bias_table

    torch.manual_seed(0)
    src = torch.randn(7 * 7 + 3, 3, dtype=torch.float64)
    assert resize_rel_pos_bias_table(src, (4, 4), (4, 4)) is src
    up = resize_rel_pos_bias_table(src, (4, 4), (7, 7))
    assert up.shape == (13 * 13 + 3, 3) and up.dtype == torch.float64
    torch.testing.assert_close(up[-3:], src[-3:], atol=0, rtol=0)
    torch.testing.assert_close(up[:-3].reshape(13, 13, 3)[::2, ::2], src[:-3].reshape(7, 7, 3), atol=1e-12, rtol=0)
    const = torch.full((7 * 7 + 3, 2), 0.25)
    for w in (2, 6, 32):
        torch.testing.assert_close(resize_rel_pos_bias_table(const, (4, 4), (w, w)),
                                   torch.full(((2 * w - 1) ** 2 + 3, 2), 0.25), atol=1e-6, rtol=0)
    with pytest.raises(Exception, match="does not fit"):
        resize_rel_pos_bias_table(src, (5, 5), (4, 4))


def test_mmseg_mae_tables_resized_to_the_model_grid(img):
    """A 64-px (4x4) mmseg MAE file into a 96-px model (6x6): each table resized once at import (cls rows
    kept) and read through BEiT's index layout for the new grid."""
    from backbones.vit import resize_rel_pos_bias_table

    ref = _mae_with_tables()
    model = ours(img_size=96, use_rel_pos_bias=True, init_values=1.0)
    report = _load(ref.state_dict(), model)
    key = "blocks.0.attn.relative_position_bias_table"
    assert report.resized[key] == ((7 * 7 + 3, HEADS), (11 * 11 + 3, HEADS))
    src = ref.layers[0].attn.relative_position_bias_table.detach()
    got = model.blocks[0].attn.relative_position_bias_table.detach()
    torch.testing.assert_close(got, resize_rel_pos_bias_table(src, (4, 4), (6, 6)), atol=0, rtol=0)
    torch.testing.assert_close(got[-3:], src[-3:], atol=0, rtol=0)
    # Offset 0 (the centre of the offset grid) keeps its value: aligned ends keep the centre too.
    torch.testing.assert_close(got[5 * 11 + 5], src[3 * 7 + 3], atol=1e-6, rtol=0)
    # BEiT's index layout for the new grid: every pair of patches reads its offset's row.
    with torch.no_grad():
        bias = model.blocks[0].attn.rel_pos_bias((6, 6), cls_token=True)[0]
    assert bias.shape == (HEADS, 37, 37)
    torch.testing.assert_close(bias[:, 1, 1], got[5 * 11 + 5], atol=0, rtol=0)
    torch.testing.assert_close(bias[:, 0, 5], got[-3], atol=0, rtol=0)  # cls -> patch
    torch.testing.assert_close(bias[:, 5, 0], got[-2], atol=0, rtol=0)  # patch -> cls
    torch.testing.assert_close(bias[:, 0, 0], got[-1], atol=0, rtol=0)


def test_mmseg_vit_parity(img):
    from mmseg.models.backbones import VisionTransformer as MMViT

    ref = _perturb(MMViT(img_size=64, patch_size=16, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
                         out_indices=(0, 1), norm_cfg=dict(type="LN", eps=1e-6), final_norm=False))
    model = ours()
    report = _load({"state_dict": {"backbone." + k: v for k, v in ref.state_dict().items()}, "meta": {}}, model)
    assert report.format == "mmseg_vit" and "patch_embed.proj.bias" in report.loaded
    with torch.no_grad():
        for got, expect in zip(_our_token_maps(model, img, (0, 1)), ref(img), strict=True):
            torch.testing.assert_close(got, expect, **TOL)


# --------------------------------------------------------------------------- writers, read by the frameworks
def test_writers_load_with_zero_missing_keys(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from mmengine.runner import load_checkpoint

    src = ours(use_rel_pos=True, window_size=2, global_block_indexes=[1], class_token=False)
    _perturb(src)

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.net = ours(use_rel_pos=True, window_size=2, global_block_indexes=[1], class_token=False)

    class Capturing(DetectionCheckpointer):  # the real load path; keeps the incompatible-keys result
        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    to_detectron2(src, tmp_path / "d2.pth")
    det = Detector()
    ckpt = Capturing(det)
    ckpt.load(str(tmp_path / "d2.pth"))
    assert not ckpt.incompatible.missing_keys and not ckpt.incompatible.unexpected_keys
    torch.testing.assert_close(det.backbone.net.blocks[1].attn.rel_pos_h, src.blocks[1].attn.rel_pos_h, atol=0, rtol=0)

    to_mmseg(src, tmp_path / "mmseg.pth")
    seg = torch.nn.Module()
    seg.backbone = ours(use_rel_pos=True, window_size=2, global_block_indexes=[1], class_token=False)
    load_checkpoint(seg, str(tmp_path / "mmseg.pth"), strict=True)  # raises on any missing key
    torch.testing.assert_close(seg.backbone.patch_embed.proj.weight, src.patch_embed.proj.weight, atol=0, rtol=0)
    # The written files are themselves importable (formats detected from their keys).
    assert _load(tmp_path / "d2.pth", ours(class_token=False)).format == "detectron2_vitdet"
    assert _load(tmp_path / "mmseg.pth", ours(class_token=False)).format == "mae_transfer_mmseg"
    nested = {"state_dict": {"model.backbone.net.vit." + k: v for k, v in src.state_dict().items()}}
    target = ours(use_rel_pos=True, window_size=2, global_block_indexes=[1], class_token=False)
    report = _load(nested, target)
    assert report.format == "prefixed_vit" and not report.missing and not report.unexpected
    torch.testing.assert_close(target.blocks[1].attn.rel_pos_w, src.blocks[1].attn.rel_pos_w, atol=0, rtol=0)


# --------------------------------------------------------------------------- errors
def test_errors_are_one_clear_line(tmp_path):
    sd = timm_vit().state_dict()
    with pytest.raises(MaeTransferError, match=r"'cls_token' has shape \(1, 1, 64\).*expects \(1, 1, 96\)"):
        load_backbone_state_dict(sd, ours(embed_dim=96, num_heads=2))
    with pytest.raises(MaeTransferError, match="checkpoint has 2 blocks but the model has 3"):
        load_backbone_state_dict(sd, ours(depth=3))
    with pytest.raises(MaeTransferError, match="unknown checkpoint format"):
        load_backbone_state_dict({"foo.weight": torch.zeros(2)}, ours())
    import argparse

    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(MaeTransferError, match=r"argparse\.Namespace.*allow_pickle=True \(CLI: --allow-pickle\)"):
        load_backbone_state_dict(tmp_path / "pickled.pth", ours(num_classes=7))
    assert load_backbone_state_dict(tmp_path / "pickled.pth", ours(num_classes=7),
                                    allow_pickle=True)[1].format == "timm"
    # detectron2 model-zoo style .pkl (plain pickle of numpy arrays): opt-in only.
    import pickle

    with open(tmp_path / "zoo.pkl", "wb") as fh:
        pickle.dump({"model": {"backbone.net." + k: v.numpy() for k, v in sd.items()}, "__author__": "x"}, fh)
    with pytest.raises(MaeTransferError, match="allow_pickle=True"):
        load_backbone_state_dict(tmp_path / "zoo.pkl", ours(num_classes=7))
    loaded, report = load_backbone_state_dict(tmp_path / "zoo.pkl", ours(num_classes=7), allow_pickle=True)
    assert report.format == "detectron2_vitdet" and torch.equal(loaded["blocks.1.mlp.fc1.weight"],
                                                                sd["blocks.1.mlp.fc1.weight"])
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(MaeTransferError, match="not a PyTorch checkpoint"):
        load_backbone_state_dict(tmp_path / "notes.txt", ours())
    torch.save({"model": sd}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:5000])
    with pytest.raises(MaeTransferError, match="truncated or corrupt"):
        load_backbone_state_dict(tmp_path / "cut.pth", ours())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def _tool_main():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_convert_cli(tmp_path, capsys):
    import timm

    from mae_transfer.cli import run_cli

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # the real ViT-Ti/16 architecture
    torch.save({"model": ref.state_dict()}, tmp_path / "good.pth")
    (tmp_path / "bad.txt").write_text("not a checkpoint")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:100_000])
    torch.save({"model": {"foo.weight": torch.zeros(3)}}, tmp_path / "unknown.pth")
    out = tmp_path / "out"
    out.mkdir()
    cases = [("bad.txt", "not a PyTorch checkpoint", "vit_tiny_patch16_224"),
             ("cut.pth", "truncated or corrupt", "vit_tiny_patch16_224"),
             ("good.pth", "different architecture", "vit_small_patch16_224"),
             ("unknown.pth", "unknown checkpoint format", "vit_tiny_patch16_224")]
    main = _tool_main()  # the tool's own main through run_cli, in-process (subprocesses cost ~3 s each)
    for name, message, arch in cases:
        rc = run_cli(main, [str(tmp_path / name), str(out / "x.pth"), "--to", "detectron2", "--model", arch])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, err)
        assert list(out.iterdir()) == [], name  # no partial output, no temp file
    # The real process: exit status and stderr of one failure, then a successful conversion.
    res = _cli(str(tmp_path / "cut.pth"), str(out / "x.pth"), "--to", "mmseg")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "truncated" in res.stderr, res.stderr
    assert list(out.iterdir()) == []
    res = _cli(str(tmp_path / "good.pth"), str(out / "vit_ti_d2.pth"), "--to", "detectron2",
               "--model", "vit_tiny_patch16_224", "--img-size", "512", "--no-cls-token")
    assert res.returncode == 0, res.stderr
    assert "format timm" in res.stdout and "pos_embed (1, 197, 192) -> (1, 1024, 192)" in res.stdout
    assert "pretrain_img_size=512, pretrain_use_cls_token=False" in res.stdout
    written = torch.load(out / "vit_ti_d2.pth", weights_only=True)["model"]
    assert written["backbone.net.pos_embed"].shape == (1, 1024, 192)
    assert not any(k.startswith(("backbone.net.cls_token", "backbone.net.norm.")) for k in written)
