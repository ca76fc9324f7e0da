"""CPU-sized classification study on ../shared/data: MAE vs supervised vs scratch, partial fine-tuning
(the MAE paper's Fig. 9 protocol, at toy scale).

  python tools/coco_to_imagefolder.py --json ../shared/data/fruits_nuts/trainval.json \
      --images ../shared/data/fruits_nuts/images --output-dir work_dirs/fruit_crops --val-fraction 0.25
  python tools/study.py --spec configs/studies/cpu_cls_crops.py --output work_dirs/studies/cpu_cls_crops

Data: the 165 object crops of fruits_nuts (date / fig / hazelnut), split by photo: 133 train / 32 val crops
(val majority class: 46.9%). Backbones, pretrained on the train crops only (equal data): MAE (labels unused)
and the supervised objective, 20 epochs each; and random init. Task: end-to-end / partial fine-tuning with
the tiny fine-tuning recipe (RandAugment, mixup/cutmix, LLRD AdamW), 12 epochs; freeze_blocks 0 / 2 / -1 =
4 / 2 / 0 blocks fine-tuned. About 3-4 minutes on 2 CPU cores.
"""
name = "cpu_cls_crops"
depth = 4
freeze_blocks = [0, 2, -1]
seeds = [0]
reference = "scratch"  # results.md: a table of each backbone - scratch
_train = "work_dirs/fruit_crops/train"
backbones = {
    "MAE": dict(pretrain=dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=_train,
                              opts=["epochs=20", "warmup_epochs=2", "save_every=20"])),
    "supervised": dict(pretrain=dict(config="configs/supervised_pretrain_vit_tiny_cpu.py", data=_train,
                                     opts=["epochs=20", "warmup_epochs=2", "save_every=20"])),
    "scratch": None,
}
tasks = {
    "cls": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py", epochs=12,
                args=["--data", "work_dirs/fruit_crops"], opts=["warmup_epochs=2"]),
}
