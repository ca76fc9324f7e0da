"""COCO Mask R-CNN with our ViT-H: ViTDet-H recipe, overriding the ViT-B config.

As detectron2's projects/ViTDet/configs/COCO/mask_rcnn_vitdet_h_75ep.py: global blocks 7/15/23/31,
drop path 0.5, layer-wise lr decay 0.9 over 32 layers, no weight-decay exceptions, and 75 epochs
(3/4 of the 100-epoch schedule). ViTDet-H uses patch 16, so it needs a patch-16 ViT-H checkpoint such as
detectron2's `mae_pretrain_vit_huge_p14to16.pth` (MAE ViT-H/14 with the patch kernel resampled to 16 x 16);
the importer does not resample patch kernels, so a /14 file stops with a shape error.
"""
from functools import partial

from .coco_mask_rcnn_vit_b import (
    dataloader,  # noqa: F401 -- re-exported: LazyConfig.load builds the config from module globals
    lr_decay_factor,
    lr_multiplier,
    model,
    optimizer,
    train,
)

train.init_checkpoint = "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_huge_p14to16.pth"

model.backbone.net.embed_dim = 1280
model.backbone.net.depth = 32
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.5
model.backbone.net.global_block_indexes = [7, 15, 23, 31]

optimizer.params.lr_factor_func = partial(lr_decay_factor, num_layers=32, layer_decay=0.9,
                                          backbone_prefix="backbone.net.")
optimizer.params.overrides = {}
optimizer.params.weight_decay_norm = None

train.max_iter = train.max_iter * 3 // 4  # 100 ep -> 75 ep
lr_multiplier.scheduler.milestones = [m * 3 // 4 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter
