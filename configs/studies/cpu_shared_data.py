"""CPU-sized transfer study on ../shared/data: MAE vs supervised vs scratch, partial fine-tuning.

  python tools/study.py --spec configs/studies/cpu_shared_data.py --output /tmp/study_cpu

Backbones: the 4-block ViT-Tiny of the CPU configs, pretrained on equal data: the 165 object crops of
fruits_nuts (3 classes, made by coco_crops_to_imagefolder) with MAE (tools/pretrain.py,
configs/mae_pretrain_vit_tiny_cpu.py; labels unused) and with the supervised objective
(configs/supervised_pretrain_vit_tiny_cpu.py); and random init. Tasks: Mask R-CNN on fruits_nuts (18
photos; trained and evaluated on the same images: there is no held-out split) and UperNet on camvid_mini
(60 train / 20 val). freeze_blocks 0 / 2 / -1 = 4 / 2 / 0 blocks fine-tuned. The iteration counts are
what fits ~10 minutes on 2 CPU cores (measured: 8 min 59 s for both pretrainings and all 18 cells, nothing
else running; per cell, one thread: pretraining ~3 s/epoch, a det cell ~15 s + 1.5 s/iter, a seg cell
~16 s + 0.3 s/iter): a smoke-scale comparison of the pipeline, not a result. When other jobs share the
cores, run it with OMP_NUM_THREADS=1 (inherited by every tool): oversubscribed OpenMP threads made the same
cells 5-10x slower here.
"""
name = "cpu_shared_data"
depth = 4
freeze_blocks = [0, 2, -1]
seeds = [0]
reference = "scratch"  # results.md: a table of each backbone - scratch
_crops = dict(json="../shared/data/fruits_nuts/trainval.json", images="../shared/data/fruits_nuts/images", min_size=16)
backbones = {
    "MAE": dict(pretrain=dict(config="configs/mae_pretrain_vit_tiny_cpu.py", crops=_crops,
                              opts=["epochs=20", "warmup_epochs=2", "save_every=20"])),
    "supervised": dict(pretrain=dict(config="configs/supervised_pretrain_vit_tiny_cpu.py", crops=_crops,
                                     opts=["epochs=20", "warmup_epochs=2", "save_every=20"])),
    "scratch": None,
}
_fruits = "../shared/data/fruits_nuts"
tasks = {
    "det": dict(kind="det", config="configs/coco_mask_rcnn_vit_tiny_cpu.py", iters=12,
                args=["--train-json", f"{_fruits}/trainval.json", "--train-images", f"{_fruits}/images",
                      "--val-json", f"{_fruits}/trainval.json", "--val-images", f"{_fruits}/images"],
                # at most 20 detections per image at test time (fruits_nuts has ~9): the CPU eval cost is
                # dominated by the box / mask heads on every kept detection
                opts=["train.log_period=5", "model.roi_heads.box_predictor.test_topk_per_image=20",
                      "model.proposal_generator.post_nms_topk=[256,50]"]),
    "seg": dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=60,
                opts=["param_scheduler.0.end={warmup}", "param_scheduler.1.begin={warmup}",
                      "param_scheduler.1.end={iters}"]),
}
