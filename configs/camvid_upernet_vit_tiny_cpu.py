# Custom data: a CamVid-style folder (SegNet layout) with the tiny CPU model of
# `ade20k_upernet_vit_tiny_cpu.py`. Layout: <root>/{train,trainannot,val,valannot}/*.png, label png values
# 0-10 = classes, 11 = Unlabelled (ignored). mmseg's BaseSegDataset with metainfo: no dataset class needed.
# Point it at your data with --cfg-options train_dataloader.dataset.data_root=... (and val/test).
_base_ = ['./ade20k_upernet_vit_tiny_cpu.py']

num_classes = 11
ignore_index = 11
crop_size = (128, 128)
train_scale = (320, 240)  # 480x360 frames at 2/3 size, x0.5-2.0 jitter
data_root = '../shared/data/camvid_mini'
max_iters = 300
warmup_iters = 30
metainfo = dict(
    classes=('Sky', 'Building', 'Pole', 'Road', 'Pavement', 'Tree', 'SignSymbol', 'Fence', 'Car',
             'Pedestrian', 'Bicyclist'),
    palette=[[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
             [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]])

model = dict(
    data_preprocessor=dict(seg_pad_val=ignore_index),
    decode_head=dict(num_classes=num_classes, ignore_index=ignore_index),
    auxiliary_head=dict(num_classes=num_classes, ignore_index=ignore_index))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale=train_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75, ignore_index=ignore_index),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=train_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.png',
               seg_map_suffix='.png', reduce_zero_label=False, ignore_index=ignore_index)
train_dataloader = dict(
    dataset=dict(_delete_=True, data_prefix=dict(img_path='train', seg_map_path='trainannot'),
                 pipeline=train_pipeline, **dataset))
val_dataloader = dict(
    dataset=dict(_delete_=True, data_prefix=dict(img_path='val', seg_map_path='valannot'),
                 pipeline=test_pipeline, **dataset))
test_dataloader = val_dataloader
val_evaluator = dict(ignore_index=ignore_index)
test_evaluator = val_evaluator

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=warmup_iters, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
# Short CPU runs usually start from a tiny (or no) pretrained backbone: a larger lr and milder layer
# decay than the ViT-B fine-tuning recipe.
optim_wrapper = dict(optimizer=dict(lr=3e-4), paramwise_cfg=dict(layer_decay_rate=0.9))
