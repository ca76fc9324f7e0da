"""GPU acceptance run: the GPU paths of this project measured on one CUDA GPU, one table at the end.

Rows, each in its own process with its own time budget (a row that fails or runs out of time is recorded
in the table and the run goes on; the exit status is then 1):
  pytest_cuda      pytest -m cuda: fp16 autocast + GradScaler in the pretraining engine, an nccl process
                   group with DDP, SDPA with a rel-pos bias that needs gradients, CUDA vs CPU attention
  det_vit_b        ViTDet Mask R-CNN train iterations at 1024 px (configs/coco_mask_rcnn_vit_{b,l}.py under
  det_vit_l_accum2 their AMP: detectron2's AMPTrainer, fp16 autocast + GradScaler) on synthetic 1024x1024
                   images with boxes + polygon masks: s/image and peak memory, beside ViTDet's published
                   A100 numbers (0.314 / 0.603 s/im, 10.9 / 20.9 GB); ViT-L at 1 image per GPU with gradient
                   accumulation 2 (our AMP trainer step, as train_det.py runs ViTDet's batch on fewer GPUs): s/iter
  seg_vit_b_amp    UperNet ViT-B train iterations at 512 px, batch 2 (configs/ade20k_upernet_vit_b.py)
  seg_vit_b        with the AmpOptimWrapper train_seg.py builds on GPUs (fp16, dynamic loss scale, as mmseg's
                   MAE run: 9.96 GB) / the config's OptimWrapper (fp32): s/iteration and peak memory
  mae_vit_b/_l     MAE pretraining steps of configs/mae_pretrain_vit_{b,l}.py (batch 64, bf16): img/s, memory
  bench_*          tools/benchmark.py --device cuda --size base, one task each: ours vs HF ViTMAE (fp32 and
                   bf16), detectron2's ViT, mmseg's MAE backbone
Peak memory is torch.cuda.max_memory_allocated (what detectron2 and mmengine log). The table is printed
and written as results.md + results.json to --output-dir (default benchmarks/gpu/), beside one log per group of
rows (pytest.log, det.log, seg.log, mae.log, bench.log) and setup.log: at most 8 files, none over 16 MiB.
Each row has its own time cap; together they fit --budget (default 450 s: with the kit's set-up, the
whole run stays within 8 minutes on one H100 / H200). Without a CUDA GPU it stops at once with one error
line: it never falls back to the CPU.

On a machine without this project's environment (the GPU machine of docs/GPU.md: its own Python 3.12 and
torch, no network), --kit .whl first installs the wheels of scripts/gpu_kit.sh offline into --site and puts
them on every row's PYTHONPATH. --rehearse runs every row's set-up (the real config's model) and one step
of its tiny CPU config on the CPU instead, timing nothing: the rehearsal of that run on a CPU machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harnesses.benchmark import PEERS
from harnesses.gpu_kit import install_kit, kit_wheels
from harnesses.gpu_measure import (
    build_detection_model,
    build_pretraining_model,
    build_segmentation_model,
    measure_detection,
    measure_pretraining,
    measure_segmentation,
)
from mae_transfer.errors import MaeTransferError
from mae_transfer.paths import REPO_ROOT
from mae_transfer.subprocess_runner import run_process


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    budget_s: int  # wall-clock limit of the row's process(es), start-up included
    reference: str = "-"
    reference_memory: str = "-"


# Run in this order: the correctness row first, the benchmark pairs (the most processes) last. Each cap covers
# the row's process start, imports and model building too (on an H100 / H200 an iteration of these rows takes
# well under a second, so 3 warm-up + 10 timed ones fit; a slow row stops timing at its cap minus 10 s). The
# benchmark rows start 5 processes each (2 matmul probes, each side's memory, the interleaved speed run).
# Time a row leaves unused goes to the rows after it (row_cap).
ROWS = [
    Row("pytest_cuda", "pytest -m cuda (tests/test_cuda.py)", 70),
    Row("det_vit_b", "Mask R-CNN ViT-B train iter, 1024 px, config AMP (fp16 + GradScaler)", 40,
        "0.314 s/im (ViTDet, A100)", "10.9 GB"),
    Row("det_vit_l_accum2", "Mask R-CNN ViT-L, 1024 px, 1 image/GPU x accumulation 2, config AMP (fp16 + "
        "GradScaler)", 50, "0.603 s/im (ViTDet, A100)", "20.9 GB"),
    Row("seg_vit_b_amp", "UperNet ViT-B train iter, 512 px, fp16 AmpOptimWrapper", 35,
        "-", "9.96 GB (mmseg MAE, V100)"),
    Row("seg_vit_b", "UperNet ViT-B train iter, 512 px, config OptimWrapper (fp32)", 30),
    Row("mae_vit_b", "MAE ViT-B pretraining step, config batch + AMP", 25),
    Row("mae_vit_l", "MAE ViT-L pretraining step, config batch + AMP", 30),
    Row("bench_pretrain", "benchmark: MAE ViT-B step vs HF ViTMAE, fp32", 40),
    Row("bench_pretrain_bf16", "benchmark: MAE ViT-B step vs HF ViTMAE, bf16", 40),
    Row("bench_det", "benchmark: ViTDet-B backbone 1024 px vs detectron2 ViT", 45),
    Row("bench_seg", "benchmark: UperNet ViT-B iter vs mmseg MAE backbone", 45),
]
ROW_NAMES = [row.name for row in ROWS]
# All rows together (the sum of their caps): with the kit's install, its import check and the GPU probe the run
# stays within 8 minutes, inside one 10-minute command on the lent machine (docs/GPU.md).
DEFAULT_BUDGET_S = 450
RUN_LIMIT_S = 480  # what the plan must fit: DEFAULT_BUDGET_S + SETUP_ALLOWANCE_S (tests/test_cuda.py checks it)
SETUP_ALLOWANCE_S = 30
BENCH_ROUNDS = {"pretrain": 10, "pretrain_bf16": 10, "det": 5, "seg": 5}
# The files written to --output-dir: results.md, results.json, setup.log and one log per group (the device tool brings
# back at most 8 files of at most 16 MiB each).
LOG_GROUPS = {"pytest_cuda": "pytest", "det_": "det", "seg_": "seg", "mae_": "mae", "bench_": "bench"}
MAX_LOG_BYTES = 15 * 2 ** 20
# --rehearse: each row's tiny CPU stand-in config (same code path, small numbers), and its own time cap.
REHEARSAL_CONFIGS = {"det": "coco_mask_rcnn_vit_tiny_cpu.py", "seg": "ade20k_upernet_vit_tiny_cpu.py",
                     "mae": "mae_pretrain_vit_tiny_cpu.py"}
REHEARSAL_ROW_S = 600
NOTES = [
    "Peak memory: torch.cuda.max_memory_allocated over the row's process (weights, optimizer state, "
    "activations), in GiB, as detectron2 and mmengine report it.",
    "ViTDet's published numbers come from 64-GPU training with 1 image per GPU (so they include gradient "
    "all-reduce); det rows here use one GPU, --det-batch images per iteration (default 1), synthetic 1024x1024 "
    "images with 8 boxes + polygon masks each, the learning rate of the first warm-up iteration; det_vit_l_accum2 "
    "accumulates 2 such micro-batches per optimizer step (how train_det.py keeps ViTDet's batch of 64 on fewer GPUs), "
    "so its memory is that of 1 image per GPU.",
    "mmseg's 9.96 GB: its MAE ViT-B UperNet run (fp16, 2 images per V100); seg rows use the config's batch "
    "of 2 random 512x512 images.",
    "bench_* rows: tools/benchmark.py (both sides interleaved in one process; memory each side alone); "
    "its own report is in bench.log.",
]


def rehearse_row(config: Path, build: Callable[[], int], measure: Callable[..., dict[str, Any]],
                 deadline: float) -> dict[str, Any]:
    """--rehearse: the row's real set-up (`build`: its config's model and optimizer, on the CPU), then one step of
    `measure` on the CPU, no warm-up (measure's own config: the tiny stand-in). Nothing here is a timing."""
    params = build()
    data = measure(device="cpu", warmup=0, iters=1, deadline=deadline)
    return {**data, "rehearsal": dict(setup=f"{config.name}: {params / 1e6:.1f}M parameters built",
                                      step=f"1 step of {Path(data['config']).name} on the CPU")}


def _det(name: str, accumulation: int = 1) -> Callable[..., dict[str, Any]]:
    config = REPO_ROOT / "configs" / f"coco_mask_rcnn_{name}.py"

    def row(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
        if args.rehearse:
            return rehearse_row(config, lambda: build_detection_model(config), lambda **kw: measure_detection(
                REPO_ROOT / "configs" / REHEARSAL_CONFIGS["det"], images_per_iter=1, accumulation=accumulation,
                **kw), deadline)
        return measure_detection(config, "cuda", args.det_batch, args.warmup, args.iters, deadline, accumulation)
    return row


def _seg(amp: bool) -> Callable[..., dict[str, Any]]:
    config = REPO_ROOT / "configs" / "ade20k_upernet_vit_b.py"

    def row(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
        if args.rehearse:  # the step in fp32: fp16 autocast is a CUDA path (its set-up is built all the same)
            return rehearse_row(config, lambda: build_segmentation_model(config, amp), lambda **kw: (
                measure_segmentation(REPO_ROOT / "configs" / REHEARSAL_CONFIGS["seg"], amp=False, **kw)), deadline)
        return measure_segmentation(config, "cuda", amp, args.warmup, args.iters, deadline)
    return row


def _mae(name: str) -> Callable[..., dict[str, Any]]:
    config = REPO_ROOT / "configs" / f"mae_pretrain_{name}.py"

    def row(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
        if args.rehearse:
            return rehearse_row(config, lambda: build_pretraining_model(config), lambda **kw: measure_pretraining(
                REPO_ROOT / "configs" / REHEARSAL_CONFIGS["mae"], **kw), deadline)
        return measure_pretraining(config, "cuda", args.warmup, args.iters, deadline)
    return row


# Rows measured in a child process of this module (always on CUDA: the parent checked for it).
CHILD_ROWS: dict[str, Callable[[argparse.Namespace, float], dict[str, Any]]] = {
    "det_vit_b": _det("vit_b"), "det_vit_l_accum2": _det("vit_l", accumulation=2), "seg_vit_b_amp": _seg(True),
    "seg_vit_b": _seg(False),
    "mae_vit_b": _mae("vit_b"), "mae_vit_l": _mae("vit_l")}


# ---------------------------------------------------------------------------------------------- cells
def row_cells(name: str, data: dict[str, Any]) -> tuple[str, str]:
    """(result, memory) table cells of a row's measurements (of a rehearsal: what ran, no timings)."""
    if "rehearsal" in data:
        return f"rehearsal: {data['rehearsal']['setup']}; {data['rehearsal']['step']}", "-"
    if name.startswith("bench_") and "skipped" in data:
        return f"benchmark skipped: {data['skipped']}", "-"
    if name.startswith("bench_") and data.get("rehearsal_device") == "cpu":
        return (f"rehearsal: ours and {data['peer_name']} built and stepped on the CPU "
                f"({len(data['pair_ratios'])} pairs, size {data['size']})", "-")
    if name.startswith("det_"):
        k = data.get("accumulation", 1)
        per_iter = (f"{data['sec_per_iter']:.3f} s/iter = " if k > 1 else "")
        batch = f"{data['images_per_iter']} im x {k} accumulation" if k > 1 else f"{data['images_per_iter']} im/iter"
        return (f"{per_iter}{data['sec_per_image']:.3f} s/im ({batch}, {data['iters_timed']} iters)",
                f"{data['peak_mem_gib']:.1f} GB")
    if name.startswith("seg_"):
        return (f"{data['sec_per_iter']:.3f} s/iter ({data['images_per_iter']} im/iter, {data['iters_timed']} iters)",
                f"{data['peak_mem_gib']:.1f} GB")
    if name.startswith("mae_"):
        return (f"{data['img_per_s']:.0f} img/s (batch {data['batch']}, {data['amp']}, {data['iters_timed']} iters)",
                f"{data['peak_mem_gib']:.1f} GB")
    if name.startswith("bench_"):
        ours, peer = data["ours"], data["peer"]
        return (f"ours {ours['img_per_s']:.1f} vs peer {peer['img_per_s']:.1f} img/s: **{data['speed_ratio']:.2f}x** "
                f"speed", f"{ours['peak_mem_mb'] / 1024:.1f} vs {peer['peak_mem_mb'] / 1024:.1f} GB "
                f"({data['memory_ratio']:.2f}x)")
    if name == "pytest_cuda":
        return data["summary"], "-"
    raise KeyError(name)


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's final summary line, e.g. '3 passed, 1 skipped, 200 deselected in 9.1s'."""
    summary = [ln for ln in output.strip().splitlines()
               if re.search(r"\d+ (passed|failed|error|skipped|deselected|no tests)", ln)]
    counts: dict[str, int] = {}
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                   summary[-1] if summary else ""):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | what | result | reference | peak memory | reference memory | status |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['what']} | {r['result']} | {r['reference']} | {r['memory']} | "
                     f"{r['reference_memory']} | {r['status']} |")
    return "\n".join(lines)


def write_report(meta: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> str:
    from mae_transfer.io import atomic_write_text

    table = format_table(rows)
    text = "\n".join([f"# GPU acceptance run ({meta['date']})", "",
                      f"GPU: {meta['gpu']}; torch {meta['torch']} (CUDA {meta['cuda']}); commit {meta['commit']}; "
                      f"{meta['seconds']:.0f} s for the rows.", "", table, "", *[f"- {n}" for n in NOTES], ""])
    atomic_write_text(json.dumps(dict(meta=meta, rows=rows), indent=2), out / "results.json")
    atomic_write_text(text, out / "results.md")
    return table


# ---------------------------------------------------------------------------------------------- driver
def require_cuda() -> None:
    """One clear MaeTransferError unless torch sees a CUDA GPU: this run never falls back to the CPU."""
    try:
        import torch
    except ImportError:  # the kit brings no torch: the GPU machine's image has it
        raise MaeTransferError(f"{sys.executable} has no torch: run on the GPU machine's image python (docs/GPU.md), "
                               "or name one with torch: MAE_TRANSFER_PYTHON=/path/to/python") from None

    with warnings.catch_warnings(record=True) as caught:  # e.g. a driver too old: folded into the one line
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return
    why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else
           f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU: "
           "torch.cuda.is_available() is False")
    if caught:
        why += f" ({str(caught[0].message).strip().splitlines()[0]})"
    raise MaeTransferError(f"{why}; the GPU acceptance run measures the GPU code paths and never falls back to the CPU")


def log_group(row_name: str) -> str:
    """The log file (in --output-dir) of a row: one per group of rows."""
    return next(group for prefix, group in LOG_GROUPS.items() if row_name.startswith(prefix)) + ".log"


def trim_log(log: Path, limit: int = MAX_LOG_BYTES) -> None:
    """Keep a log under `limit` bytes (the device tool brings back no file over 16 MiB): its first and last parts."""
    size = log.stat().st_size
    if size <= limit:
        return
    with log.open("rb") as fh:
        head = fh.read(limit // 4)
        fh.seek(size - limit // 2)
        tail = fh.read()
    log.write_bytes(head + f"\n[... {size - len(head) - len(tail)} bytes cut ...]\n".encode() + tail)


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str], title: str = "") -> tuple[int | None,
                                                                                                           str]:
    """Run `cmd` (and whatever it starts, in a session of its own) with its output appended to `log` under a `title`
    line; (exit status, or None if it ran past `timeout` and was killed; its output)."""
    done = run_process(cmd, log=log, title=title or cmd[-1], env=env, timeout=max(1.0, timeout), new_session=True)
    output = done.output()
    trim_log(log)
    return done.code, output


def last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|error)\b", ln)]
    return ((errors or lines or ["no output"])[-1])[:300].replace("|", "/")


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)}


def run_one(row: Row, args: argparse.Namespace, timeout: float, scratch: Path) -> tuple[str, dict[str, Any]]:
    """Measure one row in its own process(es), its output appended to its group's log in --output-dir, its result files
    in `scratch` (not in --output-dir, which holds at most 8 files): (status, measurements)."""
    log = args.output_dir / log_group(row.name)
    env = child_env()
    over = f"FAILED: over its {timeout:.0f} s cap (log: {log.name})"
    if row.name in CHILD_ROWS:
        result = scratch / f"{row.name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "harnesses.gpu_acceptance", "--row", row.name, "--row-result", str(result),
               "--row-deadline", str(time.time() + timeout - 10), "--det-batch", str(args.det_batch),
               "--iters", str(args.iters), "--warmup", str(args.warmup)] + (["--rehearse"] if args.rehearse else [])
        rc, output = run_logged(cmd, log, timeout, env, row.name)
        if rc is None:
            return over, {}
        if rc != 0 or not result.is_file():
            return f"FAILED: {last_error(output)} (log: {log.name})", {}
        return "ok", json.loads(result.read_text())
    if row.name.startswith("bench_"):
        task = row.name[len("bench_"):]
        bench_out = scratch / "benchmark"
        cmd = [sys.executable, str(REPO_ROOT / "tools" / "benchmark.py"), "--device", "cuda", "--size", "base",
               "--only", task, "--rounds", str(BENCH_ROUNDS[task]), "--output-dir", str(bench_out)]
        if args.rehearse:  # both sides built and stepped once at the smallest size, one thread
            cmd = cmd[:2] + ["--device", "cpu", "--size", "micro", "--only", task, "--rounds", "1", "--warmup", "0",
                             "--threads", "1", "--output-dir", str(bench_out)]
        rc, output = run_logged(cmd, log, timeout, env, row.name)  # its own report is printed into the log
        if rc is None:
            return over, {}
        if rc != 0:
            return f"FAILED: {last_error(output)} (log: {log.name})", {}
        results = json.loads((bench_out / "results.json").read_text())
        return "ok", {**results["tasks"][task], "peer_name": PEERS[task], "size": results["meta"]["size"],
                      "rehearsal_device": results["meta"]["device"] if args.rehearse else None}
    if row.name == "pytest_cuda":
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider"]
        rc, output = run_logged(cmd, log, timeout, env, row.name)
        if rc is None:
            return over, {}
        counts = pytest_counts(output)
        summary = ", ".join(f"{n} {w}" for w, n in counts.items() if w != "deselected") or "no result line"
        # A rehearsal has no GPU: every cuda test skips, and what it shows is that they all collect.
        problem = ("some failed" if counts.get("failed") or counts.get("errors") else
                   "none passed" if not counts.get("passed") and not (args.rehearse and counts.get("skipped")) else
                   f"exit status {rc}" if rc else "")
        status = f"FAILED: {problem} (log: {log.name})" if problem else "ok"
        if args.rehearse:
            summary = f"rehearsal: {summary} (no GPU: collected, then skipped)"
        return status, dict(counts=counts, summary=summary)
    raise KeyError(row.name)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


GPU_PROBE = ("import json, torch; p = torch.cuda.get_device_properties(0); x = torch.ones(1024, 1024, device='cuda'); "
             "print(json.dumps(dict(gpu=f'{p.name}, {p.total_memory / 2 ** 30:.0f} GiB', "
             "count=torch.cuda.device_count(), "
             "torch=torch.__version__, cuda=torch.version.cuda, check=float((x @ x)[0, 0]))))")


def out_files() -> list[str]:
    """What a run writes to --output-dir (the device tool brings back at most 8 files)."""
    return ["results.md", "results.json", "setup.log", *dict.fromkeys(group + ".log" for group in LOG_GROUPS.values())]


def machine_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The GPU (from a child process: the parent itself never creates a CUDA context, which would hold GPU memory
    during every row), or for a rehearsal this CPU."""
    if args.rehearse:
        import torch

        from mae_transfer.hardware import cpu_model

        return dict(gpu=f"none: CPU rehearsal on {cpu_model()}, {os.cpu_count()} cores", torch=torch.__version__,
                    cuda=torch.version.cuda)
    probe = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, timeout=120,
                           cwd=REPO_ROOT)
    info = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else {}
    if info.get("check") != 1024.0:
        raise MaeTransferError(f"CUDA is visible but a first matrix product on it failed: "
                               f"{probe.stderr.strip()[-300:]}")
    return dict(gpu=f"{info['gpu']} (x{info['count']})" if info["count"] > 1 else info["gpu"], torch=info["torch"],
                cuda=info["cuda"])


def row_cap(rows: list[Row], index: int, left: float) -> float:
    """Seconds for rows[index] when `left` seconds of the budget remain: its own cap plus whatever the rows before it
    left unused (the later rows' caps stay reserved), never more than what is left."""
    later = sum(row.budget_s for row in rows[index + 1:])
    return min(left, max(rows[index].budget_s, left - later))


def run_all(args: argparse.Namespace) -> int:
    if not args.rehearse:
        require_cuda()
    selected = [row for row in ROWS if row.name in args.only]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name in out_files():  # this run's files only, nothing else of the folder
        (args.output_dir / name).unlink(missing_ok=True)
    kit_s = None
    if args.kit is not None:
        print(f"[gpu_acceptance] installing the kit {args.kit} into {args.site} (log: setup.log) ...", flush=True)
        kit_s = round(install_kit(args.kit, args.site, args.output_dir / "setup.log"), 1)
    meta = dict(machine_meta(args), commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M"), budget_s=args.budget,
                python=sys.version.split()[0], kit=str(args.kit) if args.kit else None, kit_setup_s=kit_s,
                rehearsal=args.rehearse)
    print(f"[gpu_acceptance] {meta['gpu']}, torch {meta['torch']}: {len(selected)} rows, budget {args.budget} s; "
          f"logs in {args.output_dir}", flush=True)
    start = time.time()
    deadline = start + args.budget
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as scratch:
        for index, row in enumerate(selected):
            left = deadline - time.time()
            cap = min(REHEARSAL_ROW_S, left) if args.rehearse else row_cap(selected, index, left)
            began = time.time()
            if left < 20:
                status, data = f"not run: the {args.budget} s budget was used up", {}
            else:
                print(f"[gpu_acceptance] {row.name} (up to {cap:.0f} s) ...", flush=True)
                status, data = run_one(row, args, cap, Path(scratch))
            shown = bool(data) and (status == "ok" or row.name == "pytest_cuda")  # pytest counts show failures too
            result, memory = row_cells(row.name, data) if shown else ("-", "-")
            rows.append(dict(name=row.name, what=row.what, result=result, reference=row.reference, memory=memory,
                             reference_memory=row.reference_memory, status=status,
                             seconds=round(time.time() - began, 1), data=data))
            print(f"[gpu_acceptance] {row.name}: {status}  {result}  {memory}", flush=True)
    meta["seconds"] = time.time() - start
    table = write_report(meta, rows, args.output_dir)
    print(f"\n{table}\n\nwritten: {args.output_dir / 'results.md'}, {args.output_dir / 'results.json'}")
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"[gpu_acceptance] FAILED rows: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_child(args: argparse.Namespace) -> int:
    data = CHILD_ROWS[args.row](args, args.row_deadline)
    from mae_transfer.io import atomic_write_text

    atomic_write_text(json.dumps(data), args.row_result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/gpu_acceptance.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="folder for results.md, results.json, setup.log and one log per group of rows "
                             "(default: benchmarks/gpu; with --rehearse work_dirs/gpu_rehearsal)")
    parser.add_argument("--only", default=",".join(ROW_NAMES),
                        help=f"comma-separated rows to run, in this order: {', '.join(ROW_NAMES)}")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"seconds for all rows together (default {DEFAULT_BUDGET_S}, the sum of the rows' caps; "
                             "with --rehearse no limit but each row's); rows left when it is used up are reported "
                             "as not run")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per row (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before them (default 3)")
    parser.add_argument("--det-batch", type=int, default=1,
                        help="images per detection iteration (default 1, the per-GPU load of ViTDet's runs)")
    parser.add_argument("--kit", type=Path, default=os.environ.get("MAE_TRANSFER_KIT") or None,
                        help="first install this folder of wheels (scripts/gpu_kit.sh) offline into --site and run "
                             "every row with it on PYTHONPATH (default: $MAE_TRANSFER_KIT)")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "mae_transfer_site",
                        help="where --kit installs (default: %(default)s)")
    parser.add_argument("--rehearse", action="store_true",
                        help="no GPU: every row's set-up (its real config's model) and one step of its tiny CPU "
                             "config on the CPU, timing nothing; the rehearsal of the GPU run")
    parser.add_argument("--row", choices=list(CHILD_ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--row-result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row-deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.row:
        return run_child(args)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(ROW_NAMES))
    if unknown:
        raise MaeTransferError(f"--only: unknown row(s) {unknown}; expected some of {', '.join(ROW_NAMES)}")
    if args.budget is None:
        args.budget = len(only) * REHEARSAL_ROW_S if args.rehearse else DEFAULT_BUDGET_S
    if min(args.iters, args.budget, args.det_batch) < 1 or args.warmup < 0:
        raise MaeTransferError("--iters, --budget and --det-batch must be positive, --warmup not negative")
    if args.kit is not None and not args.kit.is_dir():
        raise MaeTransferError(f"--kit {args.kit}: no such folder; make the kit with scripts/gpu_kit.sh")
    if args.kit is not None:
        kit_wheels(args.kit)  # an empty kit: one line, before anything runs
    args.only = only
    default_out = REPO_ROOT / "work_dirs" / "gpu_rehearsal" if args.rehearse else REPO_ROOT / "benchmarks" / "gpu"
    args.output_dir = (args.output_dir or default_out).resolve()
    args.kit = args.kit.resolve() if args.kit else None
    return run_all(args)


if __name__ == "__main__":
    from mae_transfer.cli import run_cli

    sys.exit(run_cli(main))
