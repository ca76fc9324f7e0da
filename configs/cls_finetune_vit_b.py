"""End-to-end fine-tuning of an MAE ViT-B/16 on ImageNet-1k: the paper's recipe (He et al., 2021, Table 9;
facebookresearch/mae FINETUNE.md: 83.6 top-1 from the 1600-epoch MAE ViT-B).

Effective batch 1024 = batch_size x accum_iter x processes (32 x 1 x 32 GPUs in the paper; e.g. on 8 GPUs use
accum_iter=4). lr = blr x effective batch / 256 = 2e-3. Global average pooling + fc_norm head.
Run: torchrun --nproc_per_node 8 tools/finetune_cls.py --config configs/cls_finetune_vit_b.py \
         --data /path/to/imagenet --finetune mae_pretrain_vit_base.pth accum_iter=4
"""
mode = "finetune"

# model
model = "vit_base_patch16_224"
encoder_overrides = {}
img_size = 224
num_classes = None  # from the class folders (1000 for ImageNet-1k)
global_pool = "avg"
drop_path = 0.1
finetune = ""
allow_pickle = False
freeze_blocks = 0
head_init_std = 2e-5

# data: RandAugment 9/0.5, random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1
data_path = None
batch_size = 32
accum_iter = 1
num_workers = 10
crop_scale = (0.08, 1.0)
auto_augment = "rand-m9-mstd0.5-inc1"
color_jitter = None
reprob = 0.25
remode = "pixel"
recount = 1
eval_crop_pct = 224 / 256
mixup = 0.8
cutmix = 1.0
cutmix_minmax = None
mixup_prob = 1.0
mixup_switch_prob = 0.5
mixup_mode = "batch"
smoothing = 0.1

# optimisation: AdamW, layer-wise lr decay 0.65, wd 0.05, 100 epochs with 5 warmup, cosine to 1e-6
optimizer = "adamw"
epochs = 100
warmup_epochs = 5
blr = 5e-4
lr = None
min_lr = 1e-6
weight_decay = 0.05
layer_decay = 0.65
betas = (0.9, 0.999)
momentum = 0.9
clip_grad = None
amp = "bf16"  # the official code uses fp16 + GradScaler (amp="fp16", GPU only)

# run
seed = 0
device = "auto"
output_dir = None
resume = "auto"
save_every = 10
save_epochs = []  # further epochs with a numbered checkpoint
eval_every = 1
progress = True
