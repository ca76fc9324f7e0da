"""MAE pretraining engine: config loading, learning on real photos, exact resume, checkpoint/export
format, DDP under torchrun (gloo, 2 CPU processes), and one-line CLI errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones.vit import create_vit
from mae_transfer.checkpoint import BACKBONE_FORMAT
from mae_transfer.config import apply_overrides, load_config
from mae_transfer.errors import MaeTransferError
from mae_transfer.pretraining import (
    CHECKPOINT_FORMAT,
    build_mae,
    build_optimizer,
    export_encoder,
    load_checkpoint,
    pretrain,
    resolve_config,
)
from tests.conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "mae_pretrain_vit_tiny_cpu.py"
TOOL = REPO_ROOT / "tools" / "pretrain.py"
CKPT_KEYS = {"format", "model", "optimizer", "scaler", "epoch", "config", "history", "world_size"}
# Smaller than the tiny config, for the tests that check mechanics rather than learning.
MICRO = ["encoder_overrides={'depth': 1}", "img_size=64", "decoder_depth=1", "decoder_embed_dim=64",
         "batch_size=4", "recon_images=2"]


def tiny_cfg(data: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(TINY, overrides)
    cfg.update(data_path=str(data), output_dir=str(out))
    return cfg


def copy_images(src: Path, dst: Path, count: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.jpg"))[:count]:
        shutil.copy(f, dst / f.name)
    return dst


def run_tool(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=env)


# ------------------------------------------------------------------------------------------- config
def test_config_base_and_overrides() -> None:
    base = load_config(REPO_ROOT / "configs" / "mae_pretrain_vit_b.py")
    tiny = load_config(TINY)
    assert set(tiny) == set(base)  # the tiny config only changes values of the real recipe's keys
    assert base["blr"] == 1.5e-4 and base["betas"] == (0.9, 0.95) and base["weight_decay"] == 0.05
    assert base["mask_ratio"] == 0.75 and base["norm_pix_loss"] and base["warmup_epochs"] == 40
    assert (base["decoder_depth"], base["decoder_embed_dim"]) == (8, 512)
    assert load_config(REPO_ROOT / "configs" / "mae_pretrain_vit_l.py")["encoder"] == "vit_large_patch16_224"
    assert load_config(REPO_ROOT / "configs" / "mae_pretrain_vit_h.py")["encoder"] == "vit_huge_patch14_224"
    for path in ("mae_pretrain_vit_b.py", "mae_pretrain_vit_l.py", "mae_pretrain_vit_h.py"):
        resolve_config({**load_config(REPO_ROOT / "configs" / path), "data_path": "x", "output_dir": "y"})

    cfg = apply_overrides(tiny, ["lr=3e-4", "betas=(0.9, 0.999)", "encoder_overrides.depth=2", "masking=block"])
    assert cfg["lr"] == 3e-4 and cfg["betas"] == (0.9, 0.999) and cfg["masking"] == "block"
    assert cfg["encoder_overrides"] == {"depth": 2} and tiny["encoder_overrides"] == {"depth": 4}
    with pytest.raises(MaeTransferError, match=r"unknown config key 'lrr'; valid keys: .*blr.*"):
        apply_overrides(tiny, ["lrr=1"])
    with pytest.raises(MaeTransferError, match="key=value"):
        apply_overrides(tiny, ["lr"])


def test_no_weight_decay_on_norms_biases_tokens() -> None:
    cfg = resolve_config(load_config(TINY, [*MICRO, "data_path=x", "output_dir=y"]))
    model = build_mae(cfg)
    groups = build_optimizer(model, cfg, 1e-3).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.05
    assert {"encoder.cls_token", "mask_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias"} <= no_decay
    assert all(n.endswith("weight") and "norm" not in n for n in decay)
    assert "encoder.pos_embed" not in no_decay | decay  # fixed sin-cos table, not trained
    assert "encoder.blocks.0.mlp.fc1.weight" in decay and "decoder_pred.weight" in decay


def test_reconstruction_picture_has_labelled_rows(tmp_path: Path) -> None:
    """recon_epoch*.png: 64-px inputs enlarged 3x (nearest) to >= 160 px, a label left of each of the three rows."""
    import numpy as np
    from PIL import Image

    from mae_transfer.pretraining import save_reconstruction

    cfg = resolve_config(load_config(TINY, [*MICRO, "data_path=x", "output_dir=y"]))
    torch.manual_seed(0)
    model = build_mae(cfg)
    from mae_transfer.data import IMAGENET_MEAN, IMAGENET_STD

    black = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]  # ImageNet-normalised black
    imgs = torch.tensor(black).view(1, 3, 1, 1).expand(2, 3, 64, 64).contiguous()
    path = save_reconstruction(model, imgs, tmp_path / "recon.png", seed=0)
    picture = np.asarray(Image.open(path).convert("L"))
    tile, pad = 3 * 64, 2
    grid_w = 2 * tile + 3 * pad
    assert picture.shape[0] == 3 * tile + 4 * pad and picture.shape[1] > grid_w
    margin = picture[:, : picture.shape[1] - grid_w]
    assert margin.shape[1] > 80  # wide enough for "reconstruction"
    for row in range(3):  # dark text pixels in the margin at the height of each row, none in the gaps
        top = pad + row * (tile + pad)
        assert (margin[top: top + tile] < 100).sum() > 30, row
    assert (margin[pad + tile: 2 * (pad + tile)][:pad] < 100).sum() == 0
    assert (picture[pad + 10, -grid_w + pad + 10]) < 30  # the first image tile itself


def test_image_folder_recursive_and_case_insensitive(coco_tiny: Path, tmp_path: Path) -> None:
    from mae_transfer.data import ImageFolderDataset, find_images, pretrain_transform

    src = sorted((coco_tiny / "train2017").glob("*.jpg"))[:3]
    (tmp_path / "class_a").mkdir()
    (tmp_path / "class_b" / "deeper").mkdir(parents=True)
    shutil.copy(src[0], tmp_path / "class_a" / "one.JPG")
    shutil.copy(src[1], tmp_path / "class_b" / "deeper" / "two.jpeg")
    from PIL import Image

    Image.open(src[2]).convert("RGBA").save(tmp_path / "three.png")  # RGBA png -> converted to RGB
    (tmp_path / "class_a" / "labels.txt").write_text("not an image")
    (tmp_path / "class_a" / ".hidden.jpg").write_bytes(b"editor backup")
    files = find_images(tmp_path)
    assert [f.name for f in files] == ["one.JPG", "two.jpeg", "three.png"]
    dataset = ImageFolderDataset(tmp_path, pretrain_transform(64))
    batch = torch.stack([dataset[i] for i in range(3)])
    assert batch.shape == (3, 3, 64, 64)
    assert -2.2 < float(batch.min()) and float(batch.max()) < 2.7  # ImageNet-normalised range
    with pytest.raises(MaeTransferError, match="not a directory"):
        find_images(files[0])


# ------------------------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def coco_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    from tests.conftest import shared_dataset

    images = shared_dataset("coco_tiny") / "train2017"
    out = tmp_path_factory.mktemp("coco_pretrain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = pretrain(tiny_cfg(images, out, "epochs=10", "warmup_epochs=2", "save_every=5"))
    finally:
        torch.set_num_threads(threads)
    return out, history


@pytest.mark.slow
@pytest.mark.large_data  # the 50 photos of ../shared/data/coco_tiny: tests/data has no batch of 16
def test_pretraining_lowers_masked_patch_loss_on_coco(coco_run: tuple[Path, list[dict]]) -> None:
    out, history = coco_run
    losses = [h["loss"] for h in history]
    assert [h["epoch"] for h in history] == list(range(1, 11))
    # Per-patch normalised targets: predicting the patch mean scores 1.0; learning gets clearly below.
    assert losses[-1] < 0.85 * losses[0], losses
    assert min(losses[-3:]) < 1.0, losses
    for epoch in (5, 10):
        assert (out / f"checkpoint_{epoch:04d}.pth").is_file()
        picture = out / f"recon_epoch{epoch:04d}.png"
        from PIL import Image

        with Image.open(picture) as img:  # 3 rows (original / masked / reconstruction) of 4 images, 96 px shown at 192
            assert img.size[1] == 3 * 192 + 4 * 2 and img.size[0] > 4 * 192 + 5 * 2  # + the row labels' margin
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len((out / "log.jsonl").read_text().splitlines()) == 10


@pytest.mark.slow
@pytest.mark.large_data  # the 50 photos of ../shared/data/coco_tiny: tests/data has no batch of 16
def test_checkpoint_format_atomic_and_encoder_export(coco_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, history = coco_run
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"], "temp files left"
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    assert set(ckpt) == CKPT_KEYS and ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["epoch"] == 10 and ckpt["history"] == history and ckpt["world_size"] == 1
    assert ckpt["config"]["encoder"] == "vit_tiny_patch16_224" and ckpt["scaler"] is None
    assert ckpt["optimizer"]["state"], "optimizer state missing"
    numbered = torch.load(out / "checkpoint_0010.pth", weights_only=True)
    assert all(torch.equal(numbered["model"][k], v) for k, v in ckpt["model"].items())

    backbone_path = export_encoder(out / "checkpoint_last.pth", tmp_path / "backbone.pth")
    backbone = torch.load(backbone_path, weights_only=True)
    assert backbone["format"] == BACKBONE_FORMAT and backbone["arch"]["depth"] == 4
    assert not any(k.startswith("encoder.") for k in backbone["model"])
    vit = create_vit(backbone["name"], **backbone["arch"])
    vit.load_state_dict(backbone["model"], strict=True)
    for key, value in vit.state_dict().items():
        assert torch.equal(value, ckpt["model"]["encoder." + key]), key
    assert vit.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 37, 192)
    with pytest.raises(MaeTransferError, match="not a checkpoint of tools/pretrain.py"):
        export_encoder(backbone_path, tmp_path / "again.pth")


# ------------------------------------------------------------------------------------------- resume
def test_resume_after_epoch_k_repeats_the_uninterrupted_run(coco_tiny: Path, tmp_path: Path, one_thread) -> None:
    images = copy_images(coco_tiny / "train2017", tmp_path / "images", 12)
    # num_workers=1: augmentation runs in a worker process, whose seed must also follow (seed, epoch).
    common = [*MICRO, "epochs=3", "warmup_epochs=1", "save_every=1", "num_workers=1", "lr=2e-3"]
    full = pretrain(tiny_cfg(images, tmp_path / "full", *common))

    # A run that died after epoch 1: its output folder holds checkpoint_last.pth = state after epoch 1.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint_0001.pth", resumed_dir / "checkpoint_last.pth")
    resumed = pretrain(tiny_cfg(images, resumed_dir, *common, "resume=auto"))

    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed, strict=True):  # epochs 2 and 3 were recomputed after the resume
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["lr"] == b["lr"], (full, resumed)
    assert len({h["loss"] for h in full}) == 3  # the losses change from epoch to epoch
    final_full = torch.load(tmp_path / "full" / "checkpoint_last.pth", weights_only=True)["model"]
    final_resumed = torch.load(resumed_dir / "checkpoint_last.pth", weights_only=True)["model"]
    for key, value in final_full.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=0, atol=1e-6)
    # Changing the seed changes the run (so the equality above is not trivially true).
    epoch1 = torch.load(tmp_path / "full" / "checkpoint_0001.pth", weights_only=True)["model"]
    assert not torch.equal(epoch1["decoder_pred.weight"], final_full["decoder_pred.weight"])


def test_gradient_accumulation_matches_the_larger_batch(coco_tiny: Path, tmp_path: Path, one_thread) -> None:
    images = copy_images(coco_tiny / "train2017", tmp_path / "images", 8)
    common = [*MICRO, "epochs=1", "warmup_epochs=0", "lr=1e-3", "recon_images=1"]
    pretrain(tiny_cfg(images, tmp_path / "big", *common, "batch_size=4", "accum_iter=1"))
    pretrain(tiny_cfg(images, tmp_path / "accum", *common, "batch_size=2", "accum_iter=2"))
    big = load_checkpoint(tmp_path / "big" / "checkpoint_last.pth")
    accum = load_checkpoint(tmp_path / "accum" / "checkpoint_last.pth")
    assert abs(big["history"][0]["loss"] - accum["history"][0]["loss"]) < 1e-5
    # Adam's moments are linear / quadratic in the gradients, so they show a wrong accumulation directly (a
    # missing 1/accum_iter doubles them), whereas Adam's update g / (|g| + eps) is scale-free.
    for index, state in big["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            scale = state[moment].abs().max().item()
            torch.testing.assert_close(accum["optimizer"]["state"][index][moment], state[moment],
                                       rtol=0, atol=1e-4 * scale)
    # Weights: where a gradient is as small as eps, last-bit differences of the summation order (which depend
    # on the CPU's BLAS kernels) move that element's Adam step by a few % of lr; 3e-5 = 3 % of one step.
    for key, value in big["model"].items():
        torch.testing.assert_close(accum["model"][key], value, rtol=1e-4, atol=3e-5)
    init = build_mae(resolve_config(big["config"]))  # same seed -> the same initial weights
    assert not torch.equal(init.state_dict()["decoder_pred.weight"], big["model"]["decoder_pred.weight"])


def test_bf16_autocast_runs_and_fp16_needs_a_gpu(coco_tiny: Path, tmp_path: Path, one_thread, monkeypatch) -> None:
    monkeypatch.setenv("MAE_TRANSFER_CPU_BF16", "1")  # the bf16 path on any host (emulated bf16 is fine at this size)
    images = copy_images(coco_tiny / "train2017", tmp_path / "images", 4)
    history = pretrain(tiny_cfg(images, tmp_path / "bf16", *MICRO, "epochs=1", "amp=bf16", "recon_images=1"))
    assert 0.0 < history[0]["loss"] < 10.0
    ckpt = load_checkpoint(tmp_path / "bf16" / "checkpoint_last.pth")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # autocast keeps fp32 master weights
    if not torch.cuda.is_available():
        with pytest.raises(MaeTransferError, match="fp16.*CUDA"):
            pretrain(tiny_cfg(images, tmp_path / "fp16", *MICRO, "amp=fp16", "device=cpu"))


def test_compiled_training_step_matches_eager(coco_tiny: Path, tmp_path: Path, one_thread) -> None:
    images = copy_images(coco_tiny / "train2017", tmp_path / "images", 8)
    common = [*MICRO, "epochs=2", "warmup_epochs=0", "lr=1e-3", "recon_images=1"]
    eager = pretrain(tiny_cfg(images, tmp_path / "eager", *common))
    compiled = pretrain(tiny_cfg(images, tmp_path / "compiled", *common, "compile=True"))
    for a, b in zip(eager, compiled, strict=True):  # inductor fuses and reorders float sums: equal up to rounding
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (eager, compiled)
    weights = load_checkpoint(tmp_path / "compiled" / "checkpoint_last.pth")["model"]
    reference = load_checkpoint(tmp_path / "eager" / "checkpoint_last.pth")["model"]
    assert weights.keys() == reference.keys()  # plain keys, no "_orig_mod." prefix
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-3, atol=1e-4)
    with pytest.raises(MaeTransferError, match="config key .compile. must be True or False"):
        resolve_config(tiny_cfg(images, tmp_path / "x", "compile='yes'"))


def test_nonfinite_loss_stops_with_clear_error(coco_tiny: Path, tmp_path: Path, one_thread) -> None:
    images = copy_images(coco_tiny / "train2017", tmp_path / "images", 4)
    cfg = tiny_cfg(images, tmp_path / "out", *MICRO, "epochs=2", "warmup_epochs=0", "lr=1e30")
    with pytest.raises(MaeTransferError, match=r"loss is (nan|inf).*last good checkpoint"):
        pretrain(cfg)


# ------------------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("case", ["empty", "missing", "model", "key", "all_corrupt"])
def test_cli_user_errors_exit_2_with_one_line(case: str, coco_tiny: Path, tmp_path: Path) -> None:
    data = tmp_path / "images"
    data.mkdir()
    (data / "notes.txt").write_text("not an image")
    extra: list[str] = []
    if case == "missing":
        data = tmp_path / "does_not_exist"
        expected = "image folder not found"
    elif case == "empty":
        expected = "no images"
    elif case == "all_corrupt":
        (data / "sub").mkdir()
        (data / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
        (data / "broken.png").write_bytes(b"garbage")
        expected = "no readable images"
    else:
        copy_images(coco_tiny / "train2017", data, 2)
        extra = ["encoder=vit_gigantic_patch16_224"] if case == "model" else ["--opts", "learning_rate=0.1"]
        expected = ("unknown model name 'vit_gigantic_patch16_224'" if case == "model"
                    else "unknown config key 'learning_rate'")
    proc = run_tool("--config", str(TINY), "--data", str(data), "--output-dir", str(tmp_path / "out"), *MICRO, *extra)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_skips_corrupt_image_with_warning(coco_tiny: Path, tmp_path: Path) -> None:
    data = copy_images(coco_tiny / "train2017", tmp_path / "images", 4)
    (data / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    proc = run_tool("--config", str(TINY), "--data", str(data), "--output-dir", str(out), *MICRO, "epochs=1")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "skipping unreadable image" in line]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0], proc.stderr
    assert load_checkpoint(out / "checkpoint_last.pth")["epoch"] == 1

    # Export through the CLI as well.
    proc = run_tool("--export-encoder", str(out / "checkpoint_last.pth"), str(tmp_path / "enc.pth"))
    assert proc.returncode == 0, proc.stderr
    assert torch.load(tmp_path / "enc.pth", weights_only=True)["format"] == BACKBONE_FORMAT


# ------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_torchrun_two_cpu_processes_gloo(coco_tiny: Path, tmp_path: Path) -> None:
    data = copy_images(coco_tiny / "train2017", tmp_path / "images", 8)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TOOL), "--config", str(TINY), "--data", str(data), "--output-dir", str(out), *MICRO,
           "epochs=1", "batch_size=2", "device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), effective batch 4" in proc.stderr
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    assert set(ckpt) == CKPT_KEYS and ckpt["world_size"] == 2 and ckpt["epoch"] == 1
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved without the DDP wrapper
    single = build_mae(resolve_config({**ckpt["config"], "data_path": "x", "output_dir": "y"}))
    single.load_state_dict(ckpt["model"], strict=True)
    assert (out / "recon_epoch0001.png").is_file()
