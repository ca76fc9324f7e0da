"""MAE pretraining of ViT-H/14: the ViT-B recipe with the huge encoder (patch 14, 16x16 grid at 224)."""
_base_ = "mae_pretrain_vit_b.py"

encoder = "vit_huge_patch14_224"
