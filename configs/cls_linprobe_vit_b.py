"""Linear probing of an MAE ViT-B/16 on ImageNet-1k (He et al., 2021, Table 10; LINPROBE.md: 68.0 top-1).

Frozen encoder; cls token after the final norm -> BatchNorm1d(affine=False, eps 1e-6) -> linear head
(weights trunc-normal 0.01). LARS (momentum 0.9), no weight decay, blr 0.1 at effective batch 16384
(512 x 32 GPUs): lr = 6.4; 90 epochs with 10 warmup. RandomResizedCrop + flip only.
Run: torchrun --nproc_per_node 8 tools/finetune_cls.py --config configs/cls_linprobe_vit_b.py \
         --data /path/to/imagenet --finetune mae_pretrain_vit_base.pth accum_iter=4
"""
_base_ = "cls_finetune_vit_b.py"

mode = "linprobe"
global_pool = "token"
drop_path = 0.0
freeze_blocks = -1
head_init_std = 0.01

batch_size = 512
auto_augment = None
reprob = 0.0
mixup = 0.0
cutmix = 0.0
smoothing = 0.0

optimizer = "lars"
epochs = 90
warmup_epochs = 10
blr = 0.1
min_lr = 0.0
weight_decay = 0.0
layer_decay = 1.0
amp = "none"
