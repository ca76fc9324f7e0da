"""Tiny CPU variant of cls_linprobe_vit_b.py (frozen 4-block ViT-Tiny at 96 px, BatchNorm + linear head, LARS).
An absolute lr replaces blr (blr 0.1 is set for batch 16384). On the fruits_nuts crops: 8 epochs, val top-1
46.9 (majority class) -> 56-59 with lr 1.0; lr 0.1 stays at the majority class, lr 6.4 diverges at first."""
_base_ = "cls_linprobe_vit_b.py"

model = "vit_tiny_patch16_224"
encoder_overrides = {"depth": 4}
img_size = 96
crop_scale = (0.35, 1.0)

batch_size = 16
num_workers = 0
epochs = 30
warmup_epochs = 3
lr = 1.0  # LARS steps are relative to |w| (trust ratio 0.001): ~240 steps need a larger lr than 6.4 x 16/16384
device = "cpu"
save_every = 10
progress = False
