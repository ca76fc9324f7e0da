"""The CUDA branches (marked `cuda`, skipped without a GPU; `pytest -m cuda` runs them, and so does
scripts/gpu_acceptance.sh): fp16 autocast + GradScaler in the pretraining engine, nccl with DDP, SDPA with a
rel-pos bias that needs gradients, and the attention paths that differ between CPU and CUDA (backbones/vit.py:
the CPU's chunked rel-pos kernel and explicit bf16 attention, SDPA on CUDA). Unmarked: what of
scripts/gpu_acceptance.sh a CPU can check (help, the one-line refusal without a GPU, every row's
measuring code on the tiny CPU configs, the table)."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones.vit import VisionTransformer, attention
from harnesses import gpu_acceptance as acceptance
from harnesses import gpu_measure
from harnesses.synthetic import make_shapes_dataset
from mae_transfer.config import load_config
from mae_transfer.mae import MaskedAutoencoder
from mae_transfer.pretraining import load_checkpoint, pretrain
from tests.conftest import REPO_ROOT

DEVICE = "cuda"
CONFIGS = REPO_ROOT / "configs"
SCRIPT = REPO_ROOT / "scripts" / "gpu_acceptance.sh"
# Small ViTDet-style model: windows of 14 in blocks 0 and 2, global blocks 1 and 3, decomposed rel-pos.
SMALL_DET = dict(embed_dim=64, depth=4, num_heads=2, window_size=14, global_block_indexes=(1, 3), use_rel_pos=True)


def cuda_test(test):
    """Marked `cuda` (pytest -m cuda selects it) and skipped, with the reason, without a GPU."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    return pytest.mark.cuda(skip(test))


@pytest.fixture
def ieee_fp32():
    """TF32 off (cuDNN uses it for fp32 convolutions by default), so CUDA fp32 agrees with the CPU to rounding."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield
    torch.backends.cuda.matmul.allow_tf32 = matmul


def max_rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    reference = reference.detach().float().cpu()
    return ((value.detach().float().cpu() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def norm_rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.detach().float().cpu()
    return ((value.detach().float().cpu() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter (rel-pos tables, LayerNorms, biases too) away from its trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def forward_backward(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: str,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output of model.forward_spatial and the gradients of all parameters and of the input, on `device`
    (under autocast to `dtype` if given)."""
    model = copy.deepcopy(model).to(device)
    x = x.to(device).requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.forward_spatial(x)[0]
    out.backward(grad.to(device, out.dtype))
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad
    return out, grads


# ------------------------------------------------------------------------------------------- attention on CUDA
@pytest.mark.parametrize("tokens,with_bias", [(50, False), (197, False), (196, True), (1024, True)])
@pytest.mark.usefixtures("ieee_fp32")
@cuda_test
def test_attention_on_cuda_matches_cpu_at_fp32(tokens: int, with_bias: bool) -> None:
    """backbones.vit.attention (SDPA) on CUDA, forward and backward, against the CPU at fp32: 1e-4. With a
    bias, its gradient too (a learned rel-pos bias)."""
    torch.manual_seed(0)
    shape = (2, 4, tokens, 32)
    inputs = [torch.randn(shape) for _ in range(3)] + ([torch.randn(2, 4, tokens, tokens)] if with_bias else [])
    grad = torch.randn(shape)

    def run(device: str) -> list[torch.Tensor]:
        leaves = [t.to(device).requires_grad_() for t in inputs]
        out = attention(*leaves[:3], leaves[3] if with_bias else None)
        out.backward(grad.to(device))
        return [out] + [t.grad for t in leaves]

    for name, got, want in zip(["out", "q", "k", "v", "bias"], run(DEVICE), run("cpu"), strict=True):
        assert max_rel_error(got, want) < 1e-4, name


@pytest.mark.usefixtures("ieee_fp32")
@cuda_test
def test_rel_pos_vit_on_cuda_matches_cpu_and_detectron2_at_fp32() -> None:
    """Our ViTDet-style ViT at 512 px (global blocks of 1024 tokens, where the CPU runs its chunked rel-pos
    kernel; CUDA runs SDPA with the rel-pos bias, which needs gradients) against the CPU and against
    detectron2's ViT on CUDA (explicit attention), same weights: outputs and every gradient to 1e-4."""
    from detectron2.modeling import ViT

    torch.manual_seed(0)
    ours = randomise(VisionTransformer(img_size=224, rel_pos_input_size=512, final_norm=False, **SMALL_DET))
    x, grad = torch.randn(1, 3, 512, 512), torch.randn(1, 64, 32, 32)
    out_cuda, grads_cuda = forward_backward(ours, x, grad, DEVICE)
    out_cpu, grads_cpu = forward_backward(ours, x, grad, "cpu")
    assert max_rel_error(out_cuda, out_cpu) < 1e-4
    assert grads_cuda.keys() == grads_cpu.keys() and "blocks.1.attn.rel_pos_h" in grads_cuda
    for name, g in grads_cpu.items():
        assert max_rel_error(grads_cuda[name], g) < 1e-4, name

    ref = ViT(img_size=512, patch_size=16, embed_dim=64, depth=4, num_heads=2, window_size=14,
              window_block_indexes=[0, 2], use_rel_pos=True, rel_pos_zero_init=False, pretrain_img_size=224,
              norm_layer=partial(nn.LayerNorm, eps=1e-6)).to(DEVICE)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and unexpected == ["cls_token"]
    xr = x.to(DEVICE).requires_grad_()
    out_ref = ref(xr)["last_feat"]
    out_ref.backward(grad.to(DEVICE))
    assert max_rel_error(out_cuda, out_ref) < 1e-4
    assert max_rel_error(grads_cuda["input"], xr.grad) < 1e-4
    for name, p in ref.named_parameters():
        assert max_rel_error(grads_cuda[name], p.grad) < 1e-4, name


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.usefixtures("ieee_fp32")
@cuda_test
def test_autocast_training_on_cuda_stays_close_to_fp32(dtype: torch.dtype, tolerance: float) -> None:
    """The mixed-precision paths the configs use on GPUs (bf16 pretraining / fine-tuning, fp16 detectron2 AMP)
    through SDPA with and without a rel-pos bias: output and gradients within a few units of the format's
    rounding of the fp32 CPU reference (relative 2-norm error)."""
    torch.manual_seed(0)
    ours = randomise(VisionTransformer(img_size=224, rel_pos_input_size=256, final_norm=False, **SMALL_DET))
    x, grad = torch.randn(2, 3, 256, 256), torch.randn(2, 64, 16, 16)
    out, grads = forward_backward(ours, x, grad, DEVICE, dtype)
    out_ref, grads_ref = forward_backward(ours, x, grad, "cpu")
    assert torch.isfinite(out).all()
    assert norm_rel_error(out, out_ref) < tolerance
    for name in ("input", "patch_embed.proj.weight", "blocks.1.attn.rel_pos_h", "blocks.1.attn.qkv.weight",
                 "blocks.0.attn.rel_pos_w", "blocks.3.mlp.fc2.weight"):
        assert norm_rel_error(grads[name], grads_ref[name]) < tolerance, name


@pytest.mark.usefixtures("ieee_fp32")
@cuda_test
def test_mae_on_cuda_matches_cpu_at_fp32() -> None:
    """MaskedAutoencoder (masking gathers, visible-patch embedding, decoder unshuffle) with the same noise on
    CUDA and on the CPU: loss to 1e-5, gradients to 1e-4."""
    torch.manual_seed(0)
    model = randomise(MaskedAutoencoder("vit_tiny_patch16_224", img_size=64, decoder_embed_dim=64, decoder_depth=2,
                                        decoder_num_heads=2, encoder_overrides={"depth": 2}))
    imgs, noise = torch.randn(4, 3, 64, 64), torch.rand(4, 16)
    results = {}
    for device in (DEVICE, "cpu"):
        m = copy.deepcopy(model).to(device)
        loss, _, _ = m(imgs.to(device), noise.to(device))
        loss.backward()
        results[device] = loss, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    (loss, grads), (loss_ref, grads_ref) = results[DEVICE], results["cpu"]
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        assert max_rel_error(grads[name], g) < 1e-4, name


# ------------------------------------------------------------------------------------------- engine on CUDA
@pytest.fixture(scope="module")
def shapes_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=16, num_val=2, size=96)
    return root / "images" / "train"


def micro_pretrain_cfg(images: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(CONFIGS / "mae_pretrain_vit_tiny_cpu.py", [
        "encoder_overrides={'depth': 2}", "img_size=64", "decoder_depth=1", "decoder_embed_dim=64", "batch_size=4",
        "recon_images=1", "warmup_epochs=1", "lr=1e-3", *overrides])
    cfg.update(data_path=str(images), output_dir=str(out))
    return cfg


@cuda_test
def test_fp16_grad_scaler_pretraining_on_cuda(shapes_images: Path, tmp_path: Path) -> None:
    """The engine's amp='fp16' branch (autocast + GradScaler, GPU only): a few epochs of tiny pretraining on
    CUDA give finite, falling losses, fp32 master weights and a saved scaler state."""
    history = pretrain(micro_pretrain_cfg(shapes_images, tmp_path, "amp=fp16", f"device={DEVICE}", "epochs=6"))
    losses = [h["loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    ckpt = load_checkpoint(tmp_path / "checkpoint_last.pth")
    assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 0  # GradScaler state, for an exact resume
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())


@cuda_test
def test_accumulating_amp_trainer_steps_once_per_iteration_on_cuda() -> None:
    """train_det.py's AMP trainer step with accumulation 2 (tiny Mask R-CNN at 256 px, fp16 + GradScaler): every
    iteration runs 2 micro-batches and one optimizer step through the scaler; the losses stay finite."""
    import itertools

    from detectron2.config import instantiate
    from detectron2.utils.events import EventStorage

    from mae_transfer.detection import checks as det_checks
    from mae_transfer.detection import recipe as detection_recipe

    cfg = det_checks.load_config(str(CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py"), ["model.roi_heads.num_classes=3"])
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(DEVICE).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = gpu_measure.synthetic_detection_batch(1, 256, 3)
    served = itertools.count()
    loader = (batch for _ in served)
    trainer = detection_recipe.build_trainer(model, loader, optimizer, amp=True, accumulation=2)
    assert isinstance(trainer, detection_recipe.AccumulatingAMPTrainer)
    steps = []
    optimizer.step = (lambda step: lambda *a, **k: (steps.append(1), step(*a, **k))[1])(optimizer.step)
    with EventStorage(0) as storage:
        for it in range(3):
            trainer.iter = storage.iter = it
            trainer.run_step()
        loss = storage.history("total_loss").latest()
    assert next(served) == 6 and len(steps) <= 3 and torch.isfinite(torch.tensor(loss))  # a skipped inf step is ok
    assert trainer.grad_scaler.get_scale() > 0


def fp16_accumulation_updates(device: str) -> dict[str, dict[str, torch.Tensor]]:
    """One optimizer step of the tiny Mask R-CNN (every proposal sampled, equal counts per image: the batch-wide
    loss normalisations agree per micro-batch) under fp16 autocast + GradScaler, with and without clipping
    (which unscales first), taken two ways: AMPTrainer on 4 images at once, and AccumulatingAMPTrainer on 1 image
    x 4 micro-batches. Returns each way's weight changes, in fp32 on the CPU; "scale" holds each way's loss scale
    after the step (unchanged: no step skipped)."""
    import itertools

    from detectron2.config import instantiate
    from detectron2.engine import AMPTrainer

    from mae_transfer.detection import checks as det_checks
    from mae_transfer.detection import recipe as detection_recipe
    from mae_transfer.detection import train as detection
    from tests.test_recipe import DET_EXACT, TINY_DET, _det_inputs

    cfg = det_checks.load_config(TINY_DET, DET_EXACT)
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    start = copy.deepcopy(model.state_dict())
    inputs = _det_inputs(4)
    init_scale = 2.0 ** 10  # a loss scale that leaves these tiny fp16 gradients finite: no skipped first step

    def one_step(trainer_of, clip: bool) -> tuple[dict[str, torch.Tensor], float]:
        model.load_state_dict(start)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        trainer = trainer_of(optimizer, torch.amp.GradScaler(device, init_scale=init_scale))
        trainer.register_hooks([detection.ClipGradients("full_model", 0.5) if clip else None])
        trainer.train(0, 1)
        change = {k: (v.detach().float() - start[k].float()).cpu() for k, v in model.state_dict().items()}
        return change, float(trainer.grad_scaler.get_scale())

    updates, scales = {}, {}
    for clip in (False, True):
        updates[f"batch_clip{clip}"], scales[f"batch_clip{clip}"] = one_step(
            lambda opt, scaler: AMPTrainer(model, itertools.repeat(inputs), opt, grad_scaler=scaler), clip)
        updates[f"accumulated_clip{clip}"], scales[f"accumulated_clip{clip}"] = one_step(
            lambda opt, scaler: detection_recipe.AccumulatingAMPTrainer(
                model, itertools.cycle([[x] for x in inputs]), opt, accumulation=4, grad_scaler=scaler), clip)
    assert all(s == init_scale for s in scales.values()), scales  # no step skipped for inf / nan gradients
    return updates


@cuda_test
def test_fp16_accumulation_equals_one_batch_on_cuda(ieee_fp32: None) -> None:
    """train_det.py's fp16 accumulation path compared by value, not by counting steps: 1 image x 4 accumulated
    under autocast + GradScaler (each micro-batch's scaled loss / 4, clipping once on the unscaled sum) makes the
    update of AMPTrainer on the 4 images at once, to fp16 rounding. A missing / 4, a gradient left scaled by the
    loss scale, or clipping per micro-batch would differ by far more (x4, x1024, another direction)."""
    updates = fp16_accumulation_updates(DEVICE)
    for clip in (False, True):
        batched, accumulated = updates[f"batch_clip{clip}"], updates[f"accumulated_clip{clip}"]
        flat_b = torch.cat([d.flatten() for d in batched.values()])
        flat_a = torch.cat([d.flatten() for d in accumulated.values()])
        assert flat_b.abs().max() > 0, clip
        assert norm_rel_error(flat_a, flat_b) < 2e-2, (clip, norm_rel_error(flat_a, flat_b))
        assert max_rel_error(flat_a, flat_b) < 5e-2, (clip, max_rel_error(flat_a, flat_b))


@cuda_test
def test_nccl_process_group_with_ddp(tmp_path: Path) -> None:
    """One process, world size 1: nccl reduces the engine's float64 epoch totals on the GPU, and a
    DDP-wrapped MAE (as the engine wraps it) under fp16 autocast + GradScaler gets the plain model's gradients."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        totals = torch.tensor([1.5, 2.0], dtype=torch.float64, device=DEVICE)
        dist.all_reduce(totals)
        assert totals.tolist() == [1.5, 2.0]
        torch.manual_seed(0)
        plain = MaskedAutoencoder("vit_tiny_patch16_224", img_size=64, decoder_embed_dim=64, decoder_depth=1,
                                  decoder_num_heads=2, encoder_overrides={"depth": 2}).to(DEVICE)
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(plain), device_ids=[torch.cuda.current_device()])
        imgs, noise = torch.randn(4, 3, 64, 64, device=DEVICE), torch.rand(4, 16, device=DEVICE)
        grads = []
        for model in (plain, ddp):
            scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
            with torch.autocast("cuda", dtype=torch.float16):
                loss, _, _ = model(imgs, noise)
            scaler.scale(loss).backward()
            grads.append({n.removeprefix("module."): p.grad / 1024.0 for n, p in model.named_parameters()
                          if p.grad is not None})
        assert grads[0].keys() == grads[1].keys()
        for name, g in grads[0].items():
            assert torch.isfinite(g).all() and max_rel_error(grads[1][name], g) < 1e-3, name
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl takes one GPU per process)")
@pytest.mark.cuda
def test_torchrun_two_gpus_nccl_fp16(shapes_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "tools" / "pretrain.py"), "--config", str(CONFIGS / "mae_pretrain_vit_tiny_cpu.py"),
           "--data", str(shapes_images), "--output-dir", str(out), "encoder_overrides={'depth': 2}", "img_size=64",
           "decoder_depth=1", "decoder_embed_dim=64", "batch_size=2", "recon_images=1", "epochs=1", "device=cuda",
           "amp=fp16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), effective batch 4" in proc.stderr
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    assert ckpt["world_size"] == 2 and ckpt["scaler"] and not any(k.startswith("module.") for k in ckpt["model"])


# ------------------------------------------------------------------------------------------- the acceptance run
def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # The test's own interpreter, as it is: no set-up step (which could reinstall into a shared .venv).
    env = {**os.environ, "MAE_TRANSFER_PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=env)


def test_acceptance_script_help_says_what_it_measures() -> None:
    proc = run_script("--help")
    assert proc.returncode == 0, proc.stderr
    assert "GPU acceptance run" in proc.stdout and "never falls back to the CPU" in proc.stdout
    for row in acceptance.ROW_NAMES:
        assert row in proc.stdout
    assert "0.314 / 0.603 s/im, 10.9 / 20.9 GB" in proc.stdout  # ViTDet's published numbers, side by side


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_acceptance_script_without_a_gpu_fails_with_one_line(tmp_path: Path) -> None:
    proc = run_script("--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: torch ") and "never falls back to the CPU" in lines[0]
    assert not (tmp_path / "out").exists()


def test_acceptance_rows_measure_the_tiny_cpu_configs(tmp_path: Path, one_thread: None) -> None:
    """Each GPU row's measuring function, run on the CPU with the tiny configs (same code: config loading,
    model and optimizer building, the trainers, timing, the table); the CLI itself only ever passes cuda."""
    det = gpu_measure.measure_detection(CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py", "cpu", 1, warmup=1, iters=2)
    assert det["image_size"] == 256 and det["amp"] == "fp32" and det["iters_timed"] == 2
    assert det["sec_per_image"] > 0 and det["peak_mem_gib"] > 0 and torch.isfinite(torch.tensor(det["total_loss"]))
    accum = gpu_measure.measure_detection(CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py", "cpu", 1, warmup=0, iters=2,
                                         accumulation=2)  # the det_vit_l_accum2 row: our accumulating trainer step
    assert accum["accumulation"] == 2 and accum["sec_per_image"] == pytest.approx(accum["sec_per_iter"] / 2)
    seg = gpu_measure.measure_segmentation(CONFIGS / "ade20k_upernet_vit_tiny_cpu.py", "cpu", warmup=1, iters=2)
    assert seg["crop"] == [128, 128] and seg["images_per_iter"] == 4 and seg["optim_wrapper"] == "OptimWrapper"
    assert seg["sec_per_iter"] > 0 and seg["loss"] > 0
    mae = gpu_measure.measure_pretraining(CONFIGS / "mae_pretrain_vit_tiny_cpu.py", "cpu", warmup=1, iters=2)
    assert mae["batch"] == 16 and mae["amp"] == "fp32" and mae["img_per_s"] > 0 and mae["loss"] > 0

    bench = json.loads((REPO_ROOT / "benchmarks" / "results.json").read_text())["tasks"]["det"]
    measured = {"det_vit_b": det, "det_vit_l_accum2": accum, "seg_vit_b": seg, "mae_vit_b": mae, "bench_det": bench,
                "pytest_cuda": {"summary": "5 passed, 1 skipped"}}
    rows = []
    for row in acceptance.ROWS:
        if row.name in measured:
            result, memory = acceptance.row_cells(row.name, measured[row.name])
            rows.append(dict(name=row.name, what=row.what, result=result, reference=row.reference, memory=memory,
                             reference_memory=row.reference_memory, status="ok", data=measured[row.name]))
    meta = dict(date="today", gpu="test", torch=torch.__version__, cuda=None, commit="abc", seconds=1.0)
    table = acceptance.write_report(meta, rows, tmp_path)
    assert table.count("\n") == 1 + len(rows)
    what = {row.name: row.what for row in acceptance.ROWS}
    assert f"| det_vit_b | {what['det_vit_b']} | {det['sec_per_image']:.3f} s/im (1 im/iter, 2 iters) | " \
           "0.314 s/im (ViTDet, A100) |" in table
    assert f"| {accum['sec_per_iter']:.3f} s/iter = {accum['sec_per_image']:.3f} s/im (1 im x 2 accumulation, 2 " \
           "iters) | 0.603 s/im (ViTDet, A100) |" in table
    assert "| pytest_cuda | " in table and "5 passed, 1 skipped" in table
    assert table in (tmp_path / "results.md").read_text()
    assert [r["name"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]] == [
        "pytest_cuda", "det_vit_b", "det_vit_l_accum2", "seg_vit_b", "mae_vit_b", "bench_det"]  # the run's order


def test_out_is_no_spelling_of_output_dir(tmp_path: Path, capsys) -> None:
    assert acceptance.build_parser().parse_args(["--output-dir", str(tmp_path)]).output_dir == tmp_path
    with pytest.raises(SystemExit):
        acceptance.build_parser().parse_args(["--out", str(tmp_path)])
    assert "unrecognized arguments: --out" in capsys.readouterr().err


def test_pytest_summary_counts() -> None:
    assert acceptance.pytest_counts("....\n5 passed, 1 skipped, 300 deselected in 42.10s\n") == dict(
        passed=5, skipped=1, deselected=300)
    assert acceptance.pytest_counts("F.\n=== 1 failed, 1 passed, 2 errors in 3.0s ===") == dict(
        failed=1, passed=1, errors=2)
    assert acceptance.pytest_counts("collected 0 items\n") == {}


def test_acceptance_plan_fits_eight_minutes_and_eight_files() -> None:
    """The lent GPU machine gives one command 10 minutes and brings back at most 8 files: the rows' caps add up to
    the default budget, which with the kit's set-up fits 8 minutes; every row logs to one of the planned files."""
    assert sum(row.budget_s for row in acceptance.ROWS) == acceptance.DEFAULT_BUDGET_S
    assert acceptance.DEFAULT_BUDGET_S + acceptance.SETUP_ALLOWANCE_S <= acceptance.RUN_LIMIT_S == 8 * 60
    files = acceptance.out_files()
    assert len(files) <= 8 and {acceptance.log_group(row.name) for row in acceptance.ROWS} <= set(files)


def test_a_row_gets_its_cap_plus_what_earlier_rows_left_unused() -> None:
    rows = [acceptance.Row("a", "", 30), acceptance.Row("b", "", 40), acceptance.Row("c", "", 50)]
    assert acceptance.row_cap(rows, 0, 120) == 30
    assert acceptance.row_cap(rows, 1, 110) == 60  # row a used 10 s of its 30: b may use 40 + 20
    assert acceptance.row_cap(rows, 2, 35) == 35  # never past the budget
    assert acceptance.row_cap(rows, 1, 80) == 40  # its own cap even when earlier rows overran theirs


def test_trim_log_keeps_its_start_and_end(tmp_path: Path) -> None:
    log = tmp_path / "det.log"
    log.write_bytes(b"first line\n" + b"x" * 5000 + b"\nTraceback: the last error\n")
    acceptance.trim_log(log, limit=1000)
    text = log.read_text()
    assert len(text) < 1000 and text.startswith("first line") and text.endswith("the last error\n")
    assert "bytes cut ...]" in text


def test_rehearsal_of_a_row_builds_the_real_config_and_steps_the_tiny_one(tmp_path: Path) -> None:
    """--rehearse (no GPU): the mae_vit_b row builds configs/mae_pretrain_vit_b.py's model (MAE ViT-B with its
    8-block 512-wide decoder: 111.9M parameters, as the official MAE code counts it) and takes one step of the tiny
    CPU config, in a row process of its own; --output-dir then holds the planned files only."""
    out = tmp_path / "out"
    assert acceptance.main(["--rehearse", "--only", "mae_vit_b", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mae.log", "results.json", "results.md"]
    row, = json.loads((out / "results.json").read_text())["rows"]
    assert row["status"] == "ok" and row["memory"] == "-"
    assert row["result"] == ("rehearsal: mae_pretrain_vit_b.py: 111.9M parameters built; 1 step of "
                             "mae_pretrain_vit_tiny_cpu.py on the CPU")
    assert math.isfinite(row["data"]["loss"]) and row["data"]["iters_timed"] == 1
