"""Smoke subset (`pytest -m smoke`, about a minute): what every supported Python (3.10-3.13) must run, on the
installed stack of that version. scripts/test_pythons.sh runs it in a fresh venv per version; CI runs it on 3.12.
Each test is real: imports and pins of this version, one MAE pretraining step on real photos, two detectron2
iterations and two MMSeg iterations through the tools, a timm checkpoint imported with equal outputs, a crafted
pickle refused, and detectron2's compiled ops checked against their references where they load (3.10)."""
from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch

from mae_transfer.cli import run_cli
from tests.conftest import REPO_ROOT
from tests.test_install import installed_versions_not_pinned, lock_file_for, stack_pins

pytestmark = pytest.mark.smoke
CONFIGS = REPO_ROOT / "configs"
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _tool_main(name: str):
    spec = importlib.util.spec_from_file_location(f"smoke_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_imports_and_the_pins_of_this_python() -> None:
    import backbones.mmseg  # noqa: F401  (applies the mmcv._ext stand-in, then imports mmseg)
    # isort: split
    import detectron2.modeling  # noqa: F401
    import mmseg.models  # noqa: F401

    import backbones.detectron2  # noqa: F401
    import mae_transfer.detection.train  # noqa: F401
    import mae_transfer.segmentation.train  # noqa: F401

    assert stack_pins(PY)["torch"] == version("torch") == "2.14.1"
    wrong = installed_versions_not_pinned(PY)  # (installed, pinned) of stack.txt and the full lock
    assert not wrong, f"Python {PY}, requirements/stack.txt + {lock_file_for(PY).name}: {wrong}"


def test_mae_pretraining_step_on_real_photos(coco_tiny: Path, tmp_path: Path, one_thread) -> None:
    """One optimizer step of the real MAE model on 4 photos: finite loss, every trained tensor moves; then one
    epoch through the training runtime writes a checkpoint that loads weights-only."""
    from mae_transfer.config import load_config
    from mae_transfer.data import ImageFolderDataset, pretrain_transform
    from mae_transfer.pretraining import build_mae, build_optimizer, load_checkpoint, pretrain, resolve_config

    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((coco_tiny / "train2017").glob("*.jpg"))[:4]:
        shutil.copy(f, images / f.name)
    micro = ["encoder_overrides={'depth': 1}", "img_size=64", "decoder_depth=1", "decoder_embed_dim=64",
             "batch_size=4", "recon_images=0", "epochs=1", "warmup_epochs=0", "save_every=1"]
    cfg = resolve_config({**load_config(CONFIGS / "mae_pretrain_vit_tiny_cpu.py", micro),
                          "data_path": str(images), "output_dir": str(tmp_path / "run")})

    torch.manual_seed(0)
    model = build_mae(cfg).train()
    optimizer = build_optimizer(model, cfg, 1e-3)
    data = ImageFolderDataset(images, pretrain_transform(cfg["img_size"], cfg["crop_scale"]))
    batch = torch.stack([data[i] for i in range(4)])
    trained = {k: v for k, v in model.named_parameters() if v.requires_grad}  # not the fixed sin-cos tables
    before = {k: v.detach().clone() for k, v in trained.items()}
    loss, pred, mask = model(batch)
    assert torch.isfinite(loss) and 0.0 < loss.item() < 10.0, loss
    assert mask.shape == (4, 16) and mask.sum().item() == 4 * 12  # 75% of the 4x4 patches masked
    loss.backward()
    optimizer.step()
    unchanged = [k for k, v in trained.items() if torch.equal(v, before[k])]
    assert not unchanged, f"parameters not updated by the step: {unchanged}"

    history = pretrain(cfg)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")
    assert ckpt["epoch"] == 1 and set(ckpt["model"]) == set(model.state_dict())


def test_detection_two_iterations_on_fruits_nuts(fruits_nuts: Path, tmp_path: Path) -> None:
    """tools/train_det.py, the tiny ViT Mask R-CNN config, 2 iterations on the real photos: finite losses
    logged, a final checkpoint that loads weights-only and has every backbone weight."""
    out = tmp_path / "det"
    j, im = str(fruits_nuts / "trainval.json"), str(fruits_nuts / "images")
    argv = ["--config", str(CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py"), "--train-json", j, "--train-images", im,
            "--val-json", j, "--val-images", im, f"train.output_dir={out}", "train.max_iter=2",
            "train.eval_period=0", "train.log_period=1", "train.seed=0"]
    assert run_cli(_tool_main("train_det"), argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("total_loss", "loss_cls", "loss_mask")), r
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 1
    assert any(k.startswith("backbone.net.blocks.") for k in final["model"])


def test_segmentation_two_iterations_on_camvid(camvid_small: Path, tmp_path: Path, capsys) -> None:
    """tools/train_seg.py, the tiny UperNet config on 2 real CamVid frames, 2 iterations: finite loss in the
    log, and the weights of iteration 2 differ from iteration 1's (read back by our safe mmengine reader)."""
    from mae_transfer.segmentation.checkpoint import read_mmengine_checkpoint

    out = tmp_path / "seg"
    roots = [f"{split}_dataloader.dataset.data_root={camvid_small}" for split in ("train", "val", "test")]
    argv = ["--config", str(CONFIGS / "camvid_upernet_vit_tiny_cpu.py"), "--output-dir", str(out),
            "--cfg-options", *roots, "train_dataloader.batch_size=2", "train_dataloader.num_workers=0",
            "train_cfg.max_iters=2", "train_cfg.val_interval=1000", "val_cfg=None", "val_dataloader=None",
            "val_evaluator=None", "default_hooks.checkpoint.interval=1", "default_hooks.logger.interval=1"]
    rc = run_cli(_tool_main("train_seg"), argv)
    assert rc == 0, capsys.readouterr().err[-3000:]
    one, two = (read_mmengine_checkpoint(out / f"iter_{i}.pth") for i in (1, 2))
    assert two["meta"]["iter"] == 2
    moved = [k for k, v in two["state_dict"].items()
             if v.is_floating_point() and not torch.equal(v, one["state_dict"][k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("decode_head.") for k in moved)
    losses = [json.loads(line)["loss"] for p in out.rglob("scalars.json")
              for line in p.read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses


def test_timm_checkpoint_converts_with_equal_outputs(tmp_path: Path, capsys) -> None:
    """A randomly initialised timm ViT saved as a timm checkpoint: loaded into our ViT, the features and
    logits equal timm's; converted by tools/convert_checkpoint.py, detectron2's checkpointer loads it."""
    import timm

    from backbones.vit import VisionTransformer
    from mae_transfer.checkpoint import load_backbone

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=5).eval()
    with torch.no_grad():  # timm zero-inits some tensors; make every tensor informative
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    ours = VisionTransformer(img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=5).eval()
    report = load_backbone(tmp_path / "timm.pth", ours)
    assert report.format == "timm" and not report.missing and not report.unexpected
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)

    out = tmp_path / "d2.pth"
    rc = run_cli(_tool_main("convert_checkpoint"), [str(tmp_path / "timm.pth"), str(out), "--to", "detectron2",
                                                    "--model", "vit_tiny_patch16_224", "--depth", "2",
                                                    "--img-size", "64"])
    assert rc == 0, capsys.readouterr().err
    written = torch.load(out, weights_only=True)["model"]
    torch.testing.assert_close(written["backbone.net.pos_embed"], ref.pos_embed)
    torch.testing.assert_close(written["backbone.net.blocks.1.mlp.fc2.weight"], ref.blocks[1].mlp.fc2.weight)


class _MarkerBomb:
    """Unpickling this object creates the marker file: stands for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.marker, "w")


def test_crafted_pickle_is_refused(tmp_path: Path, capsys) -> None:
    from mae_transfer.checkpoint import read_checkpoint
    from mae_transfer.errors import MaeTransferError

    marker = tmp_path / "PWNED"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _MarkerBomb(marker)}, tmp_path / "bomb.pth")
    with open(tmp_path / "bomb.pkl", "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(2).numpy()}, "x": _MarkerBomb(marker)}, f)
    for name in ("bomb.pth", "bomb.pkl"):
        with pytest.raises(MaeTransferError, match="--allow-pickle"):
            read_checkpoint(tmp_path / name)
    rc = run_cli(_tool_main("convert_checkpoint"), [str(tmp_path / "bomb.pth"), str(tmp_path / "out.pth"),
                                                    "--to", "mmseg", "--model", "vit_tiny_patch16_224"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "pickled Python objects" in err[0], err
    assert not marker.exists(), "the crafted file ran code"
    assert not (tmp_path / "out.pth").exists()


def test_detectron2_compiled_ops_match_their_references_where_they_load() -> None:
    """Where detectron2._C loads (the cp310 wheel on 3.10), detectron2 uses it: its deformable conv and rotated
    NMS must equal torchvision's; elsewhere (and where its ABI does not match our torch) the fallbacks are in use."""
    from detectron2.evaluation import coco_evaluation
    from pycocotools.cocoeval import COCOeval

    from mae_transfer.detection.compiled_ops import detectron2_compiled_ops_status, detectron2_has_compiled_ops

    status = detectron2_compiled_ops_status()
    if not detectron2_has_compiled_ops():
        assert status.startswith("not loaded") and "fallbacks" in status
        assert coco_evaluation.COCOeval_opt is COCOeval  # COCOEvaluator falls back by itself
        if PY != "3.10":
            assert "built for CPython 3.10" in status
        return
    import torchvision
    from detectron2.layers import DeformConv, nms_rotated

    assert coco_evaluation.COCOeval_opt is not COCOeval
    g = torch.Generator().manual_seed(0)
    conv = DeformConv(4, 6, kernel_size=3, padding=1, bias=False)
    x, offset = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 18, 8, 8, generator=g)
    expected = torchvision.ops.deform_conv2d(x, offset, conv.weight, padding=1)
    torch.testing.assert_close(conv(x, offset), expected, atol=1e-4, rtol=1e-4)
    # Axis-aligned rotated boxes (angle 0) keep exactly what plain NMS keeps.
    xyxy = torch.rand(30, 2, generator=g) * 50
    xyxy = torch.cat([xyxy, xyxy + 5 + torch.rand(30, 2, generator=g) * 20], 1)
    scores = torch.rand(30, generator=g)
    rotated = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2], torch.zeros(30, 1)], 1)
    assert nms_rotated(rotated, scores, 0.5).tolist() == torchvision.ops.nms(xyxy, scores, 0.5).tolist()
