"""COCO Cascade Mask R-CNN with our ViT-L/16: configs/coco_mask_rcnn_vit_l.py (ViTDet-L recipe) with the
cascade RoI heads of configs/coco_cascade_mask_rcnn_vit_b.py, as detectron2's
projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_l_100ep.py. ViTDet reports 57.6 AP box / 50.0 AP mask.
"""
from .coco_cascade_mask_rcnn_vit_b import model as _cascade  # the heads do not depend on the ViT size
from .coco_mask_rcnn_vit_l import (  # noqa: F401 -- re-exported: LazyConfig.load builds the config from module globals
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.roi_heads = _cascade.roi_heads
