"""CPU-size variant of configs/coco_cascade_mask_rcnn_vit_b.py: configs/coco_mask_rcnn_vit_tiny_cpu.py
(ViT-Tiny width at depth 4, 256 px, 128-channel pyramid and heads, short schedule) with the cascade RoI
heads of the full-size config at the tiny config's head widths: three stages at IoU 0.5 / 0.6 / 0.7,
4conv1fc LN box heads (128 channels, fc 512), class-agnostic predictors with weights (10,10,5,5) /
(20,20,10,10) / (30,30,15,15), at most 50 detections per image (mask pasting is slow on CPU).
"""
from .coco_cascade_mask_rcnn_vit_b import use_cascade_roi_heads
from .coco_mask_rcnn_vit_tiny_cpu import (  # noqa: F401 -- re-exported: LazyConfig.load builds the config from module globals
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

use_cascade_roi_heads(model.roi_heads, channels=128, fc_dim=512, test_topk_per_image=50)

train.output_dir = "./output/cascade_det_tiny_cpu"
