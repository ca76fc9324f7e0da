"""bf16 only where the CPU has bf16 units (mae_transfer/hardware.py): detection from /proc/cpuinfo, the
MAE_TRANSFER_CPU_BF16 override, and the AMP mode pretraining and fine-tuning really use on such a CPU."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from harnesses.synthetic import make_shapes_dataset
from mae_transfer import hardware
from mae_transfer.classification import finetune
from mae_transfer.coco import coco_crops_to_imagefolder
from mae_transfer.config import load_config
from mae_transfer.errors import MaeTransferError
from mae_transfer.hardware import (
    CPU_BF16_ENV,
    autocast_dtype,
    cpu_has_native_bf16,
    native_bf16_from_cpuinfo,
    resolve_amp,
)
from mae_transfer.pretraining import load_checkpoint, pretrain
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
# Flags lines as /proc/cpuinfo prints them (shortened): the AMD EPYC host with AVX2 only, and the two kinds
# of x86 bf16 units.
AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2\n"
AVX512_BF16 = "model name\t: AMD EPYC 9B45\nflags\t\t: avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
AMX = "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha2 crc32 atomics fphp asimdhp bf16 i8mm\n"


def test_cpuinfo_flags_decide() -> None:
    assert native_bf16_from_cpuinfo(AVX2_ONLY) is False
    assert native_bf16_from_cpuinfo(AVX512_BF16) is True
    assert native_bf16_from_cpuinfo(AMX) is True
    assert native_bf16_from_cpuinfo(ARM_BF16) is True
    assert native_bf16_from_cpuinfo(ARM_BF16.replace(" bf16", "")) is False
    assert native_bf16_from_cpuinfo("model name\t: something\n") is None  # no flags line: ask torch instead


def test_environment_override_forces_either_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert cpu_has_native_bf16() is False
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert cpu_has_native_bf16() is True
    monkeypatch.setenv(CPU_BF16_ENV, "true")
    with pytest.raises(MaeTransferError, match=f"{CPU_BF16_ENV} must be 0 or 1, got 'true'"):
        cpu_has_native_bf16()
    monkeypatch.delenv(CPU_BF16_ENV)
    if hardware.CPUINFO.is_file():  # Linux: the host's own flags decide
        assert cpu_has_native_bf16() is native_bf16_from_cpuinfo(hardware.CPUINFO.read_text())


def test_resolve_amp_turns_bf16_into_fp32_only_on_a_cpu_without_bf16(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    with caplog.at_level(logging.WARNING, logger="mae_transfer.hardware"):
        assert resolve_amp("bf16", "cpu") == "none"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "training in fp32" in warnings[0] and hardware.cpu_model() in warnings[0]
    assert "no bf16 units: bf16 is emulated" in warnings[0]
    assert autocast_dtype("bf16", torch.device("cpu")) is None
    caplog.clear()
    # Nothing else changes: other modes, and every mode on a GPU.
    assert [resolve_amp(a, "cpu") for a in ("none", "fp16")] == ["none", "fp16"]
    assert [resolve_amp(a, torch.device("cuda", 0)) for a in ("none", "bf16", "fp16")] == ["none", "bf16", "fp16"]
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16 and autocast_dtype("fp16", "cuda") is torch.float16
    assert not caplog.records
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_amp("bf16", "cpu") == "bf16" and autocast_dtype("bf16", "cpu") is torch.bfloat16


def test_cpu_configs_never_pick_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU configs train in fp32 on every host; the ViT-B/L recipes (bf16, meant for GPUs) fall back to
    fp32 through the resolver on a CPU without bf16 units."""
    cpu_configs = sorted(CONFIGS.glob("*_cpu.py"))
    plain = [p for p in cpu_configs if p.name.startswith(("mae_", "supervised_", "cls_"))]
    assert len(plain) >= 4
    for path in plain:
        assert load_config(path)["amp"] == "none", path.name
    from mmengine.config import Config

    for path in cpu_configs:
        if "upernet" in path.name:  # mmseg: no AmpOptimWrapper (which would autocast)
            assert Config.fromfile(str(path)).optim_wrapper.type == "OptimWrapper", path.name
    assert "train.amp.enabled = False" in (CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py").read_text()
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    gpu_recipes = [load_config(CONFIGS / name)["amp"] for name in
                   ("mae_pretrain_vit_b.py", "mae_pretrain_vit_l.py", "cls_finetune_vit_b.py", "cls_finetune_vit_l.py")]
    assert gpu_recipes == ["bf16"] * 4
    assert {resolve_amp(amp, "cpu") for amp in gpu_recipes} == {"none"}


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, num_train=12, num_val=2, size=96)  # every class in both crop splits


def _pretrain(images: Path, out: Path, amp: str) -> tuple[list[dict], dict]:
    cfg = load_config(CONFIGS / "mae_pretrain_vit_tiny_cpu.py", [
        "encoder_overrides={'depth': 1}", "img_size=64", "decoder_depth=1", "decoder_embed_dim=64", "batch_size=4",
        "recon_images=1", "epochs=2", "warmup_epochs=0", "lr=1e-3", f"amp={amp}"])
    cfg.update(data_path=str(images), output_dir=str(out))
    history = pretrain(cfg)
    return history, load_checkpoint(out / "checkpoint_last.pth")["model"]


def test_bf16_pretraining_on_a_cpu_without_bf16_trains_in_fp32(shapes: Path, tmp_path: Path, one_thread: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    images = shapes / "images" / "train"
    fp32_history, fp32_weights = _pretrain(images, tmp_path / "fp32", "none")
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    history, weights = _pretrain(images, tmp_path / "bf16_no_units", "bf16")
    assert history == fp32_history  # the very same fp32 computation
    assert all(torch.equal(weights[k], v) for k, v in fp32_weights.items())
    monkeypatch.setenv(CPU_BF16_ENV, "1")  # with bf16 units it does train in bf16: other rounding, other losses
    bf16_history, _ = _pretrain(images, tmp_path / "bf16", "bf16")
    assert bf16_history != fp32_history
    assert abs(bf16_history[-1]["loss"] - fp32_history[-1]["loss"]) < 0.1 * fp32_history[-1]["loss"]


def test_bf16_finetuning_on_a_cpu_without_bf16_trains_in_fp32(shapes: Path, tmp_path: Path, one_thread: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    crops = tmp_path / "crops"
    coco_crops_to_imagefolder(shapes / "annotations" / "instances_train.json", shapes / "images" / "train", crops,
                              min_size=8, val_fraction=0.34)

    def run(out: str, amp: str) -> list[dict]:
        cfg = load_config(CONFIGS / "cls_finetune_vit_tiny_cpu.py")
        cfg.update(model="vit_tiny_patch16_224", encoder_overrides={"depth": 1, "embed_dim": 64, "num_heads": 2},
                   img_size=32, batch_size=4, epochs=1, warmup_epochs=0, device="cpu", progress=False, num_workers=0,
                   data_path=str(crops), output_dir=str(tmp_path / out), amp=amp)
        return [{k: v for k, v in h.items() if k != "seconds"} for h in finetune(cfg)]

    fp32 = run("fp32", "none")
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert run("bf16_no_units", "bf16") == fp32
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert run("bf16", "bf16") != fp32
