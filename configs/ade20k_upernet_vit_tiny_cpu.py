# CPU-sized variant of `ade20k_upernet_vit_b.py`: same model/pipeline/optimiser code path, smaller sizes.
# ViT 192 wide x 4 blocks (3 heads), 128 px crops, small heads, short schedule, no worker processes.
# Data: ../shared/data/ade20k_sample (exact ADEChallengeData2016 layout; it only has the validation
# split, which this smoke config also trains on).
_base_ = ['./ade20k_upernet_vit_b.py']

crop_size = (128, 128)
train_scale = (512, 128)
embed_dim = 192
depth = 4
out_indices = (0, 1, 2, 3)
max_iters = 200
warmup_iters = 20
data_root = '../shared/data/ade20k_sample/ADEChallengeData2016'
norm_cfg = dict(type='SyncBN', requires_grad=True)
reference_world_size = None  # no published run: the batch of 4 on one process is the recipe

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size[0], embed_dim=embed_dim, depth=depth, num_heads=3, out_indices=out_indices),
    neck=dict(embed_dim=embed_dim),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=64),
    auxiliary_head=dict(in_channels=embed_dim, channels=32),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(85, 85)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=train_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75, ignore_index=255),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=train_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root,
                 data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(paramwise_cfg=dict(num_layers=depth))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=warmup_iters, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=100)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=100))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
visualizer = dict(vis_backends=vis_backends)
