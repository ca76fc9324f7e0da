"""COCO Mask R-CNN with our ViT-L/16: ViTDet-L recipe (100 epochs), overriding the ViT-B config.

As detectron2's projects/ViTDet/configs/COCO/mask_rcnn_vitdet_l_100ep.py: global blocks 5/11/17/23,
drop path 0.4, layer-wise lr decay 0.8 over 24 layers.
"""
from functools import partial

from .coco_mask_rcnn_vit_b import (
    dataloader,  # noqa: F401 -- re-exported: LazyConfig.load builds the config from module globals
    lr_decay_factor,
    lr_multiplier,  # noqa: F401 -- re-exported: LazyConfig.load builds the config from module globals
    model,
    optimizer,
    train,
)

train.init_checkpoint = "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_large.pth"

model.backbone.net.embed_dim = 1024
model.backbone.net.depth = 24
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.4
model.backbone.net.global_block_indexes = [5, 11, 17, 23]

optimizer.params.lr_factor_func = partial(lr_decay_factor, num_layers=24, layer_decay=0.8,
                                          backbone_prefix="backbone.net.")
