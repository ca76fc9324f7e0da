"""detectron2 adapter: parity with detectron2's own ViTDet ViT + SimpleFeaturePyramid, the LazyConfigs
(instantiation, parameter counts vs detectron2's own ViTDet model, recipe values), and tools/train_det.py
(mae_transfer/detection/train.py) on real data (fruits_nuts training, coco_tiny COCOEvaluator, resume, checkpoint
import, gradient clipping, bad input)."""
from __future__ import annotations

import importlib.util
import json
import logging
from functools import partial
from pathlib import Path

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import SimpleFeaturePyramid, ViT
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from backbones.detectron2 import ViTBackbone, add_mae_vit_config, build_vit_sfp
from mae_transfer.cli import run_cli
from mae_transfer.detection import checks as det_checks
from mae_transfer.detection import pictures as detection_pictures
from mae_transfer.detection import train as detection
from mae_transfer.errors import MaeTransferError
from mae_transfer.metrics import read_eval_metrics
from tests.conftest import no_init

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# Small ViT for the parity checks: window 14 in blocks 0 and 2, global blocks 1 and 3, rel-pos.
E, DEPTH, HEADS, GLOBAL = 64, 4, 2, (1, 3)


def _train_det():
    spec = importlib.util.spec_from_file_location("train_det", REPO / "tools" / "train_det.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_det = _train_det()


def _pair(img_size: int = 1024) -> tuple[ViT, ViTBackbone]:
    """detectron2's ViT and ours, same architecture; every reference parameter randomised, then copied."""
    torch.manual_seed(0)
    ref = ViT(img_size=img_size, patch_size=16, embed_dim=E, depth=DEPTH, num_heads=HEADS, window_size=14,
              window_block_indexes=[i for i in range(DEPTH) if i not in GLOBAL], use_rel_pos=True,
              rel_pos_zero_init=False, norm_layer=partial(nn.LayerNorm, eps=1e-6), pretrain_img_size=224)
    ours = ViTBackbone(embed_dim=E, depth=DEPTH, num_heads=HEADS, window_size=14, global_block_indexes=GLOBAL,
                       rel_pos_input_size=img_size, img_size=224)
    return ref, ours


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_pyramid_matches_detectron2_vit_sfp_1024():
    ref_net, our_net = _pair(1024)
    # 64 pyramid channels instead of 256: same code, 16x cheaper stride-4 convolutions on CPU.
    ref = SimpleFeaturePyramid(ref_net, "last_feat", 64, (4.0, 2.0, 1.0, 0.5), LastLevelMaxPool(), "LN", 1024)
    ours = build_vit_sfp(our_net, out_channels=64)
    _perturb(ref)  # LN / rel-pos / pyramid params away from their trivial init
    # Parameter names line up with detectron2's ViTDet (only our unused, frozen cls token is extra).
    assert set(ours.state_dict()) - set(ref.state_dict()) == {"net.cls_token"}
    assert set(ref.state_dict()) <= set(ours.state_dict())
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert result.missing_keys == ["net.cls_token"] and not result.unexpected_keys
    assert ours.output_shape().keys() == ref.output_shape().keys()
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert list(a) == ["p2", "p3", "p4", "p5", "p6"] == list(b)
    for k in a:
        assert a[k].shape == b[k].shape
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= 1e-4, (k, diff)


@pytest.mark.parametrize("img_size", [320, 512])
def test_vit_blocks_match_detectron2_vit_block_by_block(img_size, monkeypatch):
    """Issue 4 acceptance: window partition (with padding: 20x20 grid, window 14), global blocks and
    decomposed rel-pos equal detectron2's ViT block by block (outputs, input and rel-pos gradients).
    At 512 px (32x32 = 1024 tokens) the global blocks take the chunked CPU attention, here in 4 chunks."""
    import backbones.kernels as kernels

    monkeypatch.setattr(kernels, "CHUNK_QUERIES", 256)
    ref, ours = _pair(img_size)
    _perturb(ref)
    ours.load_state_dict(ref.state_dict(), strict=False)
    grid = img_size // 16
    chunked = []
    real_apply = kernels.ChunkedRelPosAttention.apply
    monkeypatch.setattr(kernels.ChunkedRelPosAttention, "apply", lambda *a: chunked.append(1) or real_apply(*a))
    img = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        x_ref = ref.patch_embed(img)
        from detectron2.modeling.backbone.utils import get_abs_pos

        x_ref = x_ref + get_abs_pos(ref.pos_embed, True, (x_ref.shape[1], x_ref.shape[2]))
        x_ours = ours.patch_embed(img)
        x_ours = x_ours + ours.abs_pos((grid, grid))
    assert (x_ref - x_ours).abs().max() <= 1e-6
    x = x_ref
    for i, (rb, ob) in enumerate(zip(ref.blocks, ours.blocks, strict=True)):
        assert (rb.window_size, ob.window_size) == ((0, 0) if i in GLOBAL else (14, 14))
        xi = x.clone().requires_grad_(True)
        yi = x.clone().requires_grad_(True)
        out_ref, out_ours = rb(xi), ob(yi)
        assert (out_ref - out_ours).abs().max() <= 1e-5, i
        g = torch.randn_like(out_ref)
        out_ref.backward(g)
        out_ours.backward(g)
        assert (xi.grad - yi.grad).abs().max() <= 1e-4, i
        for name in ("rel_pos_h", "rel_pos_w"):
            ga, gb = getattr(rb.attn, name).grad, getattr(ob.attn, name).grad
            assert (ga - gb).abs().max() <= 1e-4 * max(1.0, ga.abs().max().item()), (i, name)
        x = out_ref.detach()
    assert len(chunked) == (len(GLOBAL) if grid * grid >= kernels.CHUNKED_ATTENTION_MIN_TOKENS else 0)
    with torch.no_grad():
        assert (ours(img)["last_feat"] - ref(img)["last_feat"]).abs().max() <= 1e-5


def test_abs_pos_resize_equals_detectron2_get_abs_pos_at_1024():
    """ViTDet keeps the 224 table with its cls row and resizes it at forward time (`get_abs_pos`, plain bicubic):
    ours equals it exactly, at run time (img_size 224, as the configs) and resized at import (built for 1024)."""
    from detectron2.modeling.backbone.utils import get_abs_pos

    from mae_transfer.checkpoint import load_backbone

    torch.manual_seed(0)
    arch = dict(embed_dim=32, depth=1, num_heads=2, window_size=0, use_rel_pos=False)
    run_time = ViTBackbone(img_size=224, **arch)
    with torch.no_grad():
        expect = get_abs_pos(run_time.pos_embed, True, (64, 64))
        assert torch.equal(run_time.abs_pos((64, 64)), expect)
        at_import = ViTBackbone(img_size=1024, **arch)
        load_backbone({"model": {"backbone.net." + k: v for k, v in run_time.state_dict().items()}}, at_import)
        assert torch.equal(at_import.pos_embed[:, 1:].reshape(1, 64, 64, 32), expect)
        assert torch.equal(at_import.pos_embed[:, :1], run_time.pos_embed[:, :1])


def test_init_checkpoint_from_converter_loads_into_detectron2_vit_with_no_skipped_key(tmp_path):
    """README's `convert_checkpoint.py --to detectron2` (tiny width and depth): detectron2's own ViTDet `ViT`
    (pretrain_img_size 224 with cls row, windows, rel-pos) loads the file through DetectionCheckpointer without
    skipping, missing or ignoring a key, and its outputs equal our backbone's loaded from the same file."""
    import timm

    from mae_transfer.detection.checkpoint import detection_checkpointer

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)  # 192 wide, 3 heads
    _perturb(src)
    torch.save({"model": src.state_dict()}, tmp_path / "pretrain.pth")
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dst = tmp_path / "vit_d2.pth"
    assert run_cli(tool.main, [str(tmp_path / "pretrain.pth"), str(dst), "--to", "detectron2",
                               "--model", "vit_tiny_patch16_224", "--depth", "2", "--window-size", "14",
                               "--global-blocks", "1", "--use-rel-pos", "--rel-pos-input-size", "256"]) == 0

    def with_backbone_net(net: nn.Module) -> nn.Module:  # the `backbone.net.` nesting of a ViTDet model
        model = nn.Module()
        model.backbone = nn.Module()
        model.backbone.net = net
        return model

    ref = ViT(img_size=256, patch_size=16, embed_dim=192, depth=2, num_heads=3, window_size=14,
              window_block_indexes=[0], use_rel_pos=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
              pretrain_img_size=224, pretrain_use_cls_token=True)
    checkpointer = detection_checkpointer(with_backbone_net(ref))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    checkpointer.logger.addHandler(handler)
    try:
        checkpointer.load(str(dst))
    finally:
        checkpointer.logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []  # no "Skip loading parameter", missing or unused key
    assert torch.equal(ref.pos_embed, src.pos_embed)  # the 224 table, cls row included, as it was

    ours = ViTBackbone(embed_dim=192, depth=2, num_heads=3, window_size=14, global_block_indexes=(1,),
                       rel_pos_input_size=256, img_size=224)
    detection_checkpointer(with_backbone_net(ours)).load(str(dst))  # as train_det loads a detectron2 file
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        diff = (ours(x)["last_feat"] - ref(x)["last_feat"]).abs().max().item()
    assert diff <= 1e-5


def test_yacs_registry_builds_the_same_pyramid():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    add_mae_vit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_mae_vit_backbone"
    cfg.MODEL.MAE_VIT.NAME = "vit_tiny_patch16_224"
    cfg.MODEL.MAE_VIT.IMG_SIZE = cfg.MODEL.MAE_VIT.SQUARE_PAD = 256
    cfg.MODEL.MAE_VIT.WINDOW_SIZE = 8
    cfg.MODEL.MAE_VIT.FREEZE_BLOCKS = 2
    backbone = build_backbone(cfg)
    names = dict(backbone.named_parameters())
    assert "net.blocks.11.attn.rel_pos_h" in names and "simfp_2.4.norm.weight" in names
    assert not names["net.blocks.1.mlp.fc1.weight"].requires_grad and names["net.blocks.2.mlp.fc1.weight"].requires_grad
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 256, 256))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 256, 64, 64), "p3": (1, 256, 32, 32), "p4": (1, 256, 16, 16), "p5": (1, 256, 8, 8),
        "p6": (1, 256, 4, 4)}


# ------------------------------------------------------------------------------------------- configs
def _d2_vitdet_model_cfg(size: str):
    """detectron2's own ViTDet Mask R-CNN config (model zoo), with its published L overrides."""
    model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
    if size == "l":
        net = model.backbone.net
        net.embed_dim, net.depth, net.num_heads, net.drop_path_rate = 1024, 24, 16, 0.4
        net.window_block_indexes = list(range(0, 5)) + list(range(6, 11)) + list(range(12, 17)) + list(range(18, 23))
    return model


def _count(model: nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


@pytest.mark.parametrize("size,embed,expected_m", [("b", 768, (105, 115)), ("l", 1024, (325, 345))])
def test_configs_instantiate_with_vitdet_parameter_counts(size, embed, expected_m):
    cfg = LazyConfig.load(str(CONFIGS / f"coco_mask_rcnn_vit_{size}.py"))
    with no_init():  # counts only: skip the (slow on CPU) random initialisation
        ours = instantiate(cfg.model)
        ref = instantiate(_d2_vitdet_model_cfg(size))
    (n_ours, t_ours), (n_ref, t_ref) = _count(ours), _count(ref)
    logging.getLogger(__name__).info("ViTDet-%s Mask R-CNN: ours %d params, detectron2 %d", size.upper(), n_ours, n_ref)
    print(f"ViTDet-{size.upper()} Mask R-CNN parameters: ours {n_ours:,} (trainable {t_ours:,}), detectron2 {n_ref:,}")
    assert n_ours - n_ref == embed  # the only difference: our (frozen, unused) cls token
    assert t_ours == t_ref == n_ref
    assert expected_m[0] * 1e6 < n_ours < expected_m[1] * 1e6
    ours_names = {n for n, _ in ours.named_parameters()} - {"backbone.net.cls_token"}
    assert ours_names == {n for n, _ in ref.named_parameters()}


def test_recipe_values_match_vitdet():
    b = LazyConfig.load(str(CONFIGS / "coco_mask_rcnn_vit_b.py"))
    large = LazyConfig.load(str(CONFIGS / "coco_mask_rcnn_vit_l.py"))
    h = LazyConfig.load(str(CONFIGS / "coco_mask_rcnn_vit_h.py"))
    for cfg, (embed, depth, heads, dp, glob, decay) in (
        (b, (768, 12, 12, 0.1, [2, 5, 8, 11], 0.7)),
        (large, (1024, 24, 16, 0.4, [5, 11, 17, 23], 0.8)),
        (h, (1280, 32, 16, 0.5, [7, 15, 23, 31], 0.9)),
    ):
        net = cfg.model.backbone.net
        assert (net.embed_dim, net.depth, net.num_heads, net.patch_size) == (embed, depth, heads, 16)
        assert net.drop_path_rate == dp and list(net.global_block_indexes) == glob
        assert net.window_size == 14 and net.use_rel_pos and net.rel_pos_input_size == 1024 and net.img_size == 224
        f = cfg.optimizer.params.lr_factor_func
        assert f.keywords == {"num_layers": depth, "layer_decay": decay, "backbone_prefix": "backbone.net."}
        # multipliers as detectron2's get_vit_lr_decay_rate: embeddings decay^(L+1), block i decay^(L-i), heads 1
        assert f("backbone.net.patch_embed.proj.weight") == pytest.approx(decay ** (depth + 1))
        assert f("backbone.net.blocks.0.attn.qkv.weight") == pytest.approx(decay ** depth)
        assert f(f"backbone.net.blocks.{depth - 1}.mlp.fc2.bias") == pytest.approx(decay)
        assert f("roi_heads.box_head.conv1.weight") == 1.0
        sfp = cfg.model.backbone
        assert (sfp.out_channels, tuple(sfp.scale_factors), sfp.norm, sfp.square_pad) == (
            256, (4.0, 2.0, 1.0, 0.5), "LN", 1024)
        rh = cfg.model.roi_heads
        assert rh.box_head.conv_norm == rh.mask_head.conv_norm == "LN"
        assert list(rh.box_head.conv_dims) == [256] * 4 and list(rh.box_head.fc_dims) == [1024]
        assert list(cfg.model.proposal_generator.head.conv_dims) == [-1, -1]
        assert cfg.model.input_format == "RGB"
        opt = cfg.optimizer
        assert opt._target_ is torch.optim.AdamW
        assert (opt.lr, tuple(opt.betas), opt.weight_decay) == (1e-4, (0.9, 0.999), 0.1)
        assert cfg.train.amp.enabled
        aug = cfg.dataloader.train.mapper.augmentations
        assert (aug[1].min_scale, aug[1].max_scale, aug[1].target_height, aug[1].target_width) == (0.1, 2.0, 1024, 1024)
        assert tuple(aug[2].crop_size) == (1024, 1024) and cfg.dataloader.train.total_batch_size == 64
        assert cfg.dataloader.test.mapper.augmentations[0].short_edge_length == 1024
        assert "mae_pretrain_vit_" in cfg.train.init_checkpoint
        sched = cfg.lr_multiplier
        assert sched.warmup_length * 184375 == pytest.approx(250) and sched.warmup_factor == 0.001
        assert list(sched.scheduler["values"]) == [1.0, 0.1, 0.01]
    for cfg in (b, large):  # 100 epochs at batch 64
        assert cfg.train.max_iter == 184375 and list(cfg.lr_multiplier.scheduler.milestones) == [163889, 177546]
        assert cfg.optimizer.params.overrides == {"pos_embed": {"weight_decay": 0.0}}
    assert h.train.max_iter == 184375 * 3 // 4  # ViTDet-H: 75 epochs
    assert list(h.lr_multiplier.scheduler.milestones) == [163889 * 3 // 4, 177546 * 3 // 4]


def test_vit_b_config_forward_backward_cpu_128():
    cfg = LazyConfig.load(str(CONFIGS / "coco_mask_rcnn_vit_b.py"))
    cfg.model.backbone.square_pad = 128  # reduced resolution (CPU); everything else as configured
    cfg.model.roi_heads.batch_size_per_image = 32
    cfg.model.proposal_generator.post_nms_topk = (100, 100)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    from detectron2.structures import Boxes, Instances, PolygonMasks
    from detectron2.utils.events import EventStorage

    inst = Instances((128, 128))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 15.0, 60.0, 70.0]]))
    inst.gt_classes = torch.tensor([5])
    inst.gt_masks = PolygonMasks([[[10.0, 15.0, 60.0, 15.0, 60.0, 70.0, 10.0, 70.0]]])
    with EventStorage(0):
        losses = model([{"image": torch.randint(0, 255, (3, 128, 128)).float(), "instances": inst}])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    net = model.backbone.net
    assert net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and net.patch_embed.proj.weight.grad is not None
    assert net.blocks[2].attn.rel_pos_h.grad.abs().sum() > 0  # a global block's rel-pos table is trained
    assert net.cls_token.grad is None


# ------------------------------------------------------------------------------------------- tools/train_det.py
TINY = str(CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py")


def _data_args(root: Path, json_name: str = "trainval.json", images: str = "images") -> list[str]:
    j, im = str(root / json_name), str(root / images)
    return ["--train-json", j, "--train-images", im, "--val-json", j, "--val-images", im]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]


def _subset_json(fruits_nuts: Path, dst: Path, n: int) -> Path:
    """The first n fruits_nuts photos and their annotations."""
    data = json.loads((fruits_nuts / "trainval.json").read_text())
    data["images"] = data["images"][:n]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in {im["id"] for im in data["images"]}]
    dst.write_text(json.dumps(data))
    return dst


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_tiny_config_trains_on_fruits_nuts_then_resumes(fruits_nuts, tmp_path, capsys):
    """Real data, one run reused for: loss falls; TensorBoard + checkpoints written; --resume after an
    interruption continues exactly (the final weights and evaluation of the uninterrupted run, with 0 and with 2
    DataLoader workers); a non-finite loss stops with one clear line and the last good checkpoint stays; --infer
    saves a picture."""
    out = tmp_path / "run"
    images = str(fruits_nuts / "images")
    one = _subset_json(fruits_nuts, tmp_path / "one.json", 1)  # the evaluation at the end: one photo
    common = ["--config", TINY, "--train-json", str(fruits_nuts / "trainval.json"), "--train-images", images,
              "--val-json", str(one), "--val-images", images, f"train.output_dir={out}", "train.eval_period=6",
              "model.roi_heads.box_predictor.test_topk_per_image=10", "train.log_period=1",
              "train.checkpointer.period=2", "train.seed=0", "optimizer.lr=0.0005"]
    assert run_cli(train_det.main, [*common, "train.max_iter=6"]) == 0
    uninterrupted = _weights(out / "model_final.pth")
    evaluated = read_eval_metrics(out, "det")
    rows = [m for m in _metrics(out) if "total_loss" in m]  # detectron2 logs running medians
    assert [r["iteration"] for r in rows] == list(range(6))
    # Medians lag: the total falls a little within 6 iterations, the classification losses clearly.
    assert rows[-1]["total_loss"] < rows[0]["total_loss"], [r["total_loss"] for r in rows]
    assert rows[-1]["loss_cls"] < 0.8 * rows[0]["loss_cls"], [r["loss_cls"] for r in rows]
    assert rows[-1]["loss_rpn_cls"] < rows[0]["loss_rpn_cls"], [r["loss_rpn_cls"] for r in rows]
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth"} <= {p.name for p in out.iterdir()}

    # Killed after the checkpoint of iteration 3 (later checkpoints gone): --resume continues at iteration 4 and
    # ends exactly as the uninterrupted run, even with the data now made by 2 DataLoader workers instead of the
    # main process (test_resumable_train_loader_continues_exactly covers each worker count on its own).
    (out / "model_final.pth").unlink()
    (out / "model_0000005.pth").unlink(missing_ok=True)
    (out / "eval_metrics.json").unlink()
    (out / "last_checkpoint").write_text("model_0000003.pth")
    before = len(_metrics(out))
    assert run_cli(train_det.main, [*common, "train.max_iter=6", "--resume", "dataloader.train.num_workers=2"]) == 0
    assert [m["iteration"] for m in _metrics(out)[before:] if "total_loss" in m] == [4, 5]
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 5
    assert _max_difference(_weights(out / "model_final.pth"), uninterrupted) <= 1e-6
    resumed = read_eval_metrics(out, "det")
    assert resumed["details"] == evaluated["details"] and resumed["metrics"] == evaluated["metrics"]

    # --eval-only CKPT evaluates that checkpoint (on 2 of the photos), recorded in eval_metrics.json.
    two = _subset_json(fruits_nuts, tmp_path / "two.json", 2)
    assert run_cli(train_det.main, ["--config", TINY, "--output-dir", str(out), "--eval-only",
                                    str(out / "model_0000003.pth"), "--val-json", str(two),
                                    "--val-images", str(fruits_nuts / "images")]) == 0
    record = read_eval_metrics(out, "det")
    assert record["checkpoint"] == str(out / "model_0000003.pth") and record["iteration"] == 4
    assert 0.0 <= record["metrics"]["AP_box"] <= 100.0 and "AP50" in record["details"]["bbox"]

    # A non-finite loss stops with one clear line; the last good checkpoint stays.
    capsys.readouterr()
    nan_run = [*common, "train.max_iter=9", "--resume", "model.pixel_std=[0.0,0.0,0.0]"]
    assert run_cli(train_det.main, nan_run) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training stopped: non-finite loss") and "model_final.pth" in err, err
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 5

    # Inference mode: the --val-json ground truth beside the prediction of the trained weights, under titles.
    vis = tmp_path / "vis"
    image = fruits_nuts / "images" / "0.jpg"
    assert run_cli(train_det.main, ["--config", TINY, *_data_args(fruits_nuts), f"train.output_dir={out}",
                                    "--infer", str(image), "--pictures-dir", str(vis), "--score-thresh", "0.0"]) == 0
    from PIL import Image

    (w, h), (pw, ph) = Image.open(image).size, Image.open(vis / "0_pred.png").size
    assert pw > 2 * w and h < ph < h + 100  # two panels (800 x 600 photos are drawn at their size) + titles


def test_resumable_train_loader_continues_exactly():
    """The loader's stream is detectron2 TrainingSampler's; after any batch, a new loader given its state yields
    the batches the first one would have, items waiting in an aspect-ratio bucket included, with random
    augmentations equal whether 0 or 2 workers make them."""
    import itertools
    import random

    import numpy as np
    from detectron2.data.samplers import TrainingSampler

    from mae_transfer.detection.resume import ResumableTrainLoader, training_indices

    stream = list(itertools.islice(iter(TrainingSampler(7, seed=3)), 40))
    for start in (0, 5, 7, 23):  # inside the first epoch, at and after epoch boundaries
        assert list(itertools.islice(training_indices(7, 3, start), 40 - start)) == stream[start:]

    records = [dict(i=i, width=5 if i % 3 == 0 else 10, height=8) for i in range(7)]  # portrait / landscape

    def augment(record):
        return dict(record, draws=(random.random(), float(np.random.rand()), float(torch.rand(1))))

    def batches(loader, n):
        it = iter(loader)
        return [next(it) for _ in range(n)]

    by_workers = {}
    for workers in (0, 2):
        uninterrupted = batches(ResumableTrainLoader(records, augment, 2, seed=3, num_workers=workers), 8)
        first = ResumableTrainLoader(records, augment, 2, seed=3, num_workers=workers)
        done = batches(first, 3)
        state = first.state_dict()
        assert state["position"] == 7 and sum(map(len, state["buckets"])) == 1  # one portrait image waiting
        resumed = ResumableTrainLoader(records, augment, 2, seed=3, num_workers=workers)
        resumed.load_state_dict(state)
        assert done + batches(resumed, 5) == uninterrupted, workers
        by_workers[workers] = uninterrupted
    assert by_workers[0] == by_workers[2]
    assert all(len({d["width"] > d["height"] for d in batch}) == 1 for batch in by_workers[0])  # grouped
    assert [d["i"] for d in by_workers[0][0]] == [i for i in stream if records[i]["width"] > 8][:2]


def test_infer_picture_ground_truth_beside_top_detections_after_class_agnostic_nms():
    """A 192 px image: the picture is ground truth | prediction at 512 px per panel; of two boxes on one object
    (different classes) only the better is shown, detections under the score floor are not, top_k limits."""
    import numpy as np
    from detectron2.data.catalog import Metadata
    from detectron2.structures import Boxes, BoxMode, Instances

    boxes = [[10, 10, 100, 100], [12, 12, 100, 100], [120, 120, 180, 180], [130, 10, 180, 60]]
    inst = Instances((192, 192), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                     scores=torch.tensor([0.9, 0.8, 0.5, 0.1]), pred_classes=torch.tensor([0, 1, 1, 0]))
    masks = torch.zeros(4, 192, 192, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    inst.pred_masks = masks
    shown = detection_pictures.display_detections(inst, score_thresh=0.2, top_k=5)
    assert shown.scores.tolist() == pytest.approx([0.9, 0.5])  # the 0.8 box is the same object; 0.1 < floor
    assert detection_pictures.display_detections(inst, 0.2, 1).scores.tolist() == pytest.approx([0.9])
    assert len(detection_pictures.display_detections(inst, 0.0, 0)) == 3  # 0: no limit
    assert detection_pictures.prediction_title(inst, shown, 0.2, 5) == ("prediction (top 5 after class-agnostic NMS, "
                                                               "score >= 0.2): 2 of 4 shown")
    none = detection_pictures.display_detections(inst, 0.95, 5)
    assert detection_pictures.prediction_title(inst, none, 0.95, 5).endswith("0 of 4 shown; best score 0.90")

    rgb = np.full((192, 192, 3), 100, dtype=np.uint8)
    record = {"annotations": [{"bbox": [10, 10, 90, 90], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                               "segmentation": [[10, 10, 100, 10, 100, 100, 10, 100]]}]}
    meta = Metadata(name="unit", thing_classes=["circle", "triangle"])
    picture = np.asarray(detection_pictures.prediction_picture(rgb, inst, meta, record, 0.2, 5))
    side, margin, gap = 512, 8, 16
    assert picture.shape[1] == 2 * side + gap + 2 * margin and picture.shape[0] > side + 30  # + the titles
    top = picture.shape[0] - margin - side
    left = picture[top:top + side, margin:margin + side]
    right = picture[top:top + side, margin + side + gap:margin + 2 * side + gap]
    scale = side / 192
    inside = lambda panel, x0, y0, x1, y1: panel[int(y0 * scale) + 12:int(y1 * scale) - 12,  # noqa: E731
                                                 int(x0 * scale) + 12:int(x1 * scale) - 12]
    assert (inside(left, 120, 140, 180, 180) == 100).all()  # no ground truth there ...
    assert (inside(right, 120, 140, 180, 180) != 100).any(axis=-1).mean() > 0.9  # ... a predicted mask
    assert (inside(right, 130, 10, 180, 60) == 100).all()  # under the score floor: not drawn
    assert (inside(left, 10, 40, 100, 100) != 100).any(axis=-1).mean() > 0.9  # the ground-truth mask
    assert picture[:top].min() < 50  # title text

    alone = np.asarray(detection_pictures.prediction_picture(rgb, inst, meta, None, 0.2, 5))
    assert alone.shape[1] == side + 2 * margin  # no ground truth: the prediction alone


def _coco_tiny_subset(coco_tiny: Path, dst: Path, n: int = 3) -> Path:
    """A few coco_tiny images (one with a crowd RLE annotation), all 80 categories kept."""
    data = json.loads((coco_tiny / "annotations" / "instances_train2017.json").read_text())
    crowd = {a["image_id"] for a in data["annotations"] if a.get("iscrowd")}
    ids = sorted(crowd)[:1] + [im["id"] for im in data["images"] if im["id"] not in crowd][: n - 1]
    data["images"] = [im for im in data["images"] if im["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    assert len(data["categories"]) == 80 and any(a.get("iscrowd") for a in data["annotations"])
    path = dst / "subset.json"
    path.write_text(json.dumps(data))
    return path


def test_eval_only_coco_tiny_runs_coco_evaluator(coco_tiny, tmp_path):
    sub = _coco_tiny_subset(coco_tiny, tmp_path)
    out = tmp_path / "eval"
    untrained = _untrained_detector(tmp_path / "untrained.pth", 80)
    argv = ["--config", TINY, "--eval-only", str(untrained), "--val-json", str(sub), "--val-images",
            str(coco_tiny / "train2017"), "--output-dir", str(out),
            "model.roi_heads.box_predictor.test_score_thresh=0.0"]
    args = train_det.parse_args(argv)
    results = detection.run(args)
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(results[task])
        assert 0.0 <= results[task]["AP50"] <= 100.0
    dets = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    assert dets and {"bbox", "segmentation", "category_id", "score"} <= set(dets[0])
    # the one metrics file: AP^box / AP^mask, every COCO number in details (a checkpoint that says no iteration)
    record = read_eval_metrics(out, "det")
    assert record["metrics"] == {"AP_box": results["bbox"]["AP"], "AP_mask": results["segm"]["AP"]}
    assert record["details"]["segm"]["AP50"] == results["segm"]["AP50"] and record["tool"] == "tools/train_det.py"
    assert record["checkpoint"] == str(untrained) and record["iteration"] is None


def _untrained_detector(path: Path, num_classes: int) -> Path:
    """A checkpoint of the tiny config's detector as built (random init): what the evaluation tests evaluate,
    given explicitly, since --eval-only without weights is refused."""
    cfg = LazyConfig.load(TINY)
    cfg.model.roi_heads.num_classes = num_classes
    torch.save({"model": instantiate(cfg.model).state_dict()}, path)
    return path


def _tiny_model():
    cfg = LazyConfig.load(TINY)
    cfg.model.roi_heads.num_classes = 3
    return instantiate(cfg.model)


def test_init_checkpoint_any_format_zero_missing_backbone_keys(tmp_path):
    """An MAE checkpoint from tools/pretrain.py and a timm-format checkpoint both load with no missing
    backbone keys, converted on the fly (the importer's report is logged)."""
    from detectron2.checkpoint import DetectionCheckpointer

    from backbones.vit import create_vit
    from mae_transfer.mae import MaskedAutoencoder

    mae = MaskedAutoencoder(encoder="vit_tiny_patch16_224", img_size=96, decoder_embed_dim=64, decoder_depth=1,
                            decoder_num_heads=2, encoder_overrides={"depth": 4})
    torch.save({"format": "mae_transfer_pretrain", "model": mae.state_dict(), "epoch": 1}, tmp_path / "mae.pth")
    timm_vit = create_vit("vit_tiny_patch16_224", depth=4, num_classes=10)
    torch.save(timm_vit.state_dict(), tmp_path / "timm.pth")
    for src, ref in (("mae.pth", mae.encoder), ("timm.pth", timm_vit)):
        model = _tiny_model()
        out = tmp_path / src.replace(".pth", "_out")
        path = det_checks.prepare_init_checkpoint(str(tmp_path / src), model, str(out))
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        backbone_keys = {k for k in model.state_dict() if k.startswith("backbone.net.")}
        assert backbone_keys <= set(state), sorted(backbone_keys - set(state))[:5]  # zero missing backbone keys
        DetectionCheckpointer(model).load(path)
        net = model.backbone.net
        assert torch.equal(net.blocks[3].attn.qkv.weight, ref.blocks[3].attn.qkv.weight)
        if src == "timm.pth":  # same 224 grid; the 96 px MAE table is resampled
            assert torch.equal(net.pos_embed, ref.pos_embed)


def test_freeze_blocks_flag(tmp_path):
    args = train_det.parse_args(["--config", TINY, "--freeze-blocks", "3"])
    opts = [*args.opts, f"model.backbone.net.freeze_blocks={args.freeze_blocks}"]
    cfg = det_checks.load_config(TINY, opts)
    cfg.model.roi_heads.num_classes = 3
    model = instantiate(cfg.model).train()
    net = model.backbone.net
    assert not any(p.requires_grad for p in net.blocks[2].parameters())
    assert all(p.requires_grad for p in net.blocks[3].parameters())
    assert not net.patch_embed.proj.weight.requires_grad and not net.blocks[0].training and net.blocks[3].training


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_input_one_line_errors(fruits_nuts, tmp_path, capsys):
    data = json.loads((fruits_nuts / "trainval.json").read_text())
    bad_cat = dict(data, annotations=[dict(data["annotations"][0], category_id=99)])
    missing_img = dict(data, images=data["images"] + [dict(data["images"][0], id=999, file_name="nope.jpg")])
    no_cats = dict(data, categories=[])
    images = str(fruits_nuts / "images")
    cases = {
        "malformed json": (["--val-json", str(_write(tmp_path / "bad.json", '{"images": [')), "--val-images", images],
                           "malformed json"),
        "category": (["--val-json", str(_write(tmp_path / "cat.json", json.dumps(bad_cat))), "--val-images", images],
                     "category_id 99"),
        "missing image": (["--val-json", str(_write(tmp_path / "img.json", json.dumps(missing_img))),
                           "--val-images", images], "image file not found"),
        "no categories": (["--val-json", str(_write(tmp_path / "nocat.json", json.dumps(no_cats))),
                           "--val-images", images], "'categories' is empty"),
        "unknown key": (["train.no_such_key=1"], "no such key"),
        "wrong type": (["train.max_iter=abc"],
                       "config override train.max_iter=abc: expected an int (the config has 200), got str 'abc'"),
        "not a list": (["model.pixel_std=3"], "model.pixel_std=3: expected a list [a, b, ...]"),
        "not a checkpoint": (["--val-json", str(fruits_nuts / "trainval.json"), "--val-images", images,
                              f"train.init_checkpoint={_write(tmp_path / 'junk.pth', 'hello')}"], "junk.pth"),
    }
    vit_s = tmp_path / "vit_s.pth"
    from backbones.vit import create_vit

    torch.save(create_vit("vit_small_patch16_224").state_dict(), vit_s)
    cases["wrong architecture"] = (["--val-json", str(fruits_nuts / "trainval.json"), "--val-images", images,
                                    f"train.init_checkpoint={vit_s}"], "vit_s.pth")
    untrained = _untrained_detector(tmp_path / "untrained.pth", 3)  # weights (replaced by the cases that give some)
    for name, (extra, expected) in cases.items():
        capsys.readouterr()
        code = run_cli(train_det.main, ["--config", TINY, "--eval-only", f"train.output_dir={tmp_path / 'o'}",
                                        f"train.init_checkpoint={untrained}", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert err and err[-1].startswith("error: ") and expected in err[-1], (name, err[-1:])


def _error_line(capsys) -> str:
    """The tool's one error line. (In-process, an error that run_cli did not turn into this line would have
    propagated out of run_cli and failed the test: no traceback is printed.)"""
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    return line


def test_datasets_without_annotations_are_one_error(fruits_nuts, tmp_path, capsys):
    """A training json without (non-crowd) annotations, and an evaluation json without any: one line, exit 2,
    before a model is built."""
    data = json.loads((fruits_nuts / "trainval.json").read_text())
    images, trainval, out = str(fruits_nuts / "images"), str(fruits_nuts / "trainval.json"), tmp_path / "out"
    empty = _write(tmp_path / "empty.json", json.dumps(dict(data, annotations=[])))
    crowd = _write(tmp_path / "crowd.json", json.dumps(dict(data, annotations=[dict(a, iscrowd=1)
                                                                               for a in data["annotations"]])))
    train = ["--config", TINY, "--val-json", trainval, "--val-images", images, "--output-dir", str(out)]
    capsys.readouterr()
    assert run_cli(train_det.main, [*train, "--train-json", str(empty), "--train-images", images]) == 2
    assert _error_line(capsys) == (f"error: {empty}: no annotations in 18 images: nothing to train on (detectron2 "
                                   "trains on images with non-crowd annotations)")
    assert run_cli(train_det.main, [*train, "--train-json", str(crowd), "--train-images", images]) == 2
    assert _error_line(capsys).startswith(f"error: {crowd}: only 165 crowd annotation(s) (iscrowd=1) in 18 images")
    untrained = str(_untrained_detector(tmp_path / "untrained.pth", 3))  # weights: the data is what is wrong
    assert run_cli(train_det.main, ["--config", TINY, "--eval-only", untrained, "--val-json", str(empty),
                                    "--val-images", images, "--output-dir", str(out)]) == 2
    assert _error_line(capsys) == (f"error: {empty}: no annotations in 18 images: nothing to evaluate against "
                                   "(--infer draws predictions without ground truth)")
    assert not out.exists() or not {"eval_metrics.json", "model_final.pth"} & {p.name for p in out.iterdir()}


class _Warnings(logging.Handler):
    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> _Warnings:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def test_detector_of_another_class_count_is_refused(coco_tiny, tmp_path, capsys):
    """A 3-class detector on an 80-class dataset: --eval-only and --resume stop with one line naming both counts
    (detectron2 would leave the class layers random and evaluate them); as train.init_checkpoint it is a warning,
    detectron2's way of fine-tuning a detector on new classes."""
    sub = _coco_tiny_subset(coco_tiny, tmp_path, n=1)
    val = ["--val-json", str(sub), "--val-images", str(coco_tiny / "train2017")]
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "model_0000003.pth"
    three = _tiny_model()
    torch.save({"model": three.state_dict(), "iteration": 3}, ckpt)
    capsys.readouterr()
    assert run_cli(train_det.main, ["--config", TINY, "--eval-only", str(ckpt), *val, "--output-dir", str(out)]) == 2
    assert _error_line(capsys) == (
        f"error: --eval-only checkpoint {ckpt} is a detector of 3 classes, the dataset has 80 "
        "(model.roi_heads.num_classes); its class-specific layers would be random: evaluate it with the data it was "
        "trained on (--val-json)")
    (out / "last_checkpoint").write_text(ckpt.name)
    train = ["--config", TINY, "--train-json", str(sub), "--train-images", str(coco_tiny / "train2017"), *val,
             "--output-dir", str(out), "train.eval_period=0"]
    assert run_cli(train_det.main, [*train, "--resume"]) == 2
    assert _error_line(capsys).startswith(f"error: --resume checkpoint {ckpt} is a detector of 3 classes, "
                                          "the dataset has 80")
    assert not {"eval_metrics.json", "model_final.pth"} & {p.name for p in out.iterdir()}
    # init: the check do_train gives the checkpointer, on an 80-class detector's weights for the 3-class model: an
    # error naming both counts and the opt-in; with train.new_class_heads=True a warning
    eighty = {"roi_heads.box_predictor.cls_score.weight": torch.zeros(81, 4), "backbone.net.pos_embed": torch.zeros(1)}
    with pytest.raises(MaeTransferError, match="of 80 classes, the dataset has 3 .*train.new_class_heads=True"):
        det_checks.class_count_check(three, "train.init_checkpoint")(eighty, "coco.pth")
    with _Warnings("mae_transfer.detection") as warnings:
        det_checks.class_count_check(three, "train.init_checkpoint", new_class_heads=True)(eighty, "coco.pth")
        det_checks.class_count_check(three, "train.init_checkpoint")(three.state_dict(), "same.pth")  # agrees
        det_checks.class_count_check(three, "train.init_checkpoint")({"backbone.net.pos_embed": 0}, "mae.pth")
    assert warnings.lines == ["train.init_checkpoint checkpoint coco.pth is a detector of 80 classes, the dataset has "
                              "3 (model.roi_heads.num_classes): its class-specific layers are not loaded and start "
                              "from scratch"]


def test_no_detections_give_null_metrics_with_the_reason(fruits_nuts, tmp_path):
    """COCO AP is undefined when the model detects nothing: eval_metrics.json says null and why, strict JSON."""
    one = _subset_json(fruits_nuts, tmp_path / "one.json", 1)
    out = tmp_path / "eval"
    untrained = _untrained_detector(tmp_path / "untrained.pth", 3)
    assert run_cli(train_det.main, ["--config", TINY, "--eval-only", str(untrained), "--val-json", str(one),
                                    "--val-images", str(fruits_nuts / "images"), "--output-dir", str(out),
                                    "model.roi_heads.box_predictor.test_score_thresh=1.1"]) == 0

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    record = json.loads((out / "eval_metrics.json").read_text(), parse_constant=refuse)
    assert record["metrics"] == {"AP_box": None, "AP_mask": None}
    reason = "no detections on the evaluation images (COCO AP is undefined without any)"
    assert record["undefined"] == {"AP_box": reason, "AP_mask": reason}
    assert record["details"]["bbox"]["AP50"] is None


def test_cli_vocabulary_and_eval_weights(tmp_path):
    """--eval-only / --resume with and without a value (a following key=value stays an override); what a bare
    --eval-only evaluates: the output folder's last checkpoint, else train.init_checkpoint."""
    args = train_det.parse_args(["--config", TINY, "--eval-only", "train.max_iter=3", "--output-dir", "o"])
    assert (args.eval_only, args.opts, args.output_dir) == ("auto", ["train.max_iter=3"], "o")
    args = train_det.parse_args(["--config", TINY, "train.seed=1", "--resume", str(TINY)])
    assert (args.resume, args.opts) == (str(TINY), ["train.seed=1"])
    out = tmp_path / "out"
    out.mkdir()
    assert det_checks.eval_weights("auto", str(out), "init.pth") == "init.pth"
    (out / "last_checkpoint").write_text("model_0000009.pth")
    assert det_checks.eval_weights("auto", str(out), "init.pth") == str(out / "model_0000009.pth")
    assert det_checks.eval_weights("given.pth", str(out), "init.pth") == "given.pth"


class _Linear(nn.Module):
    """loss = a . x + b . y: the gradients are the data, so what the optimizer step applies is easy to predict."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))

    def forward(self, data):
        return {"loss": (self.a * data[0]).sum() + (self.b * data[1]).sum()}


@pytest.mark.parametrize("clip_type,expected_a,expected_b", [
    ("full_model", [30 / 50.249, 40 / 50.249, 0.0], [0.0, 5 / 50.249]),  # one norm over both: sqrt(50^2 + 5^2)
    ("norm", [0.6, 0.8, 0.0], [0.0, 1.0]),  # each parameter to norm 1
    ("value", [1.0, 1.0, 0.0], [0.0, 1.0]),  # each element to [-1, 1]
])
def test_gradient_clipping_hook_clips_between_backward_and_step(clip_type, expected_a, expected_b):
    import itertools

    from detectron2.engine import SimpleTrainer

    model = _Linear()
    trainer = SimpleTrainer(model, itertools.repeat((torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.0, 5.0]))),
                            torch.optim.SGD(model.parameters(), lr=1.0))
    trainer.register_hooks([detection.ClipGradients(clip_type, 1.0)])
    trainer.train(0, 1)
    assert torch.allclose(-model.a.detach(), torch.tensor(expected_a), atol=1e-4), model.a
    assert torch.allclose(-model.b.detach(), torch.tensor(expected_b), atol=1e-4), model.b


def test_gradient_clipping_from_the_config():
    cfg = LazyConfig.load(TINY)
    hook = detection.clip_grad_hook(cfg)  # the tiny config clips (a random-init Mask R-CNN diverges without)
    assert isinstance(hook, detection.ClipGradients) and (hook.clip_type, hook.clip_value) == ("full_model", 1.0)
    cfg.train.clip_grad.enabled = False
    assert detection.clip_grad_hook(cfg) is None
    cfg.train.clip_grad.update(enabled=True, clip_type="global")
    with pytest.raises(MaeTransferError, match="clip_type must be full_model, norm or value, got 'global'"):
        detection.clip_grad_hook(cfg)


def test_milestones_that_do_not_fit_the_run_are_one_line_before_anything_runs(tmp_path, capsys):
    """A short schedule whose milestones were rounded onto each other ([3, 3] of 4 updates, as the demo's
    --det-iters 4 once gave), or lie past num_updates: one error line with the values, exit 2, nothing written
    (was: fvcore's ValueError traceback when the trainer started)."""
    out = tmp_path / "out"
    for overrides, detail in (
            (["lr_multiplier.scheduler.num_updates=4", "lr_multiplier.scheduler.milestones=[3,3]"],
             "Milestone must be smaller than start epoch: start_epoch=3, milestone=3 (milestones [3, 3], "
             "num_updates 4)"),
            (["lr_multiplier.scheduler.num_updates=4", "lr_multiplier.scheduler.milestones=[2,4]"],
             "Milestone must be smaller than total number of updates: num_updates=4, milestone=4 (milestones "
             "[2, 4], num_updates 4)")):
        assert run_cli(train_det.main, ["--config", TINY, "--output-dir", str(out), "train.max_iter=4",
                                        *overrides]) == 2
        assert _error_line(capsys) == (
            f"error: lr_multiplier.scheduler: {detail}; milestones must increase and stay below num_updates. The "
            "schedule is a fraction of train.max_iter: for a short run keep the config's milestones and num_updates "
            "and change train.max_iter only")
        assert not out.exists()
    # train.max_iter alone, however small, keeps the config's (fractional) schedule valid
    cfg = det_checks.load_config(TINY, ["train.max_iter=1"])
    det_checks.check_lr_schedule(cfg)
