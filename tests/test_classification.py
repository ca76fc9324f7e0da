"""Classification fine-tuning and linear probing (tools/finetune_cls.py, mae_transfer/classification.py):
published recipes, parity of the pooled / linear-probe heads with timm models, the official LARS rule,
exact resume, DDP, learning on real object crops, partial fine-tuning through the study runner, bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

from harnesses.synthetic import make_shapes_dataset
from mae_transfer.classification import (
    build_classifier,
    build_optimizer,
    evaluate_checkpoint,
    finetune,
    load_for_eval,
    resolve_config,
)
from mae_transfer.coco import coco_crops_to_imagefolder
from mae_transfer.config import load_config
from mae_transfer.errors import MaeTransferError
from mae_transfer.runtime import load_checkpoint

from .conftest import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "finetune_cls.py"
CONFIGS = REPO_ROOT / "configs"
TINY_FT = CONFIGS / "cls_finetune_vit_tiny_cpu.py"
TINY_LP = CONFIGS / "cls_linprobe_vit_tiny_cpu.py"
# A 2-block, 64-wide ViT at 32 px: seconds per run.
MICRO = {"model": "vit_tiny_patch16_224", "encoder_overrides": {"depth": 2, "embed_dim": 64, "num_heads": 2},
         "img_size": 32, "batch_size": 4, "epochs": 2, "warmup_epochs": 1, "device": "cpu", "progress": False,
         "num_workers": 0, "save_every": 1}


@pytest.fixture(scope="module")
def shapes_crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated ImageFolder (circle / square / triangle crops, split by picture) for fast tests."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, num_train=12, num_val=2, size=96)
    out = root / "crops"
    coco_crops_to_imagefolder(root / "annotations" / "instances_train.json", root / "images" / "train", out,
                              min_size=8, val_fraction=0.34)  # every class on both sides (seed 0)
    return out


def micro_cfg(data: Path, out: Path, **kw) -> dict:
    cfg = load_config(TINY_FT)
    cfg.update(MICRO, data_path=str(data), output_dir=str(out), resume="auto")
    cfg.update(kw)
    return cfg


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------------- recipes
def test_recipes_match_the_published_ones() -> None:
    """facebookresearch/mae FINETUNE.md / LINPROBE.md and the paper's Tables 9-10."""
    b = resolve_config({**load_config(CONFIGS / "cls_finetune_vit_b.py"), "data_path": "x", "output_dir": "y"})
    assert (b["model"], b["img_size"], b["global_pool"], b["mode"]) == ("vit_base_patch16_224", 224, "avg", "finetune")
    assert (b["optimizer"], b["blr"], b["layer_decay"], b["weight_decay"], b["drop_path"]) == (
        "adamw", 5e-4, 0.65, 0.05, 0.1)
    assert (b["betas"], b["min_lr"], b["epochs"], b["warmup_epochs"]) == ((0.9, 0.999), 1e-6, 100, 5)
    assert (b["auto_augment"], b["reprob"], b["remode"], b["mixup"], b["cutmix"], b["smoothing"]) == (
        "rand-m9-mstd0.5-inc1", 0.25, "pixel", 0.8, 1.0, 0.1)
    assert (b["mixup_prob"], b["mixup_switch_prob"], b["mixup_mode"], b["crop_scale"]) == (
        1.0, 0.5, "batch", (0.08, 1.0))
    assert b["batch_size"] * 32 == 1024 and b["eval_crop_pct"] == 224 / 256 and b["head_init_std"] == 2e-5
    assert b["finetune"] == "" and b["freeze_blocks"] == 0
    lr = b["blr"] * 1024 / 256
    assert math.isclose(lr, 2e-3)

    large = load_config(CONFIGS / "cls_finetune_vit_l.py")
    assert (large["model"], large["blr"], large["layer_decay"], large["drop_path"], large["epochs"]) == (
        "vit_large_patch16_224", 1e-3, 0.75, 0.2, 50)

    for name in ("cls_linprobe_vit_b.py", "cls_linprobe_vit_l.py"):
        lp = resolve_config({**load_config(CONFIGS / name), "data_path": "x", "output_dir": "y"})
        assert (lp["mode"], lp["global_pool"], lp["freeze_blocks"], lp["optimizer"]) == (
            "linprobe", "token", -1, "lars")
        assert (lp["blr"], lp["weight_decay"], lp["epochs"], lp["warmup_epochs"], lp["momentum"]) == (
            0.1, 0.0, 90, 10, 0.9)
        assert lp["batch_size"] * 32 == 16384 and lp["head_init_std"] == 0.01 and lp["drop_path"] == 0.0
        assert (lp["auto_augment"], lp["reprob"], lp["mixup"], lp["cutmix"], lp["smoothing"]) == (
            None, 0.0, 0.0, 0.0, 0.0)
    assert load_config(CONFIGS / "cls_linprobe_vit_l.py")["model"] == "vit_large_patch16_224"
    # tiny CPU variants: same recipe keys, only sizes / schedule changed
    tiny = load_config(TINY_FT)
    for key in ("auto_augment", "reprob", "mixup", "cutmix", "smoothing", "layer_decay", "weight_decay", "optimizer"):
        assert tiny[key] == b[key], key


# ------------------------------------------------------------------------------------------- parity
def _timm_vit(num_classes: int, global_pool: str) -> nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=num_classes,
        global_pool=global_pool).eval()


def _our_cfg(mode: str, global_pool: str) -> dict:
    return resolve_config({"model": "vit_tiny_patch16_224", "img_size": 64, "mode": mode, "global_pool": global_pool,
                           "encoder_overrides": {"depth": 2, "embed_dim": 64, "num_heads": 2}, "drop_path": 0.0,
                           "freeze_blocks": -1 if mode == "linprobe" else 0, "data_path": "x", "output_dir": "y"})


def test_official_finetuned_checkpoint_gives_identical_logits(tmp_path: Path) -> None:
    """An official-MAE-style fine-tuned checkpoint ({"model": ...} with fc_norm + head, no final norm) evaluated
    by our classifier == timm's VisionTransformer(global_pool='avg') holding the same weights."""
    torch.manual_seed(0)
    ref = _timm_vit(7, "avg")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))  # fc_norm / head away from their init values
    sd = {k: v for k, v in ref.state_dict().items()}
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    torch.save({"model": sd, "epoch": 99}, tmp_path / "official_ft.pth")
    ours = build_classifier(_our_cfg("finetune", "avg"), num_classes=7)
    load_for_eval(tmp_path / "official_ft.pth", ours)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-5, rtol=1e-5)


def test_linprobe_head_matches_official_layout(tmp_path: Path) -> None:
    """Official linprobe: timm ViT (cls token) with head = Sequential(BatchNorm1d(affine=False, eps=1e-6), Linear):
    its checkpoint (head.0.running_*, head.1.*) loads into our linear-probe model with identical logits."""
    torch.manual_seed(1)
    ref = _timm_vit(5, "token")
    ref.head = nn.Sequential(nn.BatchNorm1d(64, affine=False, eps=1e-6), ref.head)
    ref.head[0].running_mean.normal_()
    ref.head[0].running_var.uniform_(0.5, 2.0)
    ref.eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "linprobe.pth")
    ours = build_classifier(_our_cfg("linprobe", "token"), num_classes=5)
    load_for_eval(tmp_path / "linprobe.pth", ours)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-5, rtol=1e-5)


def test_linprobe_optimizer_follows_the_official_lars_rule() -> None:
    """One LARS step on the probe head: weight matrices get the trust ratio (even with no weight decay),
    biases a plain momentum step — facebookresearch/mae util/lars.py written out here as the reference."""
    torch.manual_seed(0)
    cfg = resolve_config({**load_config(TINY_LP),
                          **{k: v for k, v in _our_cfg("linprobe", "token").items()
                             if k in ("encoder_overrides", "img_size", "data_path", "output_dir")}})
    assert (cfg["optimizer"], cfg["weight_decay"], cfg["momentum"]) == ("lars", 0.0, 0.9)
    model = build_classifier(cfg, num_classes=4)
    model.freeze_blocks(-1)
    head = model.head[1]
    with torch.no_grad():
        head.weight.normal_(std=0.01)  # (the official rule leaves an all-zero matrix unscaled)
        head.bias.normal_(std=0.01)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    opt = build_optimizer(model, cfg, base_lr=0.5)
    gw, gb = torch.randn_like(w0), torch.randn_like(b0)
    head.weight.grad, head.bias.grad = gw.clone(), gb.clone()
    opt.step()
    q = 0.001 * w0.norm() / gw.norm()  # official: trust_coefficient * |p| / |dp| for p.ndim > 1
    torch.testing.assert_close(head.weight.detach(), w0 - 0.5 * gw * q)
    torch.testing.assert_close(head.bias.detach(), b0 - 0.5 * gb)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == head.weight.numel() + head.bias.numel()


# ------------------------------------------------------------------------------------------- training runtime
def test_resume_continues_exactly(shapes_crops: Path, tmp_path: Path, one_thread: None) -> None:
    """2 epochs straight == 1 epoch, stop, resume for the 2nd (RandAugment, mixup/cutmix, drop path and
    random erasing all on): same losses, same accuracies, same weights."""
    full = finetune(micro_cfg(shapes_crops, tmp_path / "full", drop_path=0.1))
    # "killed" after epoch 1: its output folder holds only the epoch-1 checkpoint as checkpoint_last.pth
    (tmp_path / "resumed").mkdir()
    first = load_checkpoint(tmp_path / "full" / "checkpoint_0001.pth", "mae_transfer_classifier")
    torch.save(first, tmp_path / "resumed" / "checkpoint_last.pth")
    resumed = finetune(micro_cfg(shapes_crops, tmp_path / "resumed", drop_path=0.1))
    assert len(resumed) == 2
    for a, b in zip(full, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["acc1"] == pytest.approx(b["acc1"], abs=1e-9)
    wa = load_checkpoint(tmp_path / "full" / "checkpoint_last.pth", "mae_transfer_classifier")["model"]
    wb = load_checkpoint(tmp_path / "resumed" / "checkpoint_last.pth", "mae_transfer_classifier")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)
    metrics = json.loads((tmp_path / "resumed" / "eval_metrics.json").read_text())
    assert metrics["metrics"]["top1"] == resumed[-1]["acc1"] and metrics["details"]["num_images"] > 0
    assert list((tmp_path / "full" / "tensorboard").glob("events.*"))


def test_torchrun_two_processes_evaluates_every_image_once(shapes_crops: Path, tmp_path: Path) -> None:
    """DDP (gloo, 2 CPU processes): checkpoint saved once, unwrapped; the sharded evaluation counts each val
    image once and agrees with a single-process --eval-only of the same checkpoint."""
    out = tmp_path / "ddp"
    overrides = ["model=vit_tiny_patch16_224", "encoder_overrides.depth=2", "encoder_overrides.embed_dim=64",
                 "encoder_overrides.num_heads=2", "img_size=32", "batch_size=4", "epochs=1", "warmup_epochs=1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TOOL), "--config", str(TINY_FT), "--data", str(shapes_crops), "--output-dir", str(out),
                           *overrides], capture_output=True, text=True, timeout=240, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), effective batch 8" in proc.stderr
    ckpt = load_checkpoint(out / "checkpoint_last.pth", "mae_transfer_classifier")
    assert ckpt["world_size"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
    ddp = json.loads((out / "eval_metrics.json").read_text())
    n_val = sum(1 for _ in (shapes_crops / "val").rglob("*.jpg"))
    assert ddp["details"]["num_images"] == n_val
    single = run_tool("--config", TINY_FT, "--data", shapes_crops, "--output-dir", tmp_path / "eval", "--eval-only",
                      out / "checkpoint_last.pth", *overrides)
    assert single.returncode == 0, single.stderr[-2000:]
    one = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert one["details"]["num_images"] == n_val
    assert one["metrics"]["top1"] == pytest.approx(ddp["metrics"]["top1"])
    assert one["metrics"]["loss"] == pytest.approx(ddp["metrics"]["loss"], rel=1e-4)


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_mae_finetune_linprobe_and_partial_finetuning_on_real_crops(fruits_nuts: Path, tmp_path: Path,
                                                                     one_thread: None) -> None:
    """fruits_nuts object crops (3 classes, split by photo): a tiny MAE pretrained on the train crops, then
    (1) end-to-end fine-tuning raises val top-1 clearly above the majority-class rate, (2) the linear probe runs
    and reports top-1, (3) the study runner gives the partial fine-tuning row for freeze 0 / 2 / -1."""
    from mae_transfer.pretraining import export_encoder, pretrain
    from mae_transfer.study.run import run_study
    from mae_transfer.study.spec import load_study

    crops = tmp_path / "crops"
    counts = coco_crops_to_imagefolder(fruits_nuts / "trainval.json", fruits_nuts / "images", crops, 16,
                                       val_fraction=0.25)
    val_counts = [n for k, n in counts.items() if k.startswith("val/")]
    majority = 100.0 * max(val_counts) / sum(val_counts)

    mae_cfg = load_config(CONFIGS / "mae_pretrain_vit_tiny_cpu.py")
    mae_cfg.update(data_path=str(crops / "train"), output_dir=str(tmp_path / "mae"), epochs=12, warmup_epochs=2,
                   save_every=12, recon_images=0)
    history = pretrain(mae_cfg)
    assert history[-1]["loss"] < history[0]["loss"]
    backbone = export_encoder(tmp_path / "mae" / "checkpoint_last.pth", tmp_path / "mae_backbone.pth")

    ft = run_tool("--config", TINY_FT, "--data", crops, "--output-dir", tmp_path / "ft", "--finetune", backbone,
                  "epochs=12", "warmup_epochs=2")
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert "format mae_transfer_backbone" in ft.stderr  # loaded through the shared checkpoint importer
    ft_hist = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    ft_metrics = json.loads((tmp_path / "ft" / "eval_metrics.json").read_text())
    print(f"\nmajority {majority:.1f}; fine-tune top-1 by epoch {[round(h['acc1'], 1) for h in ft_hist]}")
    assert ft_metrics["metrics"]["top1"] >= majority + 15.0, (ft_metrics, majority)
    assert ft_hist[-1]["loss"] < ft_hist[0]["loss"]

    lp_cfg = load_config(TINY_LP)
    lp_cfg.update(data_path=str(crops), output_dir=str(tmp_path / "lp"), finetune=str(backbone), epochs=8,
                  warmup_epochs=1)
    lp_hist = finetune(lp_cfg)  # in process: the same code path as the tool, without a second interpreter start
    lp_metrics = json.loads((tmp_path / "lp" / "eval_metrics.json").read_text())
    print(f"linear probe top-1 by epoch {[round(h['acc1'], 1) for h in lp_hist]}")
    assert lp_metrics["details"]["mode"] == "linprobe" and lp_metrics["metrics"]["top1"] > majority, (
        lp_metrics, majority)
    assert lp_hist[-1]["loss"] < lp_hist[0]["loss"]
    lp_ckpt = load_checkpoint(tmp_path / "lp" / "checkpoint_last.pth", "mae_transfer_classifier")["model"]
    enc = torch.load(backbone, weights_only=True)["model"]
    torch.testing.assert_close(lp_ckpt["blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"])  # frozen

    spec = dict(name="cls_partial", depth=4, freeze_blocks=[0, 2, -1], seeds=[0], backbones={"MAE": str(backbone)},
                tasks={"cls": dict(kind="cls", config=str(TINY_FT), epochs=4, args=["--data", str(crops)],
                                   opts=["warmup_epochs=1"])})
    summary = run_study(load_study(spec, output_dir=tmp_path / "study"))
    assert len(summary["ran"]) == 3 and not summary["failed"]
    table = (tmp_path / "study" / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| MAE |"))
    *cells, seeds = row.strip("|").split("|")[1:]  # one column per freeze setting, then n (seeds per cell)
    numbers = [float(c) for c in cells]
    print(table)
    assert len(numbers) == 3 and all(0.0 <= v <= 100.0 for v in numbers) and seeds.strip() == "1"
    assert "4 (all) | 2 | 0 (frozen ViT)" in table and "top-1" in table
    assert (tmp_path / "study" / "plot.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------- bad input
def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture) -> Any:
    """The tool's `main` through `run_cli` in this process (the subprocess start costs seconds per call)."""
    import importlib.util

    from mae_transfer.cli import run_cli

    spec = importlib.util.spec_from_file_location("finetune_cls_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def call(*args: Any) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = run_cli(tool.main, [str(a) for a in args])
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    return call


MICRO_ARGS = ["model=vit_tiny_patch16_224", "encoder_overrides.depth=1", "encoder_overrides.embed_dim=32",
              "encoder_overrides.num_heads=2", "img_size=32", "batch_size=2", "epochs=1"]


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_input_one_clear_error(shapes_crops: Path, tmp_path: Path, cli: Any, one_thread: None) -> None:
    # an empty class folder
    data = _copy_tree(shapes_crops, tmp_path / "empty_class")
    (data / "train" / "hexagon").mkdir()
    line = _one_error_line(cli("--config", TINY_FT, "--data", data, "--output-dir", tmp_path / "o1", *MICRO_ARGS))
    assert "hexagon" in line and "no images" in line

    # an unreadable image (in val: found while evaluating)
    data = _copy_tree(shapes_crops, tmp_path / "corrupt")
    bad = next((data / "val").rglob("*.jpg"))
    bad.write_bytes(b"not a jpeg")
    line = _one_error_line(cli("--config", TINY_FT, "--data", data, "--output-dir", tmp_path / "o2", *MICRO_ARGS))
    assert bad.name in line and "cannot read image" in line

    # train / val class folders differ; no val folder
    data = _copy_tree(shapes_crops, tmp_path / "mismatch")
    import shutil

    shutil.rmtree(data / "val" / "circle")
    line = _one_error_line(cli("--config", TINY_FT, "--data", data, "--output-dir", tmp_path / "o3", *MICRO_ARGS))
    assert "only in train: ['circle']" in line
    line = _one_error_line(cli("--config", TINY_FT, "--data", shapes_crops / "train", "--output-dir",
                                    tmp_path / "o4", *MICRO_ARGS))
    assert "train/<class>/ and val/<class>/" in line

    # unknown key; linprobe with blocks left trainable
    line = _one_error_line(cli("--config", TINY_FT, "--data", shapes_crops, "--output-dir", tmp_path / "o5",
                               "mixupp=0.5"))
    assert "'mixupp'" in line
    line = _one_error_line(cli("--config", TINY_LP, "--data", shapes_crops, "--output-dir", tmp_path / "o6",
                                    "--freeze-blocks", "2"))
    assert "freeze_blocks=-1" in line


def test_checkpoint_with_other_number_of_classes_is_refused(shapes_crops: Path, tmp_path: Path, cli: Any,
                                                            one_thread: None) -> None:
    """--eval of a 7-class classifier on 3-class data, and --resume of a run on other classes: one clear line."""
    torch.manual_seed(0)
    cfg = {**load_config(TINY_FT), "model": "vit_tiny_patch16_224", "img_size": 32, "drop_path": 0.0,
           "encoder_overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2}}
    seven = build_classifier(resolve_config({**cfg, "data_path": "x", "output_dir": "y"}), num_classes=7)
    torch.save({"model": seven.state_dict()}, tmp_path / "seven.pth")
    line = _one_error_line(cli("--config", TINY_FT, "--data", shapes_crops, "--output-dir", tmp_path / "e",
                                    "--eval-only", tmp_path / "seven.pth", *MICRO_ARGS))
    assert "seven.pth" in line and "3 classes" in line and "(7, 32)" in line
    with pytest.raises(MaeTransferError, match="does not match the data's 3 classes"):
        evaluate_checkpoint({**cfg, "data_path": str(shapes_crops), "output_dir": str(tmp_path / "e2"),
                             "device": "cpu"},
                            tmp_path / "seven.pth")
    # a pretraining-only checkpoint is not a classifier
    line = _one_error_line(cli("--config", TINY_FT, "--data", shapes_crops, "--output-dir", tmp_path / "e3",
                                    "--eval-only", tmp_path / "seven.pth", *MICRO_ARGS[:-1], "global_pool='token'"))
    assert "missing" in line or "classes" in line

    # resume a run whose checkpoint was trained on 2 classes
    two = _copy_tree(shapes_crops, tmp_path / "two")
    import shutil

    shutil.rmtree(two / "train" / "triangle")
    shutil.rmtree(two / "val" / "triangle")
    out = tmp_path / "run"
    first = cli("--config", TINY_FT, "--data", two, "--output-dir", out, *MICRO_ARGS)
    assert first.returncode == 0, first.stderr[-2000:]
    line = _one_error_line(cli("--config", TINY_FT, "--data", shapes_crops, "--output-dir", out, "--resume",
                                    *MICRO_ARGS[:-1], "epochs=2"))
    assert "cannot resume" in line and "triangle" in line
