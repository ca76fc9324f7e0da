# UperNet + plain ViT-B/16 on ADE20K, the MAE paper's semantic-segmentation setup (He et al. 2021, A.4:
# "UperNet following the semantic segmentation code of BEiT ... fine-tune end-to-end for 100 epochs with a
# batch size of 16", i.e. about 126k iterations on ADE20K's 20,210 training images), with the schedule and
# hyper-parameters of mmseg's mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py (= BEiT's code, whose
# schedule_160k gives the 160k iterations; mmseg's MAE reproduction, 48.13 mIoU, used it):
# 512x512 crops, AdamW lr 1e-4 betas (0.9, 0.999) wd 0.05, layer decay 0.65, drop path 0.1,
# 1500-iter linear warmup then poly (power 1, eta_min 0), 160k iters (about 127 epochs), 8 GPUs x 2 images,
# slide inference 512 / stride 341, mIoU.
# Backbone: our ViT (`backbones/mmseg.py`, type='MAEViT'); neck: mmseg's Feature2Pyramid;
# heads: mmseg's UPerHead + FCNHead. LLRD: `backbones.lr_decay` (shared with detectron2).
# Train: python tools/train_seg.py configs/ade20k_upernet_vit_b.py --init-checkpoint mae_pretrain.pth
custom_imports = dict(imports=['backbones.mmseg', 'mae_transfer.segmentation.checkpoint'], allow_failed_imports=False)
default_scope = 'mmseg'

# ---------------------------------------------------------------- sizes (tiny/custom configs override)
crop_size = (512, 512)
train_scale = (2048, 512)
num_classes = 150
ignore_index = 255
embed_dim = 768
depth = 12
num_heads = 12
out_indices = (3, 5, 7, 11)
head_channels = 768
num_layers = depth  # layer-decay depth
norm_cfg = dict(type='SyncBN', requires_grad=True)  # tools/train_seg.py reverts to BN without DDP

# ---------------------------------------------------------------- model
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=ignore_index,
    size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='MAEViT',
        # mmseg MAE / BEiT layout, parameter for parameter (163,877,228 with these heads): position table
        # at the 32x32 fine-tuning grid (resized once from the 224 checkpoint), a zero-initialised relative
        # position bias table per block and layer scale 1.0 (mmseg `MAE(init_values=1.0)`).
        img_size=crop_size[0],
        use_rel_pos_bias=True,
        init_values=1.0,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        drop_path_rate=0.1,
        out_indices=out_indices,
        with_cls_token=True,
        init_checkpoint=None,  # any format mae_transfer.checkpoint imports (--init-checkpoint)
        freeze_blocks=0,  # --freeze-blocks
        grad_checkpointing=False,
        # backbone-family options (issue 35, backbones/families.py) at VisionTransformer's defaults, listed so
        # that `--cfg-options model.backbone.<option>=...` (configs/studies/backbone_families.py) are known keys
        reg_tokens=0,
        pre_norm=False,
        norm_eps=1e-6,
        act_layer='gelu',
        mlp_layer='mlp',
        scale_mlp=False,
        use_rot_pos_emb=False,
        ref_feat_shape=None,
        resample_patch_embed=False),
    neck=dict(type='Feature2Pyramid', embed_dim=embed_dim, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    decode_head=dict(
        type='UPerHead',
        in_channels=[embed_dim] * 4,
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=head_channels,
        dropout_ratio=0.1,
        num_classes=num_classes,
        ignore_index=ignore_index,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=embed_dim,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        ignore_index=ignore_index,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# ---------------------------------------------------------------- data (ADEChallengeData2016 layout)
dataset_type = 'ADE20KDataset'
data_root = 'data/ade/ADEChallengeData2016'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=train_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75, ignore_index=ignore_index),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=train_scale, keep_ratio=True),
    # annotations after Resize: the metric compares with the original-size ground truth
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,  # images per GPU; x reference_world_size 8 = total batch 16
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'], ignore_index=ignore_index)
test_evaluator = val_evaluator

# ---------------------------------------------------------------- optimisation
max_iters = 160000
warmup_iters = 1500
# mmseg's MAE run: 8 GPUs x 2 images under fp16 AMP. tools/train_seg.py keeps this total batch of 16 on any GPU
# count (gradient accumulation) and trains with mmengine's AmpOptimWrapper (loss_scale='dynamic') on GPUs under
# amp='fp16' ('bf16' where the GPU has it, 'none': fp32); CPU runs stay fp32.
reference_world_size = 8
amp = 'fp16'
optim_wrapper = dict(
    type='OptimWrapper',  # tools/train_seg.py makes it an AmpOptimWrapper on GPUs (amp above)
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='MaeLayerDecayOptimizerConstructor',  # backbones.mmseg (shared LLRD + no-decay rules)
    paramwise_cfg=dict(num_layers=num_layers, layer_decay_rate=0.65))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=warmup_iters, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=16000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# ---------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
