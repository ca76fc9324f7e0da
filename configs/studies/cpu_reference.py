"""The reference CPU study: does MAE pretraining beat a random init on label-scarce segmentation, frozen and fully
fine-tuned? Two contrasts declared before the run; 4 MAE pretraining runs, paired with the 8 fine-tuning seeds.

  .venv/bin/python tools/reference_study.py --parallel 2                # data and this study (under an hour on
                                                                        # 2 CPU cores): benchmarks/study_reference/
  .venv/bin/python tools/reference_study.py --replicate 4 --parallel 2  # the two contrasts, 4 fresh seeds

The data under work_dirs/reference_data/ is built by tools/reference_study.py (harnesses/reference_study.py):
- pool/: the unlabelled pretraining pool: the photos of ../shared/data (the 60 CamVid train frames, the COCO and
  fruits_nuts photos, their object crops), 128 px on the short side, and 800 generated shape pictures;
- camvid_20/: CamVid with 20 labelled training frames (every third; label-scarce) and the 20 val frames.
Backbones: the 4-block ViT-Tiny of the CPU configs. MAE: 20 epochs on the pool, pretraining seeds 0-3, fine-tuning
seed i on run i mod 4 (`fine_tuning_seeds="paired"`: the paired differences sample the pretraining runs, so their
intervals include the pretraining variance; 8 runs did not fit the hour); scratch: random init. freeze_blocks
0 / -1 = all 4 / no blocks fine-tuned. The segmentation schedule (900 iterations at lr 1e-3) comes from the pilot
(configs/studies/cpu_reference_pilot.py, results in benchmarks/study_reference/pilot/), chosen on "all blocks -
frozen", never on MAE - scratch.
"""
name = "cpu_reference"
depth = 4
freeze_blocks = [0, -1]
seeds = [0, 1, 2, 3, 4, 5, 6, 7]
reference = "scratch"
contrasts = [dict(a="MAE", b="scratch", task="seg", freeze=[0, -1])]
_data = "work_dirs/reference_data"
backbones = {
    "scratch": None,
    "MAE": dict(pretrain=dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=f"{_data}/pool",
                              opts=["epochs=20", "warmup_epochs=2", "save_every=20", "progress=False"],
                              seeds=[0, 1, 2, 3], fine_tuning_seeds="paired")),
}
tasks = {
    "seg": dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=900,
                opts=[f"{split}_dataloader.dataset.data_root={_data}/camvid_20" for split in ("train", "val", "test")]
                + ["param_scheduler.0.end={warmup}", "param_scheduler.1.begin={warmup}",
                   "param_scheduler.1.end={iters}", "optim_wrapper.optimizer.lr=1e-3"]),
}
