"""Tiny CPU variant of cls_finetune_vit_b.py: same keys and code path (RandAugment, random erasing,
mixup/cutmix, label smoothing, LLRD AdamW, warmup + cosine), small sizes: the 4-block ViT-Tiny of
mae_pretrain_vit_tiny_cpu.py at 96 px, batch 16, absolute lr, a few seconds per epoch on ~100 crops.
Data: an ImageFolder of COCO object crops, e.g.
  python tools/coco_to_imagefolder.py --json ../shared/data/fruits_nuts/trainval.json \
      --images ../shared/data/fruits_nuts/images --output-dir /tmp/fruit_crops --val-fraction 0.25
Run: python tools/finetune_cls.py --config configs/cls_finetune_vit_tiny_cpu.py --data /tmp/fruit_crops \
         --finetune MAE_CKPT --output-dir /tmp/cls_tiny
"""
_base_ = "cls_finetune_vit_b.py"

model = "vit_tiny_patch16_224"
encoder_overrides = {"depth": 4}
img_size = 96
crop_scale = (0.35, 1.0)  # object crops are already tight

batch_size = 16
num_workers = 0
epochs = 30
warmup_epochs = 3
lr = 1e-3
amp = "none"  # no bf16 hardware on these CPUs
device = "cpu"
save_every = 10
progress = False
