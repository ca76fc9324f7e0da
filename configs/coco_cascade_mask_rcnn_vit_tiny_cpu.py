"""CPU-size variant of configs/coco_cascade_mask_rcnn_vit_b.py: configs/coco_mask_rcnn_vit_tiny_cpu.py
(ViT-Tiny width at depth 4, 256 px, 128-channel pyramid and heads, short schedule) with the cascade RoI
heads of the full-size config at the tiny config's head widths: three stages at IoU 0.5 / 0.6 / 0.7,
4conv1fc LN box heads (128 channels, fc 512), class-agnostic predictors with weights (10,10,5,5) /
(20,20,10,10) / (30,30,15,15), at most 50 detections per image (mask pasting is slow on CPU).
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from .coco_mask_rcnn_vit_tiny_cpu import (  # noqa: F401 -- re-exported: LazyConfig.load builds the config from module globals
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# Arguments StandardROIHeads takes and CascadeROIHeads does not (it takes one of each per stage).
[model.roi_heads.pop(k) for k in ["box_head", "box_predictor", "proposal_matcher"]]

model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=128, height=7, width=7),
            conv_dims=[128, 128, 128, 128],
            fc_dims=[512],
            conv_norm="LN",
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=512),
            test_score_thresh=0.05,
            test_topk_per_image=50,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",  # follows roi_heads.num_classes (tools/train_det.py sets it)
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False)
        for th in [0.5, 0.6, 0.7]
    ],
)

train.output_dir = "./output/cascade_det_tiny_cpu"
