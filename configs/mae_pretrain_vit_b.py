"""MAE pretraining of ViT-B/16 on ImageNet-1k: the paper's recipe (He et al., 2021, Table 8 / PRETRAIN.md).

Effective batch 4096 = batch_size x accum_iter x processes (64 x 1 x 64 GPUs in the paper; e.g. on
8 GPUs use accum_iter=8). lr = blr x effective batch / 256 = 2.4e-3.
Run: python tools/pretrain.py --config configs/mae_pretrain_vit_b.py --data /path/to/imagenet/train
"""
# model
encoder = "vit_base_patch16_224"
encoder_overrides = {}
img_size = 224
decoder_embed_dim = 512
decoder_depth = 8
decoder_num_heads = 16
mask_ratio = 0.75
masking = "random"
norm_pix_loss = True

# data: RandomResizedCrop(scale 0.2-1.0, bicubic) + horizontal flip only
data_path = None
batch_size = 64  # per process
accum_iter = 1
num_workers = 10
crop_scale = (0.2, 1.0)

# optimisation
epochs = 1600  # the released checkpoints; the paper's ablations use 800
warmup_epochs = 40
blr = 1.5e-4
lr = None
min_lr = 0.0
weight_decay = 0.05
betas = (0.9, 0.95)
amp = "bf16"  # the official code uses fp16 + GradScaler (amp="fp16", GPU only); bf16 needs no scaler
compile = False  # True: torch.compile the training step (first steps slower while inductor compiles)

# run
seed = 0
device = "auto"
output_dir = None
resume = "auto"
save_every = 20
save_epochs = []  # further epochs with a numbered checkpoint
recon_images = 4
progress = True
