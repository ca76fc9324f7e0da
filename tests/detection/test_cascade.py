"""ViTDet Cascade Mask R-CNN configs (configs/coco_cascade_mask_rcnn_vit_{b,l,h,tiny_cpu}.py): parameter counts
and head structure against detectron2's own ViTDet cascade model (its model-zoo mask_rcnn_vitdet.py with the
cascade RoI heads of projects/ViTDet's cascade_mask_rcnn_vitdet_*.py), and the tiny config trained on real
data with tools/train_det.py (losses fall, COCOEvaluator result, --resume) and built from a study cell."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers
from torch import nn

from mae_transfer.cli import run_cli
from mae_transfer.detection import train as detection
from mae_transfer.metrics import read_eval_metrics
from mae_transfer.study.run import read_det_metrics
from mae_transfer.study.spec import Cell, cell_command, load_study
from tests.conftest import no_init

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TINY = str(CONFIGS / "coco_cascade_mask_rcnn_vit_tiny_cpu.py")

# detectron2 ViTDet backbone sizes (projects/ViTDet/configs/COCO/*_vitdet_{b,l,h}_*.py): embed, depth, heads,
# drop path, global-attention blocks (all others are windowed).
VITDET = {"b": (768, 12, 12, 0.1, (2, 5, 8, 11)), "l": (1024, 24, 16, 0.4, (5, 11, 17, 23)),
          "h": (1280, 32, 16, 0.5, (7, 15, 23, 31))}


def _train_det():
    spec = importlib.util.spec_from_file_location("train_det", REPO / "tools" / "train_det.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_det = _train_det()


def _d2_vitdet_cascade_cfg(size: str):
    """detectron2's ViTDet Cascade Mask R-CNN model, from detectron2's own pieces only: model-zoo
    common/models/mask_rcnn_vitdet.py with the ViT size and the RoI heads of ViTDet's cascade configs."""
    model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
    embed, depth, heads, dp, glob = VITDET[size]
    net = model.backbone.net
    net.embed_dim, net.depth, net.num_heads, net.drop_path_rate = embed, depth, heads, dp
    net.window_block_indexes = [i for i in range(depth) if i not in glob]
    [model.roi_heads.pop(k) for k in ["box_head", "box_predictor", "proposal_matcher"]]
    model.roi_heads.update(
        _target_=CascadeROIHeads,
        box_heads=[L(FastRCNNConvFCHead)(input_shape=ShapeSpec(channels=256, height=7, width=7),
                                         conv_dims=[256, 256, 256, 256], fc_dims=[1024], conv_norm="LN")] * 3,
        box_predictors=[L(FastRCNNOutputLayers)(input_shape=ShapeSpec(channels=1024), test_score_thresh=0.05,
                                                box2box_transform=L(Box2BoxTransform)(weights=w),
                                                cls_agnostic_bbox_reg=True, num_classes="${...num_classes}")
                        for w in [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]],
        proposal_matchers=[L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False)
                           for th in [0.5, 0.6, 0.7]],
    )
    return model


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# Reference counts of detectron2's model (80 classes); H derived the same way as B and L.
@pytest.mark.parametrize("size,expected", [("b", 141_160_990), ("l", 360_949_854), ("h", 691_468_958)])
def test_cascade_configs_match_detectron2_vitdet_cascade(size, expected):
    cfg = LazyConfig.load(str(CONFIGS / f"coco_cascade_mask_rcnn_vit_{size}.py"))
    with no_init():
        ours = instantiate(cfg.model)
        ref = instantiate(_d2_vitdet_cascade_cfg(size))
    n_ours, n_ref = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in ref.parameters())
    print(f"ViTDet-{size.upper()} Cascade Mask R-CNN parameters: ours {n_ours:,}, detectron2 {n_ref:,}")
    assert n_ref == expected
    cls = ours.backbone.net.cls_token
    assert n_ours - n_ref == cls.numel() == VITDET[size][0] and not cls.requires_grad  # our unused cls token
    ours_shapes = _shapes(ours)
    ours_shapes.pop("backbone.net.cls_token")
    assert ours_shapes == _shapes(ref)  # same names and shapes everywhere, heads included

    # The cascade itself, as built: 3 stages, IoU 0.5/0.6/0.7, class-agnostic boxes, the ViTDet weights.
    rh = ours.roi_heads
    assert isinstance(rh, CascadeROIHeads) and rh.num_cascade_stages == 3
    assert [m.thresholds[1:-1] for m in rh.proposal_matchers] == [[0.5], [0.6], [0.7]]
    assert not any(m.allow_low_quality_matches for m in rh.proposal_matchers)
    assert [p.box2box_transform.weights for p in rh.box_predictor] == [(10, 10, 5, 5), (20, 20, 10, 10),
                                                                        (30, 30, 15, 15)]
    assert all(p.num_classes == 80 and p.bbox_pred.out_features == 4 for p in rh.box_predictor)
    for head in rh.box_head:
        assert [c.out_channels for c in head.conv_norm_relus] == [256] * 4 and head.fcs[0].out_features == 1024
        assert all(type(c.norm).__name__ == "LayerNorm" for c in head.conv_norm_relus)


def _without_box_branch(path: Path) -> str:
    cfg = LazyConfig.load(str(path))
    for k in ("_target_", "box_head", "box_predictor", "proposal_matcher", "box_heads", "box_predictors",
              "proposal_matchers"):
        cfg.model.roi_heads.pop(k, None)
    cfg.train.output_dir = ""
    return LazyConfig.to_py(cfg)


@pytest.mark.parametrize("size", ["b", "l", "h", "tiny_cpu"])
def test_cascade_configs_inherit_mask_rcnn_recipes(size):
    """Everything but the RoI box branch (and the tiny run's output folder) is the Mask R-CNN config's."""
    cascade = _without_box_branch(CONFIGS / f"coco_cascade_mask_rcnn_vit_{size}.py")
    for key in ("MaskRCNNConvUpsampleHead", "box_pooler", "rel_pos_input_size=", "lr_factor_func"):
        assert key in cascade  # the compared text does hold the model, heads and optimizer
    assert cascade == _without_box_branch(CONFIGS / f"coco_mask_rcnn_vit_{size}.py")


# ------------------------------------------------------------------------------------------- tools/train_det.py
def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]


def _study(fruits_nuts: Path, tmp_path: Path, **task):
    """A one-cell study whose det task is the tiny cascade config on fruits_nuts (validated on 3 photos: CPU)."""
    data = json.loads((fruits_nuts / "trainval.json").read_text())
    data["images"] = data["images"][:3]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in {im["id"] for im in data["images"]}]
    (tmp_path / "val.json").write_text(json.dumps(data))
    args = ["--train-json", str(fruits_nuts / "trainval.json"), "--train-images", str(fruits_nuts / "images"),
            "--val-json", str(tmp_path / "val.json"), "--val-images", str(fruits_nuts / "images")]
    return load_study(dict(name="cascade", depth=4, freeze_blocks=[0, 2], seeds=[0], backbones={"scratch": None},
                           tasks={"det": dict(kind="det", config="configs/coco_cascade_mask_rcnn_vit_tiny_cpu.py",
                                              args=args, **task)}), tmp_path / "study")


def test_tiny_cascade_study_cell_trains_on_fruits_nuts_evaluates_and_resumes(fruits_nuts, tmp_path):
    """Real data, through the study runner's tools/train_det.py command: the three stages' classification
    losses fall, a COCOEvaluator (bbox + segm) result lands in eval_metrics.json, and --resume after an
    interruption continues from the right iteration."""
    # Every detection of the 5-iteration model is evaluated (its scores may all be under the 0.05 default, which
    # would leave COCO AP undefined), the 10 best per image (CPU).
    study = _study(fruits_nuts, tmp_path, iters=5, checkpoint_period=2,
                   opts=["train.log_period=1", "optimizer.lr=0.0005",
                         "model.roi_heads.box_predictors.2.test_score_thresh=0.0",
                         "model.roi_heads.box_predictors.2.test_topk_per_image=10"])
    cell = Cell("scratch", "det", 0, 0)
    tool, cmd = cell_command(study, cell, None, resume=False)
    assert tool == "train_det" and cmd[cmd.index("--config") + 1] == TINY
    out = study.cell_dir(cell)
    assert run_cli(train_det.main, cmd) == 0
    rows = [m for m in _metrics(out) if "total_loss" in m]  # detectron2 logs running medians
    assert [r["iteration"] for r in rows] == list(range(5))
    for stage in range(3):
        key = f"loss_cls_stage{stage}"
        assert rows[-1][key] < 0.9 * rows[0][key], [r[key] for r in rows]
    assert rows[-1]["total_loss"] < rows[0]["total_loss"], [r["total_loss"] for r in rows]
    ap = read_det_metrics(out)  # what the study records for the cell
    assert set(ap) == {"AP_box", "AP_mask"} and all(0.0 <= v <= 100.0 for v in ap.values()), ap
    assert {"AP50", "AP75"} <= set(read_eval_metrics(out, "det")["details"]["segm"])

    # Interrupted after iteration 1: later checkpoints and the evaluation gone. --resume continues at 2.
    for name in ("model_final.pth", "model_0000003.pth", "eval_metrics.json"):
        (out / name).unlink()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    before = len(_metrics(out))
    _, cmd = cell_command(study, cell, None, resume=True)
    assert cmd[-1] == "--resume" and run_cli(train_det.main, cmd) == 0
    assert [m["iteration"] for m in _metrics(out)[before:] if "total_loss" in m] == [2, 3, 4]
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 4
    record = read_eval_metrics(out, "det")
    assert record["iteration"] == 5 and 0.0 <= record["metrics"]["AP_box"] <= 100.0
    assert "AP50" in record["details"]["bbox"] and "AP50" in record["details"]["segm"]


def test_study_cell_command_builds_the_cascade_model(fruits_nuts, tmp_path):
    """The study's det command for the cascade config sets up a cascade model with the dataset's classes in
    every stage and the cell's frozen blocks."""
    study = _study(fruits_nuts, tmp_path, iters=8)
    _, cmd = cell_command(study, Cell("scratch", "det", 2, 0), None, resume=False)
    cfg = detection.setup(train_det.parse_args(cmd))
    assert cfg.train.max_iter == 8 and cfg.train.eval_period == 8
    model = instantiate(cfg.model)
    assert isinstance(model.roi_heads, CascadeROIHeads)
    assert [p.num_classes for p in model.roi_heads.box_predictor] == [3, 3, 3]
    assert [p.test_topk_per_image for p in model.roi_heads.box_predictor] == [50] * 3
    net = model.backbone.net
    assert not net.blocks[1].mlp.fc1.weight.requires_grad and net.blocks[2].mlp.fc1.weight.requires_grad
