"""Linear probing of an MAE ViT-L/16 on ImageNet-1k (LINPROBE.md: 75.8 top-1 with the 1600-epoch checkpoint):
the ViT-B probe with the large model (official: same blr 0.1, batch 16384, 90 epochs)."""
_base_ = "cls_linprobe_vit_b.py"

model = "vit_large_patch16_224"
