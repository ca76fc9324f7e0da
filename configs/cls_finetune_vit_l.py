"""End-to-end fine-tuning of an MAE ViT-L/16 on ImageNet-1k (FINETUNE.md: 85.9 top-1): ViT-B's recipe with
blr 1e-3, layer decay 0.75, drop path 0.2 and 50 epochs."""
_base_ = "cls_finetune_vit_b.py"

model = "vit_large_patch16_224"
drop_path = 0.2
epochs = 50
blr = 1e-3
layer_decay = 0.75
