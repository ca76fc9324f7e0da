"""COCO Cascade Mask R-CNN with our plain ViT-B/16: ViTDet's cascade recipe (100 epochs).

As detectron2's projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py: the Mask R-CNN config
(configs/coco_mask_rcnn_vit_b.py: backbone, pyramid, RPN, mask head, data, schedule, optimizer) with its
RoI box branch replaced by detectron2's CascadeROIHeads: three stages trained at IoU 0.5 / 0.6 / 0.7, each
a 4conv1fc LN box head and a class-agnostic box predictor with box-transform weights (10,10,5,5) /
(20,20,10,10) / (30,30,15,15). ViTDet reports 54.0 AP box / 46.7 AP mask for ViT-B (Mask R-CNN: 51.6 / 45.9).
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from .coco_mask_rcnn_vit_b import (  # noqa: F401 -- re-exported: LazyConfig.load builds the config from module globals
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)


def use_cascade_roi_heads(roi_heads, channels: int = 256, fc_dim: int = 1024, **predictor_options) -> None:
    """Replace a Mask R-CNN config's RoI box branch by ViTDet's three cascade stages (4conv1fc LN heads of
    `channels` / `fc_dim`, class-agnostic predictors); the tiny CPU config calls it with its own widths."""
    # Arguments StandardROIHeads takes and CascadeROIHeads does not (it takes one of each per stage).
    [roi_heads.pop(k) for k in ["box_head", "box_predictor", "proposal_matcher"]]
    roi_heads.update(
        _target_=CascadeROIHeads,
        box_heads=[
            L(FastRCNNConvFCHead)(
                input_shape=ShapeSpec(channels=channels, height=7, width=7),
                conv_dims=[channels] * 4,
                fc_dims=[fc_dim],
                conv_norm="LN",
            )
            for _ in range(3)
        ],
        box_predictors=[
            L(FastRCNNOutputLayers)(
                input_shape=ShapeSpec(channels=fc_dim),
                test_score_thresh=0.05,
                box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
                cls_agnostic_bbox_reg=True,
                num_classes="${...num_classes}",  # follows roi_heads.num_classes (tools/train_det.py sets it)
                **predictor_options,
            )
            for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
        ],
        proposal_matchers=[
            L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False)
            for th in [0.5, 0.6, 0.7]
        ],
    )


use_cascade_roi_heads(model.roi_heads)
