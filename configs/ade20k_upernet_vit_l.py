# UperNet + plain ViT-L/16 on ADE20K. Same pipeline, heads and schedule shape as the ViT-B config
# (`ade20k_upernet_vit_b.py`); model width 1024, blocks 7/11/15/23 for the pyramid.
# The MAE paper gives no ViT-L segmentation hyper-parameters ("we search for the optimal learning rate"),
# so the optimiser/schedule follow the published BEiT-L ADE20K recipe:
#   mmseg configs/beit/beit-large_upernet_8xb1-160k_ade20k-640x640.py (= microsoft/unilm beit
#   semantic_segmentation upernet_beit_large_24_640_slide_160k_ade20k): AdamW lr 2e-5, betas (0.9, 0.999),
#   wd 0.05, layer decay 0.95, drop path 0.2, 3000-iter linear warmup (start 1e-6) then poly power 1.0
#   to 0, 160k iters, effective batch 16 (8 GPUs x 1 x 2 accumulation; here 8 x 2).
# Kept from the MAE/ViT-B recipe: 512 crops and slide 512/341 (BEiT-L used 640 crops).
_base_ = ['./ade20k_upernet_vit_b.py']

embed_dim = 1024
depth = 24
num_heads = 16
out_indices = (7, 11, 15, 23)
head_channels = 1024
warmup_iters = 3000
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
