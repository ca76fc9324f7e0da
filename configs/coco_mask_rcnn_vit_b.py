"""COCO Mask R-CNN with our plain ViT-B/16 backbone: the ViTDet / MAE recipe (100 epochs).

Values follow detectron2's own ViTDet configs (projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py
and common/coco_loader_lsj.py): 1024 px large-scale jitter (0.1-2.0), window 14 with global blocks
2/5/8/11, decomposed rel-pos, drop path 0.1, LN in the box/mask heads, 4conv1fc box head, 2-conv RPN,
AdamW (lr 1e-4, wd 0.1) with layer-wise lr decay 0.7, AMP, 184375 iters at batch 64 (100 epochs),
step decay at 163889 / 177546, 250 warmup iters. Only the backbone `net` differs: our ViT
(`backbones.detectron2.ViTBackbone`), so parameter names are `backbone.net.<our ViT keys>`.

`train.init_checkpoint` takes any format `mae_transfer.checkpoint` reads (our MAE pretraining, official
MAE, timm, HF, detectron2, mmseg); tools/train_det.py converts it on the fly.
"""
from functools import partial

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from backbones.detectron2 import ViTBackbone
from backbones.lr_decay import lr_decay_factor

# ---------------------------------------------------------------- model
# detectron2's ViTDet Mask R-CNN (SimpleFeaturePyramid, LN heads, 4conv1fc, 2-conv RPN) ...
model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
# ... with our ViT as the pyramid's `net`.
model.backbone.net = L(ViTBackbone)(
    img_size=224,  # MAE pretraining size: the abs-pos table is interpolated to the input grid
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4.0,
    qkv_bias=True,
    drop_path_rate=0.1,
    window_size=14,
    global_block_indexes=[2, 5, 8, 11],
    use_rel_pos=True,
    rel_pos_input_size=1024,
    freeze_blocks=0,  # k: freeze patch embed + blocks 0..k-1; -1: whole ViT
    out_feature="last_feat",
    # backbone-family options (issue 35, backbones/families.py), VisionTransformer's defaults (a plain MAE ViT):
    # listed so that `model.backbone.net.<option>=...` overrides (configs/studies/backbone_families.py) are known keys
    init_values=None,
    use_rel_pos_bias=False,
    reg_tokens=0,
    pre_norm=False,
    norm_eps=1e-6,
    act_layer="gelu",
    mlp_layer="mlp",
    scale_mlp=False,
    use_rot_pos_emb=False,
    ref_feat_shape=None,
    resample_patch_embed=False,
)

# ---------------------------------------------------------------- data (LSJ, 1024 px)
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=1024, target_width=1024),
    L(T.FixedSizeCrop)(crop_size=(1024, 1024), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.recompute_boxes = True  # boxes change with the crop
dataloader.train.total_batch_size = 64  # ViTDet: 64 GPUs x 1 image; other GPU counts keep it (accumulation)
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=1024, max_size=1024),
]

# ---------------------------------------------------------------- training
train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth"
train.reference_world_size = 64  # GPUs of ViTDet's run: its 1 image per GPU is the default per-GPU load
# A full detector of another class count as init_checkpoint is an error unless this is set: then its
# class-specific layers start from scratch (fine-tuning a detector on new classes).
train.new_class_heads = False
train.seed = -1  # < 0: random; detectron2's default_setup seeds every RNG with it
# Gradient clipping (detectron2's clipper); ViTDet trains without it.
train.clip_grad = dict(enabled=False, clip_type="full_model", clip_value=1.0, norm_type=2.0)

# 100 ep = 184375 iters * 64 images/iter / 118000 images/ep
train.max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=184375,
    ),
    warmup_length=250 / 184375,
    warmup_factor=0.001,
)

# AdamW (detectron2's parameter grouping: no weight decay on norms and pos_embed) + layer-wise lr
# decay from the shared backbones.lr_decay rule (patch/pos embed = layer 0, block i = i + 1,
# everything outside the ViT = depth + 1), the same multipliers as detectron2's get_vit_lr_decay_rate.
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(lr_decay_factor, num_layers=12, layer_decay=0.7,
                                          backbone_prefix="backbone.net.")
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
