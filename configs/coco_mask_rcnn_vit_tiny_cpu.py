"""CPU-size variant of configs/coco_mask_rcnn_vit_b.py: same code path, small numbers.

ViT-Tiny/16 (192 wide, 12 blocks, 3 heads), 320 px LSJ (0.5-1.5), window 10 with global blocks
2/5/8/11, batch 2, fp32, 4conv1fc heads with fewer sampled RoIs, short schedule. Everything else
(pyramid, heads, optimizer, LLRD, evaluator) is inherited. Pick the data with tools/train_det.py
`--train-json/--train-images/--val-json/--val-images` (num_classes is read from the json).
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .coco_mask_rcnn_vit_b import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 192
model.backbone.net.depth = 12
model.backbone.net.num_heads = 3
model.backbone.net.window_size = 10
model.backbone.net.rel_pos_input_size = 320
model.backbone.square_pad = 320
model.roi_heads.batch_size_per_image = 128
model.proposal_generator.post_nms_topk = (500, 500)

dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=320, target_width=320),
    L(T.FixedSizeCrop)(crop_size=(320, 320), pad=False),
]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=320, max_size=320),
]

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
