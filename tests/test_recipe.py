"""The recipe on the GPUs a user has (issue 22): --plan of train_det.py / train_seg.py on 1, 8 and 64 GPUs, the
linear rule of --total-batch, bad input, and gradient accumulation equal to one large batch (detectron2 trainer
step, mmengine accumulative_counts), a 2-process gloo run with accumulation that resumes."""
from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_transfer import recipe as rcp
from mae_transfer.cli import run_cli
from mae_transfer.errors import MaeTransferError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_DET = str(CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py")


def _plan(tool: str, *args: str) -> dict:
    """tools/<tool>.py --plan as a user runs it: exit 0, one JSON object on stdout, the table on stderr."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *args, "--plan"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    plan = json.loads(proc.stdout)
    assert list(plan)[:9] == ["world_size", "images_per_gpu", "accumulation", "total_batch", "lr", "max_iter",
                              "warmup_iters", "amp", "activation_checkpointing"]
    assert f"recipe of tools/{tool}.py" in proc.stderr and "gradient accumulation" in proc.stderr
    return plan


# ------------------------------------------------------------------------------------------- plans
def test_vitdet_l_plan_keeps_batch_64_on_1_8_64_gpus():
    for gpus in (1, 8, 64):
        plan = _plan("train_det", "--config", "configs/coco_mask_rcnn_vit_l.py", "--num-gpus", str(gpus))
        assert plan["total_batch"] == 64 and plan["world_size"] == gpus
        assert plan["world_size"] * plan["images_per_gpu"] * plan["accumulation"] == 64
        assert plan["images_per_gpu"] <= 2 and plan["accumulation"] == 64 // gpus
        assert (plan["lr"], plan["max_iter"], plan["warmup_iters"], plan["milestones"]) == (
            1e-4, 184375, 250, [163889, 177546])
        assert plan["amp"] == "fp16" and plan["device"] == "cuda" and plan["epochs"] == 100.0
        assert plan["reference_total_batch"] == 64 and plan["reference_world_size"] == 64
        assert plan["norm_layers"] == "LN in box, mask, pyramid: batch-independent"


def test_vitdet_b_plan_total_batch_16_by_the_linear_rule():
    plan = _plan("train_det", "--config", "configs/coco_mask_rcnn_vit_b.py", "--num-gpus", "8", "--total-batch", "16")
    assert plan["lr"] == pytest.approx(2.5e-05) and plan["max_iter"] == 737500
    assert (plan["total_batch"], plan["images_per_gpu"], plan["accumulation"]) == (16, 1, 2)
    # auto_scale_workers: warmup, milestones and periods x 64/16, the same 100 epochs
    assert plan["warmup_iters"] == 1000 and plan["milestones"] == [163889 * 4, 177546 * 4]
    assert (plan["eval_period"], plan["checkpoint_period"], plan["epochs"]) == (20000, 20000, 100.0)


def test_ade20k_plan_total_batch_16_under_amp_on_1_and_8_gpus():
    for gpus, (ipg, accumulation, norm) in {1: (2, 8, "BN over 2 image(s)"), 8: (2, 1, "SyncBN over 16")}.items():
        plan = _plan("train_seg", "--config", "configs/ade20k_upernet_vit_b.py", "--num-gpus", str(gpus))
        assert plan["total_batch"] == 16 and plan["amp"] in ("fp16", "bf16") and plan["device"] == "cuda"
        assert (plan["images_per_gpu"], plan["accumulation"]) == (ipg, accumulation)
        assert plan["norm_layers"].startswith(norm) and "CPU trains in fp32" in plan["amp_detail"].replace(
            "machine without a CUDA GPU trains", "CPU trains")
        assert (plan["max_iter"], plan["warmup_iters"], plan["poly_end"], plan["lr"]) == (160000, 1500, 160000, 1e-4)


def test_tiny_configs_are_their_own_reference(capsys):
    """The CPU configs train as before: their batch on one process, no accumulation, fp32, nothing scaled."""
    from mmengine.config import Config

    from mae_transfer.detection import checks as det_checks
    from mae_transfer.detection import recipe as detection_recipe
    from mae_transfer.segmentation import recipe as segmentation_recipe

    cfg = det_checks.load_config(TINY_DET, [])
    plan = detection_recipe.plan(cfg, TINY_DET, 1, "cpu")
    assert (plan.images_per_gpu, plan.accumulation, plan.total_batch, plan.amp) == (2, 1, 2, "none")
    before = copy.deepcopy(cfg)
    detection_recipe.apply(cfg, plan)
    assert cfg.dataloader.train.total_batch_size == 2 and cfg.train.max_iter == before.train.max_iter
    assert cfg.optimizer.lr == before.optimizer.lr and cfg.train.accumulation == 1
    seg = Config.fromfile(str(CONFIGS / "camvid_upernet_vit_tiny_cpu.py"))
    plan = segmentation_recipe.plan(seg, "camvid", 1, "cpu")
    assert (plan.images_per_gpu, plan.accumulation, plan.total_batch, plan.amp) == (4, 1, 4, "none")
    segmentation_recipe.apply(seg, plan)
    assert seg.optim_wrapper.type == "OptimWrapper" and "accumulative_counts" not in seg.optim_wrapper
    assert seg.train_cfg.max_iters == 300 and seg.param_scheduler[1].end == 300


def test_seg_apply_counts_loader_iterations_and_switches_amp_on_gpus():
    """mmengine steps its loop, schedulers, val / checkpoint / log intervals per loader iteration: x accumulation."""
    from mmengine.config import Config

    from mae_transfer.segmentation import recipe as segmentation_recipe

    cfg = Config.fromfile(str(CONFIGS / "ade20k_upernet_vit_b.py"))
    plan = segmentation_recipe.plan(cfg, "b", 2, "cuda", total_batch=8, activation_checkpointing=True)
    assert (plan.images_per_gpu, plan.accumulation, plan.lr, plan.max_iter) == (2, 2, 5e-05, 320000)
    segmentation_recipe.apply(cfg, plan)
    assert cfg.train_dataloader.batch_size == 2 and cfg.optim_wrapper.accumulative_counts == 2
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.loss_scale, cfg.optim_wrapper.dtype) == (
        "AmpOptimWrapper", "dynamic", "float16")
    assert cfg.train_cfg.max_iters == 640000 and cfg.train_cfg.val_interval == 64000
    assert [(s.begin, s.end) for s in cfg.param_scheduler] == [(0, 6000), (6000, 640000)]
    assert cfg.default_hooks.checkpoint.interval == 64000 and cfg.default_hooks.logger.interval == 100
    assert cfg.model.backbone.grad_checkpointing is True and cfg.optim_wrapper.optimizer.lr == 5e-05


def test_split_and_table():
    assert rcp.split_batch(64, 8, 1) == (1, 8)
    assert rcp.split_batch(16, 1, 2) == (2, 8)
    assert rcp.split_batch(16, 16, 2) == (1, 1)  # a GPU's share below the reference's per-GPU batch
    assert rcp.split_batch(64, 8, 1, images_per_gpu=4) == (4, 2)
    with pytest.raises(MaeTransferError, match="valid choices are 1, 2, 4, 8"):
        rcp.split_batch(64, 8, 1, images_per_gpu=3)
    with pytest.raises(MaeTransferError, match="must divide it: 1, 2, 4, 8, 16"):
        rcp.split_batch(16, 3, 2)
    assert rcp.scale_iters(184375, 0.25) == 737500 and rcp.scale_iters(0, 4.0) == 0
    ref = rcp.Reference(64, 64)
    plan = rcp.plan(tool="t", config="c", device="cuda", reference=ref, world_size=4, lr=1e-4, max_iter=1000,
                    warmup_iters=10, amp="fp16", activation_checkpointing=False, total_batch=128, milestones=[900])
    assert (plan.lr, plan.max_iter, plan.warmup_iters, plan.milestones, plan.accumulation) == (2e-4, 500, 5, [450], 32)
    table = rcp.format_table(plan)
    assert "lr                          0.0002" in table and "reference (64 GPUs)" in table
    assert "linear rule, lr x 2" in table


def _last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def test_bad_input_is_one_error_line(capsys):
    from tests.detection.test_detectron2 import train_det
    from tests.segmentation.test_mmseg import _train_seg

    train_seg = _train_seg()
    large, ade = str(CONFIGS / "coco_mask_rcnn_vit_l.py"), str(CONFIGS / "ade20k_upernet_vit_b.py")
    cases = [
        (train_det.main, ["--config", large, "--num-gpus", "8", "--images-per-gpu", "3", "--plan"],
         "--images-per-gpu 3 on 8 GPUs does not divide the total batch 64 (8 images per GPU per optimizer step): "
         "valid choices are 1, 2, 4, 8"),
        (train_det.main, ["--config", large, "--total-batch", "0", "--plan"], "--total-batch must be a positive"),
        (train_det.main, ["--config", large, "--num-gpus", "-2", "--plan"], "--num-gpus must be a positive integer"),
        (train_det.main, ["--config", large, "--num-gpus", "3", "--plan"], "does not split over 3 GPUs"),
        (train_det.main, ["--config", large, "dataloader.train.total_batch_size=16", "--plan"], "--total-batch 16"),
        (train_det.main, ["--config", large, "--num-machines", "2", "--machine-rank", "9", "--plan"],
         "--machine-rank 9 with --num-machines 2: the rank must be 0..1"),
        (train_det.main, ["--config", large, "--machine-rank", "-1", "--plan"], "the rank must be 0..0"),
        (train_seg.main, ["--config", ade, "--images-per-gpu", "-1", "--plan"], "--images-per-gpu must be a positive"),
        (train_seg.main, ["--config", ade, "--cfg-options", "train_dataloader.batch_size=4", "--plan"],
         "use --images-per-gpu 4"),
        (train_seg.main, ["--config", ade, "--cfg-options", "amp=fp8", "--plan"], "amp must be one of fp16, bf16"),
        (train_seg.main, ["--config", ade, "--num-gpus", "2"], "--nproc_per_node 2 tools/train_seg.py"),
    ]
    for main, argv, expected in cases:
        capsys.readouterr()
        assert run_cli(main, argv) == 2, argv
        err = _last_error(capsys)
        assert err.startswith("error: ") and expected in err, (argv, err)


def _plan_json(main, argv: list[str], capsys) -> dict:
    """--plan in this process: exit 0, the JSON object on stdout (the table, from stderr, under "table")."""
    capsys.readouterr()
    code = run_cli(main, [*argv, "--plan"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return {**json.loads(out), "table": err}


def _refused(main, argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert run_cli(main, argv) == 2, argv
    err = _last_error(capsys)
    assert err.startswith("error: "), err
    return err


def test_plan_reads_the_launchers_world_size(monkeypatch, capsys, tmp_path):
    """Under torchrun (WORLD_SIZE) or Slurm (SLURM_NTASKS) --plan describes the processes the launcher started,
    and checks them as a run does; train_det starts its own processes and refuses to run under torchrun."""
    from tests.detection.test_detectron2 import train_det
    from tests.segmentation.test_mmseg import _train_seg

    train_seg = _train_seg()
    ade = ["--config", str(CONFIGS / "ade20k_upernet_vit_b.py")]
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    plan = _plan_json(train_seg.main, [*ade, "--launcher", "pytorch"], capsys)
    assert (plan["world_size"], plan["images_per_gpu"], plan["accumulation"]) == (8, 2, 1)
    assert plan["norm_layers"] == "SyncBN over 16 images (8 processes x 2)" and plan["notes"] == []
    err = _refused(train_seg.main, [*ade, "--launcher", "pytorch", "--num-gpus", "4", "--plan"], capsys)
    assert "but the launcher started 8 processes (WORLD_SIZE=8)" in err
    for argv in ([*ade, "--plan"], [*ade, "--output-dir", str(tmp_path / "seg")]):  # --plan and training alike
        assert "add --launcher pytorch" in _refused(train_seg.main, argv, capsys)
    large = ["--config", str(CONFIGS / "coco_mask_rcnn_vit_l.py")]
    for argv in ([*large, "--plan"], [*large, "--output-dir", str(tmp_path / "det")]):
        assert "train_det.py is not run under torchrun" in _refused(train_det.main, argv, capsys)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a 1-process launch (tools/submit.py's single task) is a plain run
    assert _plan_json(train_det.main, [*large, "--num-gpus", "8"], capsys)["world_size"] == 8
    assert _plan_json(train_seg.main, ade, capsys)["world_size"] == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    plan = _plan_json(train_seg.main, [*ade, "--launcher", "slurm"], capsys)
    assert (plan["world_size"], plan["images_per_gpu"], plan["accumulation"]) == (16, 1, 1)
    assert plan["norm_layers"] == "SyncBN over 16 images (16 processes x 1)"


def test_bn_notes_count_the_images_syncbn_covers():
    """The note compares the images BN statistics cover (SyncBN: all processes), not the wording of the row."""
    from mmengine.config import Config

    from mae_transfer.segmentation import recipe as segmentation_recipe

    cfg = Config.fromfile(str(CONFIGS / "ade20k_upernet_vit_b.py"))
    notes = {gpus: segmentation_recipe.plan(copy.deepcopy(cfg), "b", gpus, "cuda").notes for gpus in (1, 2, 8, 16)}
    assert [n for n in notes[16] if "BN" in n] == [] and [n for n in notes[8] if "BN" in n] == []
    assert "BN statistics come from fewer images than in the reference run (2 vs 16" in notes[1][-1]
    assert "BN statistics come from fewer images than in the reference run (4 vs 16" in notes[2][-1]
    assert segmentation_recipe.bn_images({"SyncBN"}, 16, 1) == 16 and segmentation_recipe.bn_images({"BN"}, 16, 1) == 1
    assert segmentation_recipe.bn_images({"SyncBN"}, 1, 2) == 2 and segmentation_recipe.bn_images({"GN"}, 1, 1) is None


def test_one_image_bn_on_one_process_is_refused_by_plan_and_training(tmp_path, capsys):
    """UperHead's pool-scale-1 branch pools each image to 1x1; torch's BN cannot train over 1 value per channel
    (checked on the head itself), so 1 image per GPU on one process is one error line, --plan and training alike;
    SyncBN over 16 processes x 1 image is the reference's 16 images and plans."""
    from mmengine.config import Config
    from mmseg.registry import MODELS

    import backbones.mmseg  # noqa: F401
    from tests.segmentation.test_mmseg import _train_seg

    tiny = Config.fromfile(str(CONFIGS / "ade20k_upernet_vit_tiny_cpu.py"))
    head_cfg = copy.deepcopy(tiny.model.decode_head)
    head_cfg.norm_cfg = dict(type="BN", requires_grad=True)  # what SyncBN becomes in one process
    head = MODELS.build(head_cfg).train()
    assert 1 in head_cfg.pool_scales
    features = [torch.randn(2, 192, s, s) for s in (32, 16, 8, 4)]
    assert torch.isfinite(head(features)).all()  # 2 images: fine
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        head([f[:1] for f in features])

    train_seg = _train_seg()
    ade = ["--config", str(CONFIGS / "ade20k_upernet_vit_b.py")]
    err = _refused(train_seg.main, [*ade, "--num-gpus", "1", "--images-per-gpu", "1", "--plan"], capsys)
    assert "UPerHead's pool-scale-1 branch would normalise 1 value per channel" in err
    assert "use --images-per-gpu 2, 4, 8, 16 (gradient accumulation keeps the total batch of 16)" in err
    assert "--total-batch of at least 2" in _refused(train_seg.main, [*ade, "--total-batch", "1", "--plan"], capsys)
    out = tmp_path / "run"
    err = _refused(train_seg.main, ["--config", str(CONFIGS / "ade20k_upernet_vit_tiny_cpu.py"), "--output-dir",
                                    str(out), "--images-per-gpu", "1"], capsys)
    assert "pool-scale-1 branch" in err and "use --images-per-gpu 2, 4" in err
    assert not (out / rcp.RECIPE_FILE).exists()
    plan = _plan_json(train_seg.main, [*ade, "--num-gpus", "16"], capsys)
    assert (plan["images_per_gpu"], plan["norm_layers"]) == (1, "SyncBN over 16 images (16 processes x 1)")


def test_det_plan_notes_loss_weighting_and_custom_training_set_epochs(capsys):
    from tests.detection.test_detectron2 import train_det

    vit_b = ["--config", str(CONFIGS / "coco_mask_rcnn_vit_b.py"), "--num-gpus", "8"]
    default = _plan_json(train_det.main, vit_b, capsys)
    assert not any("loss weighting" in n for n in default["notes"])
    two = _plan_json(train_det.main, [*vit_b, "--images-per-gpu", "2"], capsys)
    assert any(n.startswith("2 image(s) per micro-batch instead of the reference's 1 per GPU changes the loss "
                            "weighting") for n in two["notes"])
    assert default["epochs"] == 100.0 and default["dataset"] == "COCO train2017"
    custom = _plan_json(train_det.main, [*vit_b, "--train-json", "mine/train.json", "--train-images", "mine/images"],
                        capsys)
    assert (custom["epochs"], custom["dataset"], custom["reference"]["epochs"]) == (None, None, None)
    assert any(n.startswith("epochs: not counted, the training set is --train-json mine/train.json")
               for n in custom["notes"])
    assert "\n  epochs                      -    " in custom["table"] and "COCO train2017" not in custom["table"]


# ------------------------------------------------------------------------------------------- accumulation
# Tiny Mask R-CNN without randomness in a training step: drop path 0, every anchor and proposal sampled.
DET_EXACT = ["model.backbone.net.drop_path_rate=0.0", "model.proposal_generator.batch_size_per_image=1000000",
             "model.proposal_generator.post_nms_topk=[40,40]", "model.roi_heads.batch_size_per_image=1000000",
             "model.roi_heads.num_classes=3"]


def _det_inputs(n: int) -> list[dict]:
    """n images with the same pixels and boxes (so every image gets the same proposals, hence the same proposal and
    foreground counts: detectron2's batch-wide loss normalisations are then equal per micro-batch), different
    classes and mask shapes (so each image's gradient differs)."""
    from detectron2.structures import Boxes, Instances, PolygonMasks

    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 256, 256), generator=gen, dtype=torch.uint8).float()
    boxes = [[20.0, 30.0, 140.0, 150.0], [120.0, 100.0, 230.0, 240.0]]
    inputs = []
    for i in range(n):
        inst = Instances((256, 256))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.tensor([i % 3, (i + 1) % 3])
        polys = []
        for x0, y0, x1, y1 in boxes:
            cut = (x1 - x0) * (0.2 + 0.15 * i)  # a different pentagon in the same box
            polys.append([[x0, y0, x1 - cut, y0, x1, y0 + cut, x1, y1, x0, y1]])
        inst.gt_masks = PolygonMasks(polys)
        inputs.append({"image": image.clone(), "height": 256, "width": 256, "instances": inst})
    return inputs


def test_det_accumulation_equals_one_batch(one_thread):
    """One optimizer step of the tiny Mask R-CNN at total batch 4: 1 image x 4 accumulated == 4 images at once,
    with gradient clipping (active) on the accumulated gradient. Drop path 0; every anchor and proposal sampled
    (no random subsampling); equal proposal counts by construction (_det_inputs)."""
    from detectron2.config import instantiate
    from detectron2.engine import SimpleTrainer

    from mae_transfer.detection import checks as det_checks
    from mae_transfer.detection import recipe as detection_recipe
    from mae_transfer.detection import train as detection

    cfg = det_checks.load_config(TINY_DET, DET_EXACT)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    start = copy.deepcopy(model.state_dict())
    inputs = _det_inputs(4)

    def one_step(trainer_of, clip: bool = True) -> dict[str, torch.Tensor]:
        model.load_state_dict(start)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        trainer = trainer_of(optimizer)
        trainer.register_hooks([detection.ClipGradients("full_model", 0.5) if clip else None])
        trainer.train(0, 1)
        return {k: v.detach().clone() - start[k] for k, v in model.state_dict().items()}

    def worst(a: dict, b: dict) -> float:
        return float(max((a[k] - b[k]).abs().max() for k in a))

    def batch_of_4(opt):
        return SimpleTrainer(model, itertools.repeat(inputs), opt)

    def four_of_1(opt):
        return detection_recipe.AccumulatingTrainer(model, itertools.cycle([[x] for x in inputs]), opt, accumulation=4)

    for clip in (False, True):  # unclipped: the gradient's scale (loss / 4); clipped: one clip of the sum
        batched, accumulated = one_step(batch_of_4, clip), one_step(four_of_1, clip)
        scale = float(max(d.abs().max() for d in batched.values()))
        assert scale > 0 and worst(batched, accumulated) <= 1e-5 * scale, (clip, worst(batched, accumulated), scale)
    # clipping once per micro-batch instead would give another update: the test sees where clipping happens
    per_micro_clip = one_step(lambda opt: _ClipEachMicroBatch(model, itertools.cycle([[x] for x in inputs]), opt, 4))
    assert worst(batched, per_micro_clip) > 0.1 * scale


class _ClipEachMicroBatch:
    """A wrong accumulation (clipping each micro-batch's gradient) for the test's sensitivity check."""

    def __new__(cls, model, loader, optimizer, k):
        from detectron2.engine import SimpleTrainer

        from mae_transfer.detection import train as detection

        class Trainer(SimpleTrainer):
            def run_step(self):
                self.optimizer.zero_grad()
                for _ in range(k):
                    before = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
                    for p in model.parameters():
                        p.grad = None
                    (sum(self.model(next(self._data_loader_iter)).values()) / k).backward()
                    detection.clip_gradients(self.optimizer, "full_model", 0.5)
                    for p, b in zip(model.parameters(), before, strict=True):
                        if b is not None:
                            p.grad = b + (p.grad if p.grad is not None else 0)
                self.optimizer.step()

        return Trainer(model, loader, optimizer)


def _det_step(cfg, start: dict, trainer_of) -> dict[str, torch.Tensor]:
    """One SGD step (lr 0.1, no clipping) of the tiny Mask R-CNN from `start`: the change of every weight."""
    from detectron2.config import instantiate

    model = instantiate(cfg.model).train()
    model.load_state_dict(start)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer_of(model, optimizer).train(0, 1)
    return {k: v.detach().clone() - start[k] for k, v in model.state_dict().items()}


def _gloo_rank(rank: int, world: int, port: int, folder: str) -> None:
    """One rank of the 2-process CPU run: DDP as tools/train_det.py builds it (create_ddp_model with ddp_kwargs),
    our accumulating trainer on its 2 images, 1 per micro-batch; its weight change saved for the test."""
    import torch.distributed as dist
    from detectron2.engine.defaults import create_ddp_model

    from mae_transfer.detection import checks as det_checks
    from mae_transfer.detection import recipe as detection_recipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = det_checks.load_config(TINY_DET, DET_EXACT)
        start = torch.load(Path(folder) / "start.pth", weights_only=True)
        mine = _det_inputs(2 * world)[2 * rank:2 * rank + 2]

        def trainer_of(model, optimizer):
            ddp = create_ddp_model(model, **detection_recipe.ddp_kwargs(cfg))
            return detection_recipe.build_trainer(ddp, itertools.cycle([[x] for x in mine]), optimizer, amp=False,
                                                  accumulation=2)

        torch.save(_det_step(cfg, start, trainer_of), Path(folder) / f"rank{rank}.pth")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_step_equals_one_process_batch(one_thread, tmp_path):
    """2 CPU processes (gloo) x 1 image x 2 accumulated micro-batches == 4 images in one process, after one
    optimizer step: DDP must average the ranks' gradients once (an un-averaged, summed or per-micro-batch
    all-reduce gives another update). Equal proposal counts per image by construction (_det_inputs)."""
    import socket

    import torch.multiprocessing as mp
    from detectron2.config import instantiate
    from detectron2.engine import SimpleTrainer

    from mae_transfer.detection import checks as det_checks

    cfg = det_checks.load_config(TINY_DET, DET_EXACT)
    torch.manual_seed(0)
    start = instantiate(cfg.model).state_dict()
    torch.save(start, tmp_path / "start.pth")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gloo_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    inputs = _det_inputs(4)
    single = _det_step(cfg, start, lambda model, opt: SimpleTrainer(model, itertools.repeat(inputs), opt))
    scale = float(max(d.abs().max() for d in single.values()))
    assert scale > 0
    for rank in (0, 1):
        ranked = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        worst = float(max((ranked[k] - single[k]).abs().max() for k in single))
        assert worst <= 1e-5 * scale, (rank, worst, scale)


def test_det_images_per_micro_batch_change_the_loss_weighting(one_thread):
    """What README and the plan say: with unequal foreground counts, 2 images at once != 1 image x 2 accumulated
    (the mask loss is averaged over a micro-batch's foreground proposals); with equal counts they agree
    (test_det_accumulation_equals_one_batch)."""
    from detectron2.config import instantiate
    from detectron2.engine import SimpleTrainer
    from detectron2.structures import Boxes

    from mae_transfer.detection import checks as det_checks
    from mae_transfer.detection import recipe as detection_recipe

    cfg = det_checks.load_config(TINY_DET, DET_EXACT)
    torch.manual_seed(0)
    start = instantiate(cfg.model).state_dict()
    inputs = _det_inputs(2)
    small = inputs[1]["instances"][:1]  # one object, a third of the size: fewer foreground proposals
    small.gt_boxes = Boxes(torch.tensor([[100.0, 100.0, 150.0, 150.0]]))
    small.gt_masks = small.gt_masks[:1]
    inputs[1] = {**inputs[1], "image": inputs[1]["image"].flip(-1), "instances": small}
    together = _det_step(cfg, start, lambda model, opt: SimpleTrainer(model, itertools.repeat(inputs), opt))
    apart = _det_step(cfg, start, lambda model, opt: detection_recipe.AccumulatingTrainer(
        model, itertools.cycle([[x] for x in inputs]), opt, accumulation=2))
    norm = torch.cat([d.flatten() for d in together.values()]).norm()
    difference = torch.cat([(together[k] - apart[k]).flatten() for k in together]).norm() / norm
    assert norm > 0 and difference > 0.005, float(difference)


def test_seg_accumulative_counts_equals_one_batch(one_thread):
    """mmengine's accumulative_counts as our recipe sets it: 1 image x 4 == 4 images in one step for the tiny
    UperNet. GroupNorm in the heads (BN statistics over 1 vs 4 images would differ, and BN over 1 image is refused
    by the plan), dropout and drop path 0; the decode losses are means over all pixels of the batch (fixed
    crops), so equal."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    import backbones.mmseg  # noqa: F401
    from mae_transfer.segmentation import recipe as segmentation_recipe

    cfg = Config.fromfile(str(CONFIGS / "ade20k_upernet_vit_tiny_cpu.py"))
    cfg.model.backbone.drop_path_rate = 0.0
    cfg.model.decode_head.dropout_ratio = cfg.model.auxiliary_head.dropout_ratio = 0.0
    for part in ("neck", "decode_head", "auxiliary_head"):
        cfg.model[part].norm_cfg = dict(type="GN", num_groups=8, requires_grad=True)
    plan = segmentation_recipe.plan(cfg, "tiny", 1, "cpu", images_per_gpu=1)
    assert (plan.accumulation, plan.total_batch) == (4, 4)
    segmentation_recipe.apply(cfg, plan)
    assert cfg.optim_wrapper.accumulative_counts == 4 and cfg.train_dataloader.batch_size == 1
    init_default_scope("mmseg")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    start = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 128, 128), generator=gen, dtype=torch.uint8) for _ in range(4)]
    samples = []
    for _ in range(4):
        sample = SegDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 128, 128), generator=gen))
        samples.append(sample)

    def step(accumulative_counts: int, batches: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        model.load_state_dict(start)
        model.train()
        # lr 10: updates well above the rounding of the weights they are read back from (GN gradients are small)
        wrapper_cfg = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=10.0),
                           accumulative_counts=accumulative_counts)
        wrapper = build_optim_wrapper(model, wrapper_cfg)
        for a, b in batches:
            model.train_step(dict(inputs=images[a:b], data_samples=samples[a:b]), wrapper)
        return {k: v.detach().clone() - start[k] for k, v in model.state_dict().items()}

    batched = step(1, [(0, 4)])
    accumulated = step(cfg.optim_wrapper.accumulative_counts, [(i, i + 1) for i in range(4)])
    scale = max(d.abs().max() for d in batched.values())
    worst = max((batched[k] - accumulated[k]).abs().max() for k in batched)
    assert scale > 0 and worst <= 1e-5 * scale, (worst, scale)
    partial = step(4, [(0, 1), (1, 2), (2, 3)])  # 3 of 4 micro-batches: no step yet
    assert max(d.abs().max() for d in partial.values()) == 0


def _launch(cmd: list[str], env: dict, out: Path) -> subprocess.CompletedProcess:
    """Run a detectron2-launched tool; one retry when a gloo rank aborted. Known, not yet understood: now and then
    a rank dies with "terminate called without an active exception" seconds into a 2-process CPU run here. The
    retry is printed and starts from the output folder `out` as it was before the failed attempt (which may
    already have appended to metrics.json or written a checkpoint)."""
    before = out.with_name(out.name + ".before")
    shutil.rmtree(before, ignore_errors=True)
    if out.exists():
        shutil.copytree(out, before)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "terminated with signal SIGABRT" in proc.stderr:
        print("gloo rank aborted; retrying once:", proc.stderr[-400:])
        shutil.rmtree(out, ignore_errors=True)
        if before.exists():
            shutil.copytree(before, out)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    shutil.rmtree(before, ignore_errors=True)
    return proc


@pytest.mark.slow
def test_two_process_gloo_run_with_accumulation_resumes(fruits_nuts, tmp_path):
    """detectron2 launch with 2 CPU processes (gloo), 1 image x 2 accumulation per process (total 4): trains,
    writes recipe.json (world size 2), resumes from its checkpoint to the next iterations."""
    out = tmp_path / "run"
    data = str(fruits_nuts / "trainval.json"), str(fruits_nuts / "images")
    base = [sys.executable, str(REPO / "tools" / "train_det.py"), "--config", TINY_DET, "--num-gpus", "2",
            "--images-per-gpu", "1", "--total-batch", "4", "--train-json", data[0], "--train-images", data[1],
            "--val-json", data[0], "--val-images", data[1],
            "--output-dir", str(out), "train.eval_period=0", "train.log_period=1", "train.seed=0",
            "train.checkpointer.period=4", "dataloader.train.mapper.augmentations.1.target_height=128",
            "dataloader.train.mapper.augmentations.1.target_width=128",
            "dataloader.train.mapper.augmentations.2.crop_size=[128,128]", "model.backbone.square_pad=128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = _launch([*base, "train.max_iter=4"], env, out)
    assert first.returncode == 0, first.stderr[-3000:]
    plan = json.loads((out / "recipe.json").read_text())
    # --total-batch 4 vs the config's 2: lr x 2, max_iter 4 -> 2, checkpoint period 4 -> 2
    assert (plan["world_size"], plan["images_per_gpu"], plan["accumulation"], plan["total_batch"]) == (2, 1, 2, 4)
    assert (plan["max_iter"], plan["checkpoint_period"], plan["lr"]) == (2, 2, pytest.approx(2 * 1e-4))
    assert "gradient accumulation       2" in first.stderr
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1]
    assert all(np.isfinite(r["total_loss"]) for r in rows if "total_loss" in r)
    resumed = _launch([*base, "train.max_iter=8", "--resume"], env, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1, 2, 3]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 3
