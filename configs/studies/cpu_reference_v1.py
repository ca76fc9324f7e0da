"""The first reference CPU study (2026-12-03), kept so that its committed results can be re-read:
MAE at three pretraining lengths vs supervised vs scratch, partial fine-tuning, 3 seeds, no declared contrasts.

  .venv/bin/python tools/reference_study.py --reread   # benchmarks/study_reference/v1/results.csv -> reread.md

Superseded by configs/studies/cpu_reference.py (benchmarks/study_reference/README.md says what changed and why).
Its data was built by the harness of that time (commit bd0974e): the pool and camvid_20 as today, plus
shape_classes/ (one generated shape per picture, 20 training pictures per class) for the classification task.
Backbones: the 4-block ViT-Tiny of the CPU configs. MAE-5/20/80: one MAE run of 80 epochs on the pool, taken after
5, 20 and 80 epochs; supervised: 30 epochs on the crops; scratch: random init.
freeze_blocks 0 / 2 / 3 / -1 = all 4 / last 2 / last 1 / no blocks fine-tuned.
"""
name = "cpu_reference_v1"
depth = 4
freeze_blocks = [0, 2, 3, -1]
seeds = [0, 1, 2]
reference = "scratch"  # results.md: each backbone - scratch, paired by seed
_data = "work_dirs/reference_data"
_mae = dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=f"{_data}/pool",
            opts=["epochs=80", "warmup_epochs=4", "save_every=10", "progress=False"])
backbones = {
    "scratch": None,
    "supervised": dict(pretrain=dict(config="configs/supervised_pretrain_vit_tiny_cpu.py", data=f"{_data}/crops",
                                     opts=["epochs=30", "warmup_epochs=3", "save_every=30", "progress=False"])),
    "MAE-5": dict(pretrain=_mae, epoch=5),
    "MAE-20": dict(pretrain=_mae, epoch=20),
    "MAE-80": dict(pretrain=_mae, epoch=80),
}
tasks = {
    "seg": dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=60,
                opts=[f"{split}_dataloader.dataset.data_root={_data}/camvid_20" for split in ("train", "val", "test")]
                + ["param_scheduler.0.end={warmup}", "param_scheduler.1.begin={warmup}",
                   "param_scheduler.1.end={iters}"]),
    "cls": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py", epochs=30,
                args=["--data", f"{_data}/shape_classes"], opts=["warmup_epochs=3", "eval_every={iters}"]),
}
