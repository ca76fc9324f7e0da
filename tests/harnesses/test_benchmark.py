"""tools/benchmark.py at its micro size: the report it writes (no timing is asserted; ratios are for the
committed base-size run, see benchmarks/README.md). MAE_TRANSFER_CPU_BF16 forces the CPU's bf16 branch
either way, so both run on any host: on a CPU without bf16 units the bf16 row is skipped, with the reason."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mae_transfer.hardware import CPU_BF16_ENV, cpu_model
from tests.conftest import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "benchmark.py"


def run_benchmark(out: Path, *args: str, cpu_bf16: str | None = None,
                  timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CPU_BF16_ENV}
    if cpu_bf16 is not None:
        env[CPU_BF16_ENV] = cpu_bf16
    return subprocess.run([sys.executable, str(TOOL), *args, "--output-dir", str(out)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT, env=env)


def check_measured_row(row: dict[str, Any], matmul_gflops: float) -> None:
    assert len(row["pair_ratios"]) == 2  # one ABBA round: two neighbouring-step ratios
    assert min(row["pair_ratios"]) <= row["speed_ratio"] <= max(row["pair_ratios"])
    for side in ("ours", "peer"):
        assert row[side]["img_per_s"] > 0 and row[side]["peak_mem_mb"] > 100  # RSS of a process with torch
    assert abs(row["memory_ratio"] - row["ours"]["peak_mem_mb"] / row["peer"]["peak_mem_mb"]) < 1e-9
    assert 0 < row["ours"]["gflops"] < 2 * matmul_gflops


@pytest.mark.slow  # the two benchmark runs, ~270 s together on 2 cores; still in the README command and CI
def test_cpu_without_bf16_units_skips_the_bf16_row_with_the_reason(tmp_path: Path) -> None:
    proc = run_benchmark(tmp_path, "--size", "micro", "--only", "pretrain,pretrain_bf16", "--rounds", "1", cpu_bf16="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["tasks"]) == ["pretrain", "pretrain_bf16"]
    check_measured_row(results["tasks"]["pretrain"], results["matmul_gflops"])
    skipped = results["tasks"]["pretrain_bf16"]
    assert set(skipped) == {"skipped", "measured"}  # nothing was measured for it
    assert cpu_model() in skipped["skipped"] and "no bf16 units: bf16 is emulated" in skipped["skipped"]
    table = (tmp_path / "results.md").read_text()
    assert "| pretrain | " in table and "HF ViTMAEForPreTraining" in table and "1 warm-up" in table
    bf16_row = next(line for line in table.splitlines() if line.startswith("| pretrain_bf16 |"))
    assert f"skipped on {cpu_model()}: no bf16 units: bf16 is emulated" in bf16_row
    assert "memory pretrain_bf16" not in proc.stdout  # no worker was started for the skipped row


@pytest.mark.slow
def test_cpu_with_bf16_units_runs_the_bf16_row(tmp_path: Path) -> None:
    # Forced on: at the micro size this is quick even where bf16 is emulated.
    proc = run_benchmark(tmp_path, "--size", "micro", "--only", "pretrain_bf16", "--rounds", "1", cpu_bf16="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["tasks"]) == ["pretrain_bf16"]
    check_measured_row(results["tasks"]["pretrain_bf16"], results["matmul_gflops"])
    table = (tmp_path / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| pretrain_bf16 |"))
    assert "HF ViTMAEForPreTraining" in row and "(bf16)" in row and "skipped" not in row


@pytest.mark.parametrize("args,cpu_bf16,expected", [
    (["--only", "pretrain,detr"], None,
     "error: --only: unknown task(s) ['detr']; expected some of pretrain, pretrain_bf16, pretrain_compiled, det, seg, "
     "seg_backbone"),
    (["--only", "pretrain_bf16"], "yes", f"error: environment variable {CPU_BF16_ENV} must be 0 or 1, got 'yes'"),
])
def test_bad_input_is_one_line_error(tmp_path: Path, args: list[str], cpu_bf16: str | None, expected: str) -> None:
    proc = run_benchmark(tmp_path, *args, cpu_bf16=cpu_bf16, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "results.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_error(tmp_path: Path) -> None:
    proc = run_benchmark(tmp_path, "--device", "cuda", "--only", "pretrain", timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: no CUDA device"), proc.stderr
    assert not (tmp_path / "results.md").exists()


def test_out_is_no_spelling_of_output_dir(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("benchmark_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.build_parser().parse_args(["--output-dir", str(tmp_path)]).output_dir == tmp_path
    with pytest.raises(SystemExit):
        tool.build_parser().parse_args(["--out", str(tmp_path)])
    assert "unrecognized arguments: --out" in capsys.readouterr().err


def test_seg_backbone_pair_is_one_architecture_on_both_sides() -> None:
    """The seg_backbone row compares like with like: our MAEViT and mmseg's MAE at the same size have the same
    parameters (BEiT relative position bias tables and layer scale included), the same 4 outputs, and one
    step gives every parameter a gradient on both sides."""
    from harnesses.benchmark import SIZES, Job, build_seg_backbone

    job = Job(worker="speed", size="micro", device="cpu", warmup=0, threads=1, task="seg_backbone")
    crop, batch = SIZES["micro"].seg_crop, SIZES["micro"].seg_batch
    shapes = {}
    for impl in ("ours", "peer"):
        bench = build_seg_backbone(impl, job)
        bench.step()
        params = dict(bench.model.named_parameters())
        assert all(p.grad is not None for p in params.values()), impl
        bias = [n for n in params if n.endswith("attn.relative_position_bias_table")]
        scale = [n for n in params if n.endswith(("gamma_1", "gamma_2"))]
        assert len(bias) == 4 and len(scale) == 8, impl  # the micro ViT's 4 blocks
        with torch.no_grad():
            outs = bench.model(torch.randn(batch, 3, crop, crop))
        shapes[impl] = (sum(p.numel() for p in params.values()), len(params), [tuple(o.shape) for o in outs])
    assert shapes["ours"] == shapes["peer"]
    assert shapes["ours"][2] == [(batch, 64, crop // 16, crop // 16)] * 4
