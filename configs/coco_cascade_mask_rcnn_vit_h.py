"""COCO Cascade Mask R-CNN with our ViT-H (patch 16): configs/coco_mask_rcnn_vit_h.py (ViTDet-H recipe, 75
epochs) with the cascade RoI heads of configs/coco_cascade_mask_rcnn_vit_b.py, as detectron2's
projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_h_75ep.py. ViTDet reports 58.7 AP box / 51.0 AP mask.
"""
from .coco_cascade_mask_rcnn_vit_b import model as _cascade  # the heads do not depend on the ViT size
from .coco_mask_rcnn_vit_h import (  # noqa: F401 -- re-exported: LazyConfig.load builds the config from module globals
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.roi_heads = _cascade.roi_heads
