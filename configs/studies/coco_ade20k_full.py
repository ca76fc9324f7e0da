"""The MAE paper's transfer comparison at full scale (GPU): MAE ViT-B vs supervised DeiT-B vs random init,
partial fine-tuning 12 / 8 / 4 / 2 / 0 blocks + frozen ViT, COCO Mask R-CNN (ViTDet recipe, 100 epochs)
and ADE20K UperNet (160k iterations).

  python tools/study.py --spec configs/studies/coco_ade20k_full.py --output work_dirs/studies/full

Weights (not downloadable on the CPU machines; fetch them where you run this):
  checkpoints/mae_pretrain_vit_base.pth        https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth
  checkpoints/deit_base_patch16_224-b5f2ef4d.pth  https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth
Both are read by mae_transfer.checkpoint (official MAE / DeiT formats); the DeiT classifier head is dropped.
Data: $DETECTRON2_DATASETS/coco (detectron2 builtin coco_2017_train / val) and data/ade/ADEChallengeData2016.
8 GPUs per cell: detectron2 spawns its workers (--num-gpus 8), mmseg is started by torchrun. On a Slurm cluster
(`--executor slurm`) every cell is a job with the task's `slurm=dict(...)` resources (the job sets up each tool's
distributed mode itself: the torchrun / --num-gpus above are for a single machine):

  python tools/study.py --spec configs/studies/coco_ade20k_full.py --output-dir work_dirs/study_full \
      --executor slurm --slurm partition=gpu --slurm account=myproject
"""
name = "coco_ade20k_vit_b"
depth = 12
freeze_blocks = [0, 4, 8, 10, 12, -1]
seeds = [0]
reference = "random init"  # results.md: a table of each backbone - random init
backbones = {
    "MAE ViT-B": "checkpoints/mae_pretrain_vit_base.pth",
    "supervised DeiT-B": "checkpoints/deit_base_patch16_224-b5f2ef4d.pth",
    "random init": None,
}
tasks = {
    "coco": dict(kind="det", config="configs/coco_mask_rcnn_vit_b.py", iters=184375, checkpoint_period=5000,
                 args=["--num-gpus", "8"], slurm=dict(gpus_per_node=8, cpus_per_task=80, mem="0", time="72:00:00"),
                 # the config's schedule is in fractions of max_iter (LRMultiplier), so only max_iter changes
                 opts=[]),
    "ade20k": dict(kind="seg", config="configs/ade20k_upernet_vit_b.py", iters=160000, checkpoint_period=16000,
                   launcher=["torchrun", "--nproc_per_node", "8"], args=["--launcher", "pytorch"],
                   opts=["param_scheduler.1.end={iters}"],
                   slurm=dict(gpus_per_node=8, cpus_per_task=10, mem="0", time="48:00:00")),
}
