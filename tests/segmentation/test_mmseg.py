"""MMSegmentation adapter: parity with mmseg's own backbones, configs, training, evaluation, CLI errors."""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones.mmseg  # noqa: F401  (registers MAEViT)
from backbones.mmseg import MAEViT
from mae_transfer.checkpoint import load_backbone
from mae_transfer.cli import run_cli
from mae_transfer.metrics import read_eval_metrics
from mae_transfer.segmentation.checkpoint import read_mmengine_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"


def _train_seg():
    spec = importlib.util.spec_from_file_location("train_seg", REPO_ROOT / "tools" / "train_seg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(name: str):
    from mmengine.config import Config

    return Config.fromfile(str(CONFIGS / name))


def _build(model_cfg):
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    return revert_sync_batchnorm(MODELS.build(model_cfg))


def _perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    """Make every weight (biases, norms, tokens) non-trivial, so a wrong mapping shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


# ------------------------------------------------------------------------------------------ parity
C, DEPTH, HEADS, OUT = 96, 4, 4, (0, 1, 3)


def _assert_same_maps_at_512(ours, ref, x):
    """Our backbone's maps equal mmseg's (max abs diff <= 1e-4) at 512 px; returns mmseg's."""
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert len(a) == len(b) == len(OUT)
    for fa, fb in zip(a, b, strict=True):
        assert fa.shape == fb.shape == (1, C, 32, 32)
        assert (fa - fb).abs().max().item() <= 1e-4
    return b


def test_parity_with_mmseg_mae_at_512_with_interpolated_pos_embed(tmp_path):
    """Our MAEViT == mmseg `MAE` (BEiT-style layer scale, cls token in the sequence) at 512 px.

    Both start from one 224-px checkpoint in mmseg's MAE layout: mmseg builds the 512-px model and
    resizes its position table at `init_weights` (bicubic), ours keeps the 224 table and interpolates
    at run time; our weights come through `mae_transfer.checkpoint`'s mmseg importer (which folds the
    layer-scale gammas, here random instead of 1.0, into the projections).
    """
    from mmseg.models.backbones import MAE

    g = torch.Generator().manual_seed(0)
    src = MAE(img_size=224, embed_dims=C, num_layers=DEPTH, num_heads=HEADS, out_indices=OUT, init_values=1.0,
              norm_cfg=dict(type="LN", eps=1e-6))
    src.init_weights()
    _perturb(src, g)
    with torch.no_grad():
        for layer in src.layers:
            layer.gamma_1.uniform_(0.5, 1.5, generator=g)
            layer.gamma_2.uniform_(0.5, 1.5, generator=g)
    # The rel-pos tables are all zero in MAE (never trained by MAE pretraining); mmseg's resize of them
    # needs scipy's interp2d, removed in scipy 1.14, so they stay out of the file.
    sd = {k: v for k, v in src.state_dict().items() if "relative_position" not in k}
    path = tmp_path / "mmseg_mae_224.pth"
    torch.save(sd, path)

    ref = MAE(img_size=512, embed_dims=C, num_layers=DEPTH, num_heads=HEADS, out_indices=OUT, init_values=1.0,
              norm_cfg=dict(type="LN", eps=1e-6), init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    ref.init_weights()
    ref.eval()
    assert ref.pos_embed.shape == (1, 1 + 32 * 32, C)
    ours = MAEViT(img_size=224, embed_dim=C, depth=DEPTH, num_heads=HEADS, out_indices=OUT, drop_path_rate=0.0)
    report = load_backbone(str(path), ours)
    assert report.format == "mmseg_mae" and report.missing == []
    assert ours.pos_embed.shape == (1, 1 + 14 * 14, C)  # interpolated in forward, not in the weights
    ours.eval()

    x = torch.randn(1, 3, 512, 512, generator=g)
    b = _assert_same_maps_at_512(ours, ref, x)
    # The comparison is sensitive: a table that is not interpolated the same way breaks it.
    ours.pos_embed.data[:, 1:] += 0.01
    with torch.no_grad():
        assert (ours(x)[0] - b[0]).abs().max().item() > 1e-3


def test_pos_embed_resize_at_import_equals_mmseg_mae_resize_abs_pos_embed(tmp_path):
    """The ADE20K backbone (img_size 512) from a 224 checkpoint starts from exactly mmseg `MAE`'s table: its
    `resize_abs_pos_embed` (plain bicubic, as MAE's `interpolate_pos_embed`), not timm's antialiased resize."""
    from mmseg.models.backbones import MAE

    from backbones.vit import resize_abs_pos

    g = torch.Generator().manual_seed(3)
    arch = dict(embed_dims=C, num_layers=DEPTH, num_heads=HEADS, out_indices=OUT, init_values=1.0,
                norm_cfg=dict(type="LN", eps=1e-6))
    src = MAE(img_size=224, **arch)
    _perturb(src, g)
    sd = {k: v for k, v in src.state_dict().items() if "relative_position" not in k}  # zero in MAE; see above
    torch.save(sd, tmp_path / "mmseg_mae_224.pth")
    ref = MAE(img_size=512, **arch, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "mmseg_mae_224.pth")))
    expect = ref.resize_abs_pos_embed({"pos_embed": sd["pos_embed"].clone()})["pos_embed"]
    assert expect.shape == (1, 1 + 32 * 32, C)

    ours = MAEViT(img_size=512, use_rel_pos_bias=True, init_values=1.0, embed_dim=C, depth=DEPTH, num_heads=HEADS,
                  out_indices=OUT, drop_path_rate=0.0)
    report = load_backbone(str(tmp_path / "mmseg_mae_224.pth"), ours)
    assert report.resized["pos_embed"] == ((1, 197, C), (1, 1025, C))
    assert torch.equal(ours.pos_embed.detach(), expect)
    timm_like = resize_abs_pos(sd["pos_embed"], (32, 32), 1, antialias=True).reshape(1, 1024, C)
    assert (timm_like - expect[:, 1:]).abs().max() > 1e-3  # the antialiased resize would not be the same start
    ref.init_weights()  # mmseg loads the same file, resizing the table itself (the maps then agree: tests above)
    assert torch.equal(ref.pos_embed.detach(), expect)


def test_parity_with_mmseg_mae_rel_pos_bias_layer_scale_512_table(tmp_path, caplog, monkeypatch):
    """mmseg's MAE backbone options (512-px position table, BEiT rel-pos bias, layer scale) ==
    mmseg `MAE(img_size=512, init_values=1.0)` at 512 px, given the same weights: every weight random,
    including non-zero rel-pos tables and gammas, written as an mmseg checkpoint and read through
    `mae_transfer.checkpoint` (1:1, nothing folded, dropped or resized)."""
    from mmseg.models.backbones import MAE

    opts = {"img_size": 512, "use_rel_pos_bias": True, "init_values": 1.0}
    g = torch.Generator().manual_seed(2)
    ref = MAE(img_size=512, embed_dims=C, num_layers=DEPTH, num_heads=HEADS, out_indices=OUT, init_values=1.0,
              norm_cfg=dict(type="LN", eps=1e-6))
    ref.init_weights()
    _perturb(ref, g)
    with torch.no_grad():
        for layer in ref.layers:
            layer.attn.relative_position_bias_table.normal_(0, 0.5, generator=g)
            layer.gamma_1.uniform_(0.5, 1.5, generator=g)
            layer.gamma_2.uniform_(0.5, 1.5, generator=g)
    ref.eval()
    path = tmp_path / "mmseg_mae_512.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in ref.state_dict().items()}}, path)

    ours = MAEViT(embed_dim=C, depth=DEPTH, num_heads=HEADS, out_indices=OUT, drop_path_rate=0.0, **opts)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    with caplog.at_level("WARNING"):
        report = load_backbone(str(path), ours)
    assert report.format == "mmseg_mae" and report.missing == [] and report.resized == {} and not caplog.records
    ours.eval()
    x = torch.randn(1, 3, 512, 512, generator=g)
    b = _assert_same_maps_at_512(ours, ref, x)

    # Training: the same gradients as mmseg's explicit attention, through our CPU kernel for a learned bias.
    from backbones import kernels
    calls, backward = [], kernels.BiasedAttention.backward
    monkeypatch.setattr(kernels.BiasedAttention, "backward", staticmethod(lambda *a: calls.append(1) or backward(*a)))
    weights = [torch.randn(f.shape, generator=g) for f in b]
    sum((f * w).sum() for f, w in zip(ours(x), weights, strict=True)).backward()
    sum((f * w).sum() for f, w in zip(ref(x), weights, strict=True)).backward()
    assert len(calls) == DEPTH
    for i, (mine, theirs) in enumerate(zip(ours.blocks, ref.layers, strict=True)):
        for name, ga, gb in [("table", mine.attn.relative_position_bias_table.grad,
                              theirs.attn.relative_position_bias_table.grad),
                             ("gamma_1", mine.gamma_1.grad, theirs.gamma_1.grad),
                             ("qkv", mine.attn.qkv.weight.grad, theirs.attn.qkv.weight.grad)]:
            assert ga.abs().max() > 0, (i, name)
            torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-3 * gb.abs().max().item(), msg=f"block {i} {name}")
    with torch.no_grad():
        # The tables matter: one block's zeroed moves the outputs.
        ours.blocks[0].attn.relative_position_bias_table.zero_()
        assert (ours(x)[0] - b[0]).abs().max().item() > 1e-3


def test_parity_without_cls_token_with_mmseg_vision_transformer():
    """with_cls_token=False (our `forward_spatial`) == mmseg `VisionTransformer(with_cls_token=False)`,
    both with a 224 table interpolated at run time to a 512 px input."""
    from mmseg.models.backbones import VisionTransformer as MMViT

    g = torch.Generator().manual_seed(1)
    ref = MMViT(img_size=224, embed_dims=C, num_layers=DEPTH, num_heads=HEADS, out_indices=OUT, qkv_bias=True,
                with_cls_token=False, final_norm=False, norm_cfg=dict(type="LN", eps=1e-6),
                interpolate_mode="bicubic")
    ref.init_weights()
    _perturb(ref, g)
    ref.eval()
    ours = MAEViT(img_size=224, embed_dim=C, depth=DEPTH, num_heads=HEADS, out_indices=OUT, drop_path_rate=0.0,
                  with_cls_token=False)
    report = load_backbone(ref.state_dict(), ours)
    assert report.format == "mmseg_vit" and report.missing == []
    assert not ours.cls_token.requires_grad  # unused in this layout
    ours.eval()
    x = torch.randn(1, 3, 512, 512, generator=g)
    with torch.no_grad():
        for fa, fb in zip(ours(x), ref(x), strict=True):
            assert fa.shape == fb.shape == (1, C, 32, 32)
            assert (fa - fb).abs().max().item() <= 1e-4


def test_state_dict_keys_are_vit_keys_under_backbone():
    cfg = _cfg("ade20k_upernet_vit_tiny_cpu.py")
    model = _build(cfg.model)
    keys = set(model.state_dict())
    vit_keys = set(model.backbone.state_dict())
    assert {f"backbone.{k}" for k in vit_keys} <= keys
    assert "backbone.patch_embed.proj.weight" in keys and "backbone.blocks.3.mlp.fc2.bias" in keys
    assert not any(k.startswith("backbone.net.") for k in keys)
    # Feature2Pyramid (mmseg's neck) turns the 4 stride-16 maps into strides 4, 8, 16, 32.
    feats = model.extract_feat(torch.randn(1, 3, 128, 128))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4]


# ------------------------------------------------------------------------------------------ configs
def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


MMSEG_MAE_UPERNET_PARAMS = {"ade20k_upernet_vit_b.py": 163_877_228, "ade20k_upernet_vit_l.py": 441_472_812}


@pytest.mark.parametrize("name", ["ade20k_upernet_vit_b.py", "ade20k_upernet_vit_l.py"])
def test_real_configs_build_and_parameter_counts_match_mmseg_mae(name, capsys):
    """B and L build through MODELS.build and equal, parameter for parameter, the same config with mmseg's
    own `MAE` backbone (mmseg's mae-base_upernet_8xb2-amp-160k_ade20k-512x512: 163,877,228 for B)."""
    cfg = _cfg(name)
    model = _build(cfg.model)
    bb = cfg.model.backbone
    c, depth, heads = bb.embed_dim, bb.depth, bb.num_heads
    ours = {k: tuple(p.shape) for k, p in model.named_parameters()}
    ours_total = _count(model)
    del model

    mm_cfg = copy.deepcopy(cfg.model)
    mm_cfg.backbone = dict(type="MAE", img_size=(512, 512), patch_size=16, embed_dims=c, num_layers=depth,
                           num_heads=heads, mlp_ratio=4, init_values=1.0, drop_path_rate=bb.drop_path_rate,
                           out_indices=list(bb.out_indices), norm_cfg=dict(type="LN", eps=1e-6))
    mm = _build(mm_cfg)
    mm_total = _count(mm)
    assert ours_total == mm_total == MMSEG_MAE_UPERNET_PARAMS[name]
    # the same tensors, not just the same total: every backbone shape matches mmseg's under the importer's names
    mm_shapes = sorted(tuple(p.shape) for k, p in mm.named_parameters() if k.startswith("backbone."))
    assert sorted(s for k, s in ours.items() if k.startswith("backbone.")) == mm_shapes
    with capsys.disabled():
        print(f"\n{name}: {ours_total:,} parameters, = mmseg MAE UperNet")


def test_recipe_values():
    b = _cfg("ade20k_upernet_vit_b.py")
    # MAE paper A.4 / mmseg mae-base_upernet_8xb2-amp-160k_ade20k-512x512
    assert b.model.backbone.type == "MAEViT"
    assert b.custom_imports.imports == ["backbones.mmseg", "mae_transfer.segmentation.checkpoint"]  # adapter, loader
    assert b.model.backbone.out_indices == (3, 5, 7, 11) and b.model.backbone.drop_path_rate == 0.1
    assert b.model.neck == dict(type="Feature2Pyramid", embed_dim=768, rescales=[4, 2, 1, 0.5],
                                norm_cfg=dict(type="SyncBN", requires_grad=True))
    assert b.model.decode_head.type == "UPerHead" and b.model.decode_head.channels == 768
    assert b.model.decode_head.norm_cfg.type == "SyncBN" and b.model.decode_head.num_classes == 150
    aux = b.model.auxiliary_head
    assert aux.type == "FCNHead" and aux.in_index == 2 and aux.loss_decode.loss_weight == 0.4
    assert b.model.test_cfg == dict(mode="slide", crop_size=(512, 512), stride=(341, 341))
    pipe = {t.type: t for t in b.train_pipeline}
    assert pipe["LoadAnnotations"].reduce_zero_label is True
    assert pipe["RandomResize"].scale == (2048, 512) and pipe["RandomResize"].ratio_range == (0.5, 2.0)
    assert pipe["RandomCrop"].crop_size == (512, 512) and pipe["RandomCrop"].cat_max_ratio == 0.75
    assert "RandomFlip" in pipe and "PhotoMetricDistortion" in pipe
    assert b.train_dataloader.dataset.type == "ADE20KDataset" and b.train_dataloader.batch_size * 8 == 16
    assert b.val_evaluator.type == "IoUMetric" and b.val_evaluator.iou_metrics == ["mIoU"]
    ow = b.optim_wrapper
    assert ow.optimizer == dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert ow.constructor == "MaeLayerDecayOptimizerConstructor"
    assert ow.paramwise_cfg == dict(num_layers=12, layer_decay_rate=0.65)
    warm, poly = b.param_scheduler
    assert warm.type == "LinearLR" and warm.end == 1500 and warm.start_factor == 1e-6 and not warm.by_epoch
    assert poly.type == "PolyLR" and (poly.begin, poly.end, poly.power, poly.eta_min) == (1500, 160000, 1.0, 0.0)
    assert b.train_cfg.max_iters == 160000

    large = _cfg("ade20k_upernet_vit_l.py")
    # BEiT-L ADE20K (unilm BEiT / mmseg beit-large_upernet_8xb1-160k_ade20k-640x640), in optimizer steps: BEiT's
    # warmup_iters=3000 counted runner iterations at update_interval 2
    assert large.model.backbone.embed_dim == 1024 and large.model.backbone.depth == 24
    assert large.model.backbone.out_indices == (7, 11, 15, 23) and large.model.backbone.drop_path_rate == 0.2
    assert large.model.decode_head.channels == 1024 and large.model.decode_head.in_channels == [1024] * 4
    assert large.optim_wrapper.optimizer.lr == 2e-5 and large.optim_wrapper.optimizer.weight_decay == 0.05
    assert large.optim_wrapper.paramwise_cfg == dict(num_layers=24, layer_decay_rate=0.95)
    assert large.param_scheduler[0].end == 1500 and large.param_scheduler[1].end == 160000
    assert large.param_scheduler[1].begin == 1500

    tiny = _cfg("ade20k_upernet_vit_tiny_cpu.py")  # same code path: same types, only sizes differ
    for key in ("type", "custom_imports"):
        assert tiny.get(key) == b.get(key)
    assert tiny.model.backbone.type == b.model.backbone.type and tiny.optim_wrapper.constructor == ow.constructor
    assert [t.type for t in tiny.train_pipeline] == [t.type for t in b.train_pipeline]


def test_b_train_step_at_reduced_size_uses_shared_llrd():
    """One real optimisation step of the ViT-B UperNet at 64 px (the optimizer from the config's constructor)."""
    from mmengine.optim import build_optim_wrapper

    cfg = _cfg("ade20k_upernet_vit_b.py")
    cfg.model.data_preprocessor.size = (64, 64)
    model = _build(cfg.model)
    model.init_weights()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    lrs = sorted({group["lr"] for group in optim.optimizer.param_groups})
    assert len(lrs) >= 13 and lrs[-1] == pytest.approx(1e-4)  # one lr per layer: 0.65 ** k * lr
    assert lrs[0] == pytest.approx(1e-4 * 0.65 ** 13, rel=1e-3)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        s = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 150, (1, 64, 64), generator=g)))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    data = dict(inputs=[torch.randint(0, 255, (3, 64, 64), generator=g).float() for _ in range(2)],
                data_samples=samples)
    before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    model.train()
    log = model.train_step(data, optim)
    assert torch.isfinite(log["loss"]) and {"decode.loss_ce", "aux.loss_ce"} <= set(log)
    assert not torch.equal(before, model.backbone.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------------------ init checkpoints
def test_init_checkpoint_formats_and_freeze(tmp_path):
    """An MAE pretraining checkpoint (tools/pretrain.py layout) and a timm checkpoint load with zero
    missing backbone keys through the config's backbone; freeze_blocks freezes through the shared code."""
    import timm

    from mae_transfer.mae import MaskedAutoencoder
    from mae_transfer.pretraining import CHECKPOINT_FORMAT

    cfg = _cfg("ade20k_upernet_vit_tiny_cpu.py")
    mae = MaskedAutoencoder(encoder="vit_tiny_patch16_224", img_size=96, decoder_embed_dim=64, decoder_depth=1,
                            decoder_num_heads=4, encoder_overrides={"depth": 4})
    torch.save({"format": CHECKPOINT_FORMAT, "model": mae.state_dict(), "epoch": 1}, tmp_path / "mae.pth")
    tvit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, num_classes=10)
    torch.save(tvit.state_dict(), tmp_path / "timm.pth")
    for fname, src_block in (("mae.pth", mae.encoder.blocks[2]), ("timm.pth", tvit.blocks[2])):
        mcfg = copy.deepcopy(cfg.model)
        mcfg.backbone.init_checkpoint = str(tmp_path / fname)
        mcfg.backbone.freeze_blocks = 2
        model = _build(mcfg)
        model.init_weights()  # what the Runner does
        report = model.backbone.init_report
        assert report.missing == [], (fname, report.missing)
        assert torch.equal(model.backbone.blocks[2].mlp.fc1.weight, src_block.mlp.fc1.weight)
        assert not model.backbone.blocks[1].attn.qkv.weight.requires_grad
        assert not model.backbone.patch_embed.proj.weight.requires_grad
        assert model.backbone.blocks[2].attn.qkv.weight.requires_grad


# ------------------------------------------------------------------------------------------ CLI on real data
def test_seg_picture_titles_enlarged_panels_and_legend_of_the_classes_shown():
    """A 192 px ground truth | prediction drawing: panels enlarged 3x (nearest) to 576 px under titles, and a legend
    with a swatch of exactly the classes in either map."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    from mae_transfer.segmentation.train import titled_picture

    drawn = np.full((192, 384, 3), 200, dtype=np.uint8)
    drawn[:, 192:] = 60  # the prediction half
    sample = SegDataSample()
    gt, pred = torch.zeros(1, 192, 192, dtype=torch.long), torch.zeros(1, 192, 192, dtype=torch.long)
    gt[0, :50, :50] = 1
    pred[0, 100:, 100:] = 3
    sample.gt_sem_seg, sample.pred_sem_seg = PixelData(data=gt), PixelData(data=pred)
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
    meta = dict(classes=("background", "circle", "square", "triangle"), palette=palette)
    pic = np.asarray(titled_picture(drawn, sample, meta, has_gt=True))
    assert pic.shape[1] == 2 * 576 + 2 * 8 + 16
    body = pic[:, 8:8 + 576]
    rows = np.where((body == 200).all(axis=-1).all(axis=1))[0]  # rows fully inside the ground-truth panel
    assert len(rows) == 576 and (pic[rows[0], 8 + 576 + 16:8 + 2 * 576 + 16] == 60).all()
    legend = pic[rows[-1] + 1:]
    colours = {tuple(c) for c in legend.reshape(-1, 3).tolist()}
    assert {(0, 0, 0), (255, 0, 0), (0, 0, 255)} <= colours and (0, 255, 0) not in colours  # no square anywhere
    assert pic[:rows[0]].min() < 60  # title text


def _run(argv, capsys):
    rc = run_cli(_train_seg().main, [str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.slow
def test_ade20k_sample_eval_only_slide_with_pictures(ade20k_sample, tmp_path, capsys, monkeypatch):
    """The standard ADE20KDataset (reduce_zero_label) on the real sample, slide inference, IoUMetric,
    and colourised ground truth | prediction pictures."""
    from PIL import Image

    cfg = _cfg("ade20k_upernet_vit_tiny_cpu.py")
    model = _build(cfg.model)
    model.init_weights()
    ckpt = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, ckpt)
    calls = []
    real_forward = MAEViT.forward
    monkeypatch.setattr(MAEViT, "forward", lambda self, x: calls.append(tuple(x.shape)) or real_forward(self, x))
    root = ade20k_sample / "ADEChallengeData2016"
    pics = tmp_path / "pics"
    rc, err = _run(["--config", CONFIGS / "ade20k_upernet_vit_tiny_cpu.py", "--output-dir", tmp_path / "work",
                    "--eval-only", ckpt, "--pictures-dir", pics,
                    "--cfg-options", f"test_dataloader.dataset.data_root={root}"], capsys)
    assert rc == 0, err
    # slide: 128-px windows, several per image (the 3 images are resized to a 128-px short side)
    assert calls and all(s[-2:] == (128, 128) for s in calls) and len(calls) > 2 * 3
    logs = "".join(p.read_text() for p in (tmp_path / "work").rglob("*.log"))
    run_dir = next(p for p in (tmp_path / "work").iterdir() if p.is_dir())  # mmengine's <timestamp>/ folder
    assert "ADE20KDataset" in (run_dir / "vis_data" / "config.py").read_text()
    record = read_eval_metrics(tmp_path / "work", "seg")
    metrics = record["metrics"]
    assert 0.0 <= metrics["mIoU"] <= 100.0 and "aAcc" in metrics
    assert record["checkpoint"] == str(ckpt) and record["details"]["split"] == "test"
    # ClassIoUMetric: every class's IoU (null: in neither prediction nor ground truth); mmseg's mIoU is their mean
    per_class = record["details"]["IoU"]
    assert len(per_class) == 150 and "wall" in per_class
    found = [v for v in per_class.values() if v is not None]
    assert found and metrics["mIoU"] == pytest.approx(np.mean(found), abs=0.01)
    assert "mIoU" in logs and "Iter(test) [3/3]" in logs
    files = sorted(pics.glob("*.png"))
    assert [f.stem for f in files] == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    img = Image.open(root / "images" / "validation" / "ADE_val_00000001.jpg")
    pic = np.asarray(Image.open(files[0]).convert("RGB"))
    # ground truth | prediction at image size (512 px short side: not enlarged), margins 8, gap 16, titles, legend
    assert pic.shape[1] == 2 * img.width + 2 * 8 + 16 and pic.shape[0] > img.height + 50
    assert pic.std() > 10


@pytest.mark.slow
def test_resume_continues_exactly(ade20k_sample, tmp_path, capsys, monkeypatch):
    """4 straight iterations == 2, then --resume to 4: the same weights and the same final validation, with drop
    path, dropout and random augmentation on. The straight run loads data in the main process, the resumed run in
    a (persistent) worker process, a second resume in the main process: each sample's augmentation depends on its
    place in the stream only (3 images, batches of 2: the resume starts inside the second pass). The straight run
    validates after the checkpoint at 2 (validation must leave the random states alone); a resume loads only the
    batches it trains on."""
    import shutil

    from mae_transfer.segmentation import resume as mmseg_resume

    root = ade20k_sample / "ADEChallengeData2016"
    config = CONFIGS / "ade20k_upernet_vit_tiny_cpu.py"
    common = ["--cfg-options", *(f"{split}_dataloader.dataset.data_root={root}" for split in ("train", "val", "test")),
              "train_dataloader.batch_size=2", "model.backbone.drop_path_rate=0.2", "train_cfg.val_interval=2",
              "default_hooks.checkpoint.interval=2", "default_hooks.logger.interval=1"]
    # as the full-size configs (persistent); one worker: here each worker's shutdown waits 5 s in torch
    workers = ["train_dataloader.num_workers=1", "train_dataloader.persistent_workers=True"]
    no_validation = ["val_cfg=None", "val_dataloader=None", "val_evaluator=None"]

    def run(name, *extra, resume=False):
        rc, err = _run(["--config", config, "--output-dir", tmp_path / name, *(["--resume"] if resume else []),
                        *common, *extra], capsys)
        assert rc == 0, err

    run("straight", "train_cfg.max_iters=4")
    run("resumed", *no_validation, "train_cfg.max_iters=2")
    shutil.copytree(tmp_path / "resumed", tmp_path / "resumed_in_main")
    first = read_mmengine_checkpoint(tmp_path / "resumed" / "iter_2.pth")  # the safe loader takes the states
    assert first["rng_states"]["torch"].dtype == torch.uint8 and len(first["rng_states"]["python"][1]) == 625
    run("resumed", *workers, "train_cfg.max_iters=4", resume=True)
    loads = []
    real_getitem = mmseg_resume.SeededSamples.__getitem__
    monkeypatch.setattr(mmseg_resume.SeededSamples, "__getitem__", lambda self, item: loads.append(item) or
                        real_getitem(self, item))
    run("resumed_in_main", *no_validation, "train_cfg.max_iters=4", resume=True)
    assert len(loads) == 2 * 2  # iterations 3-4 x batch 2: mmengine's replay of 1-2 loads nothing

    a = read_mmengine_checkpoint(tmp_path / "straight" / "iter_4.pth")
    moved = 0
    for name in ("resumed", "resumed_in_main"):
        b = read_mmengine_checkpoint(tmp_path / name / "iter_4.pth")
        assert a["meta"]["iter"] == b["meta"]["iter"] == 4
        for k, v in a["state_dict"].items():
            assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-6, rtol=0), (name, k)
            moved += not torch.equal(v, first["state_dict"][k])
    assert read_eval_metrics(tmp_path / "resumed", "seg")["metrics"] == \
        read_eval_metrics(tmp_path / "straight", "seg")["metrics"]
    assert moved > 20  # iterations 3-4 really trained
    logs = "".join(p.read_text() for p in (tmp_path / "resumed").rglob("*.log"))
    assert "resumed" in logs.lower()


@pytest.mark.slow
def test_resume_at_the_last_iteration_still_validates(ade20k_sample, tmp_path, capsys):
    """mmengine saves the last checkpoint before the last validation: a run killed between the two resumes
    with nothing to train. train_seg.py must then run the final validation (studies read its mIoU)."""
    import shutil

    from mae_transfer.study.run import read_seg_metrics

    root = ade20k_sample / "ADEChallengeData2016"
    argv = ["--config", CONFIGS / "ade20k_upernet_vit_tiny_cpu.py", "--output-dir", tmp_path / "w", "--cfg-options",
            *(f"{split}_dataloader.dataset.data_root={root}" for split in ("train", "val", "test")),
            "train_dataloader.batch_size=2", "train_cfg.max_iters=2", "train_cfg.val_interval=2",
            "default_hooks.checkpoint.interval=2"]
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    assert read_eval_metrics(tmp_path / "w", "seg")["iteration"] == 2
    for run_dir in [p for p in (tmp_path / "w").iterdir() if p.is_dir()]:
        shutil.rmtree(run_dir)  # as if killed right after iter_2.pth was written: no validation on record
    (tmp_path / "w" / "eval_metrics.json").unlink()
    with pytest.raises(Exception, match="did not finish an evaluation"):
        read_seg_metrics(tmp_path / "w")
    rc, err = _run([*argv[:4], "--resume", *argv[4:]], capsys)
    assert rc == 0, err
    assert 0.0 <= read_seg_metrics(tmp_path / "w")["mIoU"] <= 100.0
    record = read_eval_metrics(tmp_path / "w", "seg")
    assert record["iteration"] == 2 and record["checkpoint"] == str(tmp_path / "w" / "iter_2.pth")


# ------------------------------------------------------------------------------------------ bad input
def test_cli_spellings_and_bare_eval_only(tmp_path, capsys):
    """--config / --output-dir give the run (the removed positional config / --work-dir are usage errors); a bare
    --eval-only evaluates the output folder's last checkpoint (none there: one error line)."""
    tool = _train_seg()
    config = str(CONFIGS / "camvid_upernet_vit_tiny_cpu.py")
    new = tool.parse_args(["--config", config, "--output-dir", "w", "--resume", "--cfg-options", "a=1"])
    for old in ([config, "--output-dir", "w"], ["--config", config, "--work-dir", "w"]):
        with pytest.raises(SystemExit):
            tool.parse_args(old)
    assert "unrecognized arguments" in capsys.readouterr().err
    assert (new.config, new.output_dir, new.resume, new.cfg_options) == (config, "w", "auto", ["a=1"])
    rc, err = _run(["--config", config, "--output-dir", tmp_path / "empty", "--eval-only"], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"error: --eval-only: no checkpoint in {tmp_path / 'empty'} (no last_checkpoint file); pass --eval-only CKPT"]


def test_bad_input_errors(camvid_mini, ade20k_sample, tmp_path, capsys):
    from PIL import Image

    config = CONFIGS / "camvid_upernet_vit_tiny_cpu.py"
    work = ["--output-dir", tmp_path / "w"]
    # unknown config key
    rc, err = _run(["--config", config, *work, "--cfg-options", "model.backbone.embed_dimz=3"], capsys)
    assert rc == 2 and "unknown config key 'model.backbone.embed_dimz'" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():  # mmengine's distributed launch is GPU-only
        rc, err = _run(["--config", config, *work, "--launcher", "pytorch"], capsys)
        assert rc == 2 and "needs CUDA GPUs" in err
    # a value of another type than the config's: named with the key and the type expected
    rc, err = _run(["--config", config, *work, "--cfg-options", "train_cfg.max_iters=abc"], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        "error: --cfg-options train_cfg.max_iters=abc: expected an integer (the config has 300), got a string"]
    from mae_transfer.segmentation.checks import apply_cfg_options

    cfg = _cfg("camvid_upernet_vit_tiny_cpu.py")
    apply_cfg_options(cfg, ["optim_wrapper.optimizer.lr=1", "train_dataloader.dataset.data_prefix.img_path=2017",
                            "val_cfg=None"], str(config))
    assert cfg.optim_wrapper.optimizer.lr == 1.0 and isinstance(cfg.optim_wrapper.optimizer.lr, float)
    assert cfg.train_dataloader.dataset.data_prefix.img_path == "2017" and cfg.val_cfg is None
    # missing data root
    nope = f"train_dataloader.dataset.data_root={tmp_path / 'nope'}"
    rc, err = _run(["--config", config, *work, "--cfg-options", nope], capsys)
    assert rc == 2 and "data root not found" in err and "train_dataloader.dataset.data_root" in err
    # label values outside the 11 classes + ignore 11 (ADE labels read with the CamVid config)
    bad = tmp_path / "bad"
    for sub in ("train", "trainannot", "val", "valannot"):
        (bad / sub).mkdir(parents=True)
    name = sorted(os.listdir(camvid_mini / "train"))[0]
    for img_dir, ann_dir in (("train", "trainannot"), ("val", "valannot")):
        Image.open(camvid_mini / "train" / name).save(bad / img_dir / name)
        label = np.asarray(Image.open(camvid_mini / "trainannot" / name)).copy()
        label[:5, :5] = 40
        Image.fromarray(label).save(bad / ann_dir / name)
    rc, err = _run(["--config", config, *work, "--cfg-options", f"train_dataloader.dataset.data_root={bad}",
                    f"val_dataloader.dataset.data_root={bad}", f"test_dataloader.dataset.data_root={bad}"], capsys)
    assert rc == 2 and "label values [40]" in err and "num_classes=11" in err
    # wrong checkpoints for --eval-only: not a checkpoint, and a checkpoint of another model
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    ev = [*work, "--cfg-options", f"test_dataloader.dataset.data_root={camvid_mini}"]
    rc, err = _run(["--config", config, "--eval-only", junk, *ev], capsys)
    assert rc == 2 and "not a PyTorch checkpoint" in err
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}}, other)
    rc, err = _run(["--config", config, "--eval-only", other, *ev], capsys)
    assert rc == 2 and "does not fit the model" in err
    # a backbone checkpoint of another width fails when the Runner initialises the model
    tv = MAEViT(embed_dim=64, depth=4, num_heads=2, out_indices=(0, 1, 2, 3))
    torch.save(tv.state_dict(), tmp_path / "narrow.pth")
    rc, err = _run(["--config", config, *work, "--init-checkpoint", tmp_path / "narrow.pth",
                    "--cfg-options", f"train_dataloader.dataset.data_root={camvid_mini}",
                    f"val_dataloader.dataset.data_root={camvid_mini}",
                    f"test_dataloader.dataset.data_root={camvid_mini}"], capsys)
    assert rc == 2 and "different architecture" in err


def _seg_data(root, sizes, rng, shape=(24, 32)):
    """A CamVid-layout folder (camvid_upernet_vit_tiny_cpu.py): random RGB images and label maps of the 11
    classes + the ignore index 11; `sizes` = {split: number of images}."""
    from PIL import Image

    for split, count in sizes.items():
        for sub in (split, f"{split}annot"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(root / split / f"f{i:02d}.png")
            Image.fromarray(rng.integers(0, 12, shape, dtype=np.uint8)).save(root / f"{split}annot" / f"f{i:02d}.png")
    return [f"{split}_dataloader.dataset.data_root={root}" for split in ("train", "val", "test")]


def _one_error_line(rc, err):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_every_label_map_checked_once_with_a_cache(tmp_path, capsys, monkeypatch):
    """A bad label value in the 23rd label map and a label map of another size than its image are errors naming
    the file before training starts; the facts read are cached, so a second check reads only what changed."""
    from PIL import Image

    from mae_transfer.segmentation import checks as seg_checks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    roots = _seg_data(data, {"train": 24, "val": 2}, np.random.default_rng(0))
    config = CONFIGS / "camvid_upernet_vit_tiny_cpu.py"
    argv = ["--config", config, "--output-dir", tmp_path / "w", "--cfg-options", *roots]
    label = data / "trainannot" / "f22.png"
    bad = np.asarray(Image.open(label)).copy()
    bad[3, 4] = 50
    Image.fromarray(bad).save(label)
    line = _one_error_line(*_run(argv, capsys))
    assert f"label values [50] in {label} " in line and "num_classes=11" in line
    assert "1 of 24 label maps of train_dataloader" in line
    assert not (tmp_path / "w" / "eval_metrics.json").exists() and not list((tmp_path / "w").glob("*.pth"))

    Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(data / "valannot" / "f01.png")
    bad[3, 4] = 11  # the ignore index
    Image.fromarray(bad).save(label)
    reads = []
    real_read = seg_checks.read_label_facts
    monkeypatch.setattr(seg_checks, "read_label_facts", lambda path: reads.append(path) or real_read(path))
    line = _one_error_line(*_run(argv, capsys))
    assert line == (f"error: 1 of 2 label maps of val_dataloader differ in size from their images, e.g. "
                    f"{data / 'valannot' / 'f01.png'} is 40x30, its image {data / 'val' / 'f01.png'} 32x24; "
                    "a label map must have its image's size")
    # the 23 unchanged training label maps came from the cache; the validation set was not reached before
    assert sorted(reads) == [str(label), *(str(data / "valannot" / f"f0{i}.png") for i in (0, 1))]
    assert len(list((tmp_path / "cache" / "mae_transfer" / "seg_data").glob("*.json"))) == 2  # train, val folders


def test_unreadable_images_skipped_in_training_errors_elsewhere(tmp_path, capsys, caplog, monkeypatch):
    """A truncated training image is skipped with one counted warning and the dataset the Runner builds leaves it
    out; more than half unreadable, or one in the validation set, is an error."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    from mae_transfer.segmentation import checks as seg_checks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    roots = _seg_data(data, {"train": 4, "val": 2}, np.random.default_rng(1))

    def truncate(path):
        path.write_bytes(path.read_bytes()[:200])

    truncate(data / "train" / "f02.png")
    cfg = _cfg("camvid_upernet_vit_tiny_cpu.py")
    seg_checks.apply_cfg_options(cfg, roots, "camvid")
    with caplog.at_level("WARNING", logger="mae_transfer.segmentation"):
        seg_checks.check_data(cfg, ["train_dataloader", "val_dataloader"])
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"1 of 4 images of train_dataloader (or their label maps) cannot be read, e.g. "
                              f"{data / 'train' / 'f02.png'} (")
    assert cfg.train_dataloader.dataset.indices == [0, 1, 3]
    init_default_scope("mmseg")
    dataset = DATASETS.build(cfg.train_dataloader.dataset)  # as the Runner builds it
    names = [Path(dataset.get_data_info(i)["img_path"]).name for i in range(len(dataset))]
    assert names == ["f00.png", "f01.png", "f03.png"]

    config = CONFIGS / "camvid_upernet_vit_tiny_cpu.py"
    argv = ["--config", config, "--output-dir", tmp_path / "w", "--cfg-options", *roots]
    truncate(data / "val" / "f01.png")
    line = _one_error_line(*_run(argv, capsys))
    assert "1 of 2 images of val_dataloader" in line and str(data / "val" / "f01.png") in line
    for name in ("f00.png", "f01.png"):
        truncate(data / "train" / name)
    line = _one_error_line(*_run(argv, capsys))
    assert "3 of 4 images of train_dataloader" in line and "more than half" in line
    assert not (tmp_path / "w" / "eval_metrics.json").exists()


def test_nonfinite_loss_stops_training_keeping_the_last_good_checkpoint(camvid_mini, tmp_path, capsys):
    """A diverging lr (1e30): iteration 1's loss is finite, its step sends the weights to inf, iteration 2's loss is
    not finite. Training stops there with one error line naming the iteration and the last good checkpoint, as
    det / pretrain / cls do; the checkpoint of iteration 2 (interval 1) is not written, last_checkpoint still
    names iter_1.pth, and no eval_metrics.json is written (before: mIoU of the diverged model, exit 0)."""
    from mae_transfer.segmentation.checks import last_checkpoint

    out = tmp_path / "w"
    roots = [f"{split}_dataloader.dataset.data_root={camvid_mini}" for split in ("train", "val", "test")]
    rc, err = _run(["--config", CONFIGS / "camvid_upernet_vit_tiny_cpu.py", "--output-dir", out, "--cfg-options",
                    *roots, "train_dataloader.batch_size=2", "optim_wrapper.optimizer.lr=1e30",
                    "train_cfg.max_iters=4", "train_cfg.val_interval=4", "default_hooks.checkpoint.interval=1"],
                   capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: training stopped: non-finite loss at iteration 2 (loss "), line
    assert line.endswith(f"; last good checkpoint: {out / 'iter_1.pth'}. Lower optim_wrapper.optimizer.lr or set "
                         "optim_wrapper.clip_grad (e.g. dict(max_norm=1.0)), then --resume."), line
    assert last_checkpoint(out) == str(out / "iter_1.pth")
    assert sorted(p.name for p in out.glob("*.pth")) == ["iter_1.pth"]
    assert not (out / "eval_metrics.json").exists()


def test_class_iou_metric_against_numpy_iou_per_class():
    """ClassIoUMetric's `IoU.<class>` = |pred == c and label == c| / |pred == c or label == c| over all images
    (ignored pixels left out), computed here with numpy; a class in neither is NaN; mmseg's own keys stay."""
    from mae_transfer.segmentation.train import ClassIoUMetric

    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 3, (6, 7)) for _ in range(3)]  # class 3 never occurs
    preds = [np.where(rng.random(lab.shape) < 0.7, lab, rng.integers(0, 3, lab.shape)) for lab in labels]
    labels[0][0, :] = 255  # ignored
    metric = ClassIoUMetric(ignore_index=255)
    metric.dataset_meta = dict(classes=("a", "b", "c", "d"))
    results = [metric.intersect_and_union(torch.from_numpy(p), torch.from_numpy(lab), 4, 255)
               for p, lab in zip(preds, labels, strict=True)]
    metrics = metric.compute_metrics(results)
    keep = [lab != 255 for lab in labels]
    for c, name in enumerate("abc"):
        inter = sum(((p == c) & (lab == c) & k).sum() for p, lab, k in zip(preds, labels, keep, strict=True))
        union = sum((((p == c) | (lab == c)) & k).sum() for p, lab, k in zip(preds, labels, keep, strict=True))
        assert metrics[f"IoU.{name}"] == pytest.approx(100 * inter / union, abs=0.006)
    assert np.isnan(metrics["IoU.d"]) and {"aAcc", "mIoU", "mAcc"} <= set(metrics)
    assert metrics["mIoU"] == pytest.approx(np.mean([metrics[f"IoU.{n}"] for n in "abc"]), abs=0.01)
