"""Pilot of the reference CPU study (configs/studies/cpu_reference.py): which segmentation schedule lets full
fine-tuning beat a frozen ViT, so that the freeze axis can show something.

  .venv/bin/python tools/reference_study.py --pilot --parallel 2   # results in benchmarks/study_reference/pilot/

Two backbones (scratch; MAE, the main study's 20-epoch pretraining with seed 0), full fine-tuning and a frozen ViT,
CamVid on the 20 labelled frames, fine-tuning seeds 0 and 1. Each task is one candidate schedule, added in the order
listed when the one before showed no gain of full fine-tuning over the frozen ViT: the CPU config's 300 iterations at
lr 3e-4, then lr 1e-3, then 900 iterations. The schedule is chosen on "all blocks - frozen" only, never on
MAE - scratch.
"""
name = "cpu_reference_pilot"
depth = 4
freeze_blocks = [0, -1]
seeds = [0, 1]
_data = "work_dirs/reference_data"
backbones = {
    "scratch": None,
    "MAE": dict(pretrain=dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=f"{_data}/pool", seeds=[0],
                              opts=["epochs=20", "warmup_epochs=2", "save_every=20", "progress=False"])),
}
_camvid = [f"{split}_dataloader.dataset.data_root={_data}/camvid_20" for split in ("train", "val", "test")]
_poly = ["param_scheduler.0.end={warmup}", "param_scheduler.1.begin={warmup}", "param_scheduler.1.end={iters}"]
_seg = "configs/camvid_upernet_vit_tiny_cpu.py"
tasks = {
    "seg300": dict(kind="seg", config=_seg, iters=300, opts=_camvid + _poly),
    "seg300_lr1e-3": dict(kind="seg", config=_seg, iters=300,
                          opts=_camvid + _poly + ["optim_wrapper.optimizer.lr=1e-3"]),
    "seg900_lr1e-3": dict(kind="seg", config=_seg, iters=900,
                          opts=_camvid + _poly + ["optim_wrapper.optimizer.lr=1e-3"]),
}
