"""The reference CPU study: MAE at three pretraining lengths vs supervised vs scratch, partial fine-tuning.

  .venv/bin/python tools/reference_study.py        # data, this study, the pretraining evidence; results in
                                                   # benchmarks/study_reference/ (under an hour on 2 CPU cores)

The data under work_dirs/reference_data/ is built by tools/reference_study.py (harnesses/reference_study.py):
- pool/: the unlabelled pretraining pool: the photos of ../shared/data (the 60 CamVid train frames, the COCO and
  fruits_nuts photos, their object crops), 128 px on the short side, and 800 generated shape pictures;
- crops/: the object crops with their labels (COCO / fruits_nuts categories): the supervised backbone's data;
- camvid_20/: CamVid with 20 labelled training frames (every third; label-scarce) and the 20 val frames;
- shape_classes/: one generated shape per picture, class by outline only (colour and background drawn
  independently): 20 training pictures per class, 100 val pictures per class.
Backbones: the 4-block ViT-Tiny of the CPU configs. MAE-5/20/80: one MAE run of 80 epochs on the pool, taken after
5, 20 and 80 epochs (one pretraining: `epoch=`); supervised: 30 epochs on the crops; scratch: random init.
freeze_blocks 0 / 2 / 3 / -1 = all 4 / last 2 / last 1 / no blocks fine-tuned. Nothing here was tuned toward a
result: the lengths are what fits the hour.
"""
name = "cpu_reference"
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
