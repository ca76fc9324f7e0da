"""MAE pretraining of ViT-L/16: the ViT-B recipe with the large encoder (1600 epochs, effective batch 4096)."""
_base_ = "mae_pretrain_vit_b.py"

encoder = "vit_large_patch16_224"
