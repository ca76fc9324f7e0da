"""Supervised baseline on equal data, CPU size: the tiny ViT of mae_pretrain_vit_tiny_cpu.py trained as a
classifier (cls token -> linear head, cross-entropy with label smoothing) by the same engine, data
loading, schedule and checkpoints. The decoder / masking keys of the base config are unused here.

The data is a labelled ImageFolder (class = first-level subfolder; num_classes is inferred), e.g. the
object crops of a COCO json made by `mae_transfer.coco.coco_crops_to_imagefolder`:
  python -c "from mae_transfer.coco import coco_crops_to_imagefolder as c; \
      c('../shared/data/fruits_nuts/trainval.json', '../shared/data/fruits_nuts/images', '/tmp/crops', 16)"
  python tools/pretrain.py --config configs/supervised_pretrain_vit_tiny_cpu.py --data /tmp/crops \
      --output-dir /tmp/sup_tiny
"""
_base_ = "mae_pretrain_vit_tiny_cpu.py"

objective = "supervised"
num_classes = None  # from the class folders
label_smoothing = 0.1
crop_scale = (0.35, 1.0)  # object crops are already tight: milder than MAE's 0.2
lr = 5.0e-4
