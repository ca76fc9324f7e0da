"""CPU-size variant of configs/coco_mask_rcnn_vit_b.py: same code path, small numbers.

ViT-Tiny width (192, 3 heads) at depth 4, as configs/mae_pretrain_vit_tiny_cpu.py pretrains it; 256 px
LSJ (0.5-1.5); window 8 with global blocks 1/3; batch 2; fp32; 128-channel pyramid and heads (still
4conv1fc / 2-conv RPN / LN); fewer RoIs and proposals; short schedule. Everything else (pyramid and head
classes, optimizer, LLRD rule, evaluator) is inherited. On 2 CPU cores the 256-channel stride-4
convolutions of the full-size heads cost ~20 s/iter, hence the narrower heads. Pick the data with
tools/train_det.py --train-json/--train-images/--val-json/--val-images (num_classes is read from the json).
"""
from functools import partial

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from backbones.lr_decay import lr_decay_factor

from .coco_mask_rcnn_vit_b import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 192
model.backbone.net.depth = 4
model.backbone.net.global_block_indexes = [1, 3]
model.backbone.net.num_heads = 3
model.backbone.net.window_size = 8
model.backbone.net.rel_pos_input_size = 256
model.backbone.square_pad = 256
model.backbone.out_channels = 128
model.proposal_generator.head.in_channels = 128
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (256, 100)
model.roi_heads.batch_size_per_image = 64
# At most 50 detections per image: on CPU, pasting 100 masks of an untrained model costs ~5 s/image.
model.roi_heads.box_predictor.test_topk_per_image = 50
model.roi_heads.box_head.input_shape = ShapeSpec(channels=128, height=7, width=7)
model.roi_heads.box_head.conv_dims = [128, 128, 128, 128]
model.roi_heads.box_head.fc_dims = [512]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=512)
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=128, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [128, 128, 128, 128, 128]

dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=256, target_width=256),
    L(T.FixedSizeCrop)(crop_size=(256, 256), pad=False),
]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=256, max_size=256),
]

optimizer.params.lr_factor_func = partial(lr_decay_factor, num_layers=4, layer_decay=0.7,
                                          backbone_prefix="backbone.net.")

train.reference_world_size = None  # no published run: the batch of 2 on one process is the recipe
train.init_checkpoint = ""  # random init unless given (e.g. a tools/pretrain.py checkpoint)
train.amp.enabled = False
train.device = "cpu"
train.output_dir = "./output/det_tiny_cpu"
train.clip_grad.enabled = True  # a randomly initialised Mask R-CNN diverges without it
train.max_iter = 200
train.eval_period = 100
train.checkpointer.period = 100
train.log_period = 10
# The schedule is scale-invariant (fractions of max_iter): 10% warmup, decays at 80% / 95%.
lr_multiplier.scheduler.milestones = [160, 190]
lr_multiplier.scheduler.num_updates = 200
lr_multiplier.warmup_length = 0.1
