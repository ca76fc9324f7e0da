"""tools/benchmark.py at tiny size: the report it writes (no timing is asserted; ratios are for the
committed base-size run, see benchmarks/README.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "benchmark.py"


def test_tiny_pretrain_pair_report(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(TOOL), "--size", "tiny", "--only", "pretrain,pretrain_bf16", "--rounds", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["tasks"]) == ["pretrain", "pretrain_bf16"]
    for row in results["tasks"].values():
        assert len(row["pair_ratios"]) == 2  # one ABBA round: two neighbouring-step ratios
        assert min(row["pair_ratios"]) <= row["speed_ratio"] <= max(row["pair_ratios"])
        for side in ("ours", "peer"):
            assert row[side]["img_per_s"] > 0 and row[side]["peak_mem_mb"] > 100  # RSS of a process with torch
        assert abs(row["memory_ratio"] - row["ours"]["peak_mem_mb"] / row["peer"]["peak_mem_mb"]) < 1e-9
        assert 0 < row["ours"]["gflops"] < 2 * results["matmul_gflops"]
    table = (tmp_path / "results.md").read_text()
    assert "| pretrain |" in table and "| pretrain_bf16 |" in table and "HF ViTMAEForPreTraining" in table and "1 warm-up" in table


def test_unknown_task_is_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(TOOL), "--only", "pretrain,detr", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: --only: unknown task(s) ['detr']; expected some of pretrain, pretrain_bf16, pretrain_compiled, det, seg"]
    assert not (tmp_path / "results.md").exists()
