# UperNet + plain ViT-L/16 on ADE20K. Same pipeline, heads and schedule shape as the ViT-B config
# (`ade20k_upernet_vit_b.py`); model width 1024, blocks 7/11/15/23 for the pyramid.
# The MAE paper gives no ViT-L segmentation hyper-parameters ("we search for the optimal learning rate"),
# so the optimiser/schedule follow the published BEiT-L ADE20K recipe:
#   microsoft/unilm beit/semantic_segmentation/configs/beit/upernet/upernet_beit_large_24_640_slide_160k_ade20k.py
#   (ported as mmseg configs/beit/beit-large_upernet_8xb1-160k_ade20k-640x640.py): AdamW lr 2e-5, betas
#   (0.9, 0.999), wd 0.05, layer decay 0.95, drop path 0.2, linear warmup (start 1e-6) then poly power 1.0 to 0,
#   8 GPUs x 1 image x update_interval 2 = batch 16 per optimizer step.
# Units: BEiT's run is schedule_320k (320k runner iterations = micro-batches) with update_interval 2, "the total
# update step keep 160k" (its comment); mmcv's LrUpdaterHook counts runner iterations, so its
# warmup_iters=3000 is 1500 optimizer steps. This config counts optimizer steps (tools/train_seg.py multiplies
# by the accumulation it adds): 1500 warmup steps, 160k steps in all, as BEiT-L's run.
# (mmseg's 1.x port keeps warmup end=3000 and PolyLR end=160000 in loader iterations of its 320k loop.)
# Kept from the MAE/ViT-B recipe: 512 crops and slide 512/341 (BEiT-L used 640 crops), 8 GPUs x 2 images.
_base_ = ['./ade20k_upernet_vit_b.py']

embed_dim = 1024
depth = 24
num_heads = 16
out_indices = (7, 11, 15, 23)
head_channels = 1024
warmup_iters = 1500  # optimizer steps (BEiT-L: 3000 runner iterations at update_interval 2)
max_iters = 160000

model = dict(
    backbone=dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, out_indices=out_indices,
                  drop_path_rate=0.2),
    neck=dict(embed_dim=embed_dim),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=head_channels),
    auxiliary_head=dict(in_channels=embed_dim))
optim_wrapper = dict(
    optimizer=dict(lr=2e-5),
    paramwise_cfg=dict(num_layers=depth, layer_decay_rate=0.95))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=warmup_iters, end=max_iters),
]
