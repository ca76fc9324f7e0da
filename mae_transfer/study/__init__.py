"""Transfer studies: backbones x tasks x freeze_blocks x seeds, each cell a real fine-tune + evaluation.

A study spec is a plain-Python config (loaded with `mae_transfer.config.load_config`):

    depth = 12                                  # ViT depth: blocks fine-tuned = depth - freeze (-1 -> 0)
    freeze_blocks = [0, 4, 8, 10, 12, -1]       # -1: whole ViT frozen (the linear-probe analogue)
    seeds = [0]
    backbones = {                               # name -> where its weights come from
        "MAE": "checkpoints/mae_pretrain_vit_base.pth",   # a file in any format mae_transfer.checkpoint reads
        "scratch": None,                                  # None / "random": random init
        "MAE tiny": dict(checkpoint=None,                 # produced by tools/pretrain.py when missing
                         pretrain=dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data="images/",
                                       # or crops=dict(json=..., images=..., min_size=16): a labelled
                                       # ImageFolder of COCO object crops (coco_crops_to_imagefolder)
                                       opts=["epochs=40"])),
    }
    reference = "scratch"                       # optional: results.md adds backbone - reference per cell
    contrasts = [dict(a="MAE", b="scratch", task="det", freeze=[0, -1])]  # optional: the confirmatory family
                                                # (study_claims); pretrain=dict(..., seeds=[0, 1]): a run per seed
    tasks = {
        "cls": dict(kind="cls", config="configs/cls_finetune_vit_b.py", epochs=100,   # classification:
                    args=["--data", "/path/to/imagenet"]),                        # length in epochs
        "det": dict(kind="det", config="configs/coco_mask_rcnn_vit_b.py", iters=184375,
                    args=["--train-json", ...], opts=["train.eval_period=5000"]),
        "seg": dict(kind="seg", config="configs/ade20k_upernet_vit_b.py", iters=160000,
                    args=["--launcher", "pytorch"], opts=["param_scheduler.1.end={iters}"],  # mmseg --cfg-options
                    launcher=["torchrun", "--nproc_per_node", "8"]),  # replaces `python` (default)
    }

Before the first cell runs, every input of every backbone and cell is checked and all problems are reported in
one error (`check_inputs`). Every cell runs its task kind's tool (`mae_transfer.task_kinds`: `tools/train_det.py`
(detectron2), `tools/train_seg.py` (mmseg) or `tools/finetune_cls.py` (classification: its `epochs` replace `iters`))
in a subprocess,
with its own output folder `OUTPUT/cells/<backbone>__<task>__freeze<k>__seed<s>/`. `{iters}`, `{warmup}`
(iters // 10, at least 1) and `{seed}` in a task's args/opts are replaced per cell. A cell's metrics are
what its tool wrote to `eval_metrics.json` (`mae_transfer.metrics`; no framework log is read). Finished cells
hold `done.json` (their metrics) and are skipped on a re-run; a cell with checkpoints but no `done.json` was
interrupted and is continued with the tool's `--resume`, and so is an interrupted pretraining run before the
backbone of its end is exported (`study_spec.backbone_commands`). After every cell, `results.csv` (one row per
finished cell) and `results.md` (rows: backbones, columns: blocks fine-tuned, cells: top-1 / AP^box /
AP^mask / mIoU, mean ± std over seeds, n seeds; with `reference = "scratch"` (a backbone name) also a table of
backbone - reference per cell, paired by seed) are rewritten atomically, and `plot.png` (metric vs blocks
fine-tuned, one line per backbone, one panel per metric, error bars = std over seeds, a caption naming tasks,
metrics, iterations and seeds) when the run ends, fails or is interrupted (Ctrl-C keeps every finished
cell; a re-run with nothing left to do rewrites all three).
"""

# The study in parts, each imported by its own path (this package re-exports nothing): `spec` (the spec and its
# commands), `inputs` (every input checked before the first cell), `run` (running cells, metrics files),
# `report` (results tables and plot), `claims` (confirmatory / exploratory claims), `stats` (the statistics),
# `cluster` (Slurm jobs through submitit).
__all__ = ["claims", "cluster", "inputs", "report", "run", "spec", "stats"]
