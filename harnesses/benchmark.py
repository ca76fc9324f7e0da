"""Side-by-side speed and memory of our code against its peers, measured in one run (tools/benchmark.py).

Speed: ours and the peer are built in one fresh process and their training steps interleaved (ours, peer,
peer, ours per round), so both see the same machine from second to second; the ratio is the median over
neighbouring steps. Memory: each side alone in its own fresh process (max RSS on CPU, max allocated on
GPU), so the peak is that model's alone. Pairs:
  pretrain: our MaskedAutoencoder vs HF ViTMAEForPreTraining (same architecture, HF's default SDPA
            attention), fwd+bwd+AdamW (fused, both), mask 0.75
  pretrain_bf16: the same step under bf16 autocast on both sides (the ViT-B pretraining config's amp="bf16";
            HF Trainer's bf16=True)
  pretrain_compiled: the same with our model under torch.compile (the training runtime's compile=True) vs HF's
            default (eager, as its Trainer runs unless torch_compile=True)
  det:      our ViT (windows 14, global blocks, rel-pos) vs detectron2's ViT, same weights, fwd+bwd
  seg:      UperNet train iteration with our registered backbone vs mmseg's MAE backbone
  seg_backbone: the backbone alone, as MMSeg uses it: our MAEViT (backbones/mmseg.py) vs mmseg's `MAE`,
            fwd+bwd of the seg batch at the seg crop, BEiT relative position bias and layer scale on (the
            ADE20K configs' layout); the rest of the seg step (mmseg's neck and heads) is the same on both sides
The machine's dense matmul rate is measured in the same run, and our achieved FLOP rate is given as a
fraction of it (analytic FLOP counts of the matmuls; attention included).

bf16 rows on a CPU without bf16 units (no AVX512-BF16 / AMX-BF16; bf16 is emulated there, tens of times
slower) are not run: the report says so, with the CPU model (MAE_TRANSFER_CPU_BF16=1 runs them anyway).
Sizes: tiny / base / large as named; micro is a 4-block, 64-wide ViT at 64 px for the tool's tests.

Each measurement runs in a worker process, `python -m harnesses.benchmark '<Job as json>'`, which
prints its result as one `RESULT {...}` line. HF, detectron2 and mmseg are imported only by the workers
that build them.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

from harnesses.timing import peak_memory_gib, timed_steps
from mae_transfer.errors import MaeTransferError
from mae_transfer.hardware import cpu_has_native_bf16, cpu_model, no_bf16_reason
from mae_transfer.paths import REPO_ROOT
from mae_transfer.subprocess_runner import run_process

DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks"


@dataclass(frozen=True)
class Size:
    model: str  # timm-style name of the ViT
    pretrain_batch: int
    det_img: int
    seg_crop: int
    seg_batch: int
    pretrain_img: int = 224
    decoder: tuple[int, int, int] = (512, 8, 16)  # MAE decoder width, depth, heads (the paper's)
    arch: dict[str, int] = field(default_factory=dict)  # overrides of the named ViT's width / depth / heads


SIZES = {
    "micro": Size("vit_tiny_patch16_224", 4, 128, 64, 2, pretrain_img=64, decoder=(64, 1, 2),
                  arch=dict(embed_dim=64, depth=4, num_heads=2)),
    "tiny": Size("vit_tiny_patch16_224", 8, 512, 256, 2),
    "base": Size("vit_base_patch16_224", 8, 1024, 512, 2),
    "large": Size("vit_large_patch16_224", 4, 1024, 512, 2),
}
GLOBAL_BLOCKS = {4: (1, 3), 12: (2, 5, 8, 11), 24: (5, 11, 17, 23), 32: (7, 15, 23, 31)}
PEERS = {"pretrain": "HF ViTMAEForPreTraining", "pretrain_bf16": "HF ViTMAEForPreTraining",
         "pretrain_compiled": "HF ViTMAEForPreTraining",
         "det": "detectron2 ViT", "seg": "mmseg MAE backbone", "seg_backbone": "mmseg MAE"}
DEFAULT_TASKS = ("pretrain", "pretrain_bf16", "det", "seg", "seg_backbone")
# ABBA rounds per task by default: a ViT-B MAE step takes seconds on this CPU, a 1024-px detection or
# 512-px UperNet step half a minute to a minute. On a GPU every step takes well under a second.
DEFAULT_ROUNDS = {"cpu": {"pretrain": 6, "pretrain_bf16": 6, "pretrain_compiled": 6, "det": 1, "seg": 1,
                          "seg_backbone": 2},
                  "cuda": {"pretrain": 20, "pretrain_bf16": 20, "pretrain_compiled": 20, "det": 10, "seg": 10,
                           "seg_backbone": 10}}
# Warm-up steps per side: on a GPU the first steps also pay for kernel selection and allocator growth.
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}


@dataclass(frozen=True)
class Job:
    """What one worker process measures (it gets this as json on its command line)."""

    worker: str  # "matmul", "memory" or "speed"
    size: str
    device: str
    warmup: int
    threads: int
    task: str = ""  # for memory / speed
    impl: str = "ours"  # for memory
    rounds: int = 0  # for speed


# ---------------------------------------------------------------------------------------------- workers
@dataclass
class Bench:
    """One training step of one implementation, ready to call repeatedly."""

    step: Callable[[], None]
    images: int  # images per step
    flops: float | None = None  # analytic FLOPs per step, where we have a count
    model: Any = None  # what it steps (for checks of the pair)


def _vit_dims(size: str) -> dict[str, int]:
    from backbones.vit import vit_config

    return {**vit_config(SIZES[size].model), **SIZES[size].arch}


def is_bf16(task: str) -> bool:
    """Tasks whose steps run under bf16 autocast."""
    return task.endswith("_bf16")


def mae_flops_per_image(dim: int, depth: int, dec_dim: int = 512, dec_depth: int = 8, patches: int = 196,
                        patch_pixels: int = 768, mask_ratio: float = 0.75) -> float:
    """Forward+backward FLOPs (3x forward) of one MAE image: patch embedding on all patches, encoder on
    the visible ones + cls, decoder on all + cls."""
    def blocks(n: int, d: int, depth_: int) -> float:
        return depth_ * (2 * n * 12 * d * d + 4 * n * n * d)

    visible = int(patches * (1 - mask_ratio)) + 1
    forward = (2 * patches * patch_pixels * dim + blocks(visible, dim, depth) + 2 * visible * dim * dec_dim
               + blocks(patches + 1, dec_dim, dec_depth) + 2 * (patches + 1) * dec_dim * patch_pixels)
    return 3 * forward


def vitdet_flops(dim: int, depth: int, grid: int, window: int, n_global: int) -> float:
    tokens = grid * grid
    linear = depth * 2 * tokens * 12 * dim * dim
    attn_global = n_global * 4 * tokens * tokens * dim
    padded = -(-grid // window) * window
    attn_window = (depth - n_global) * 4 * padded * padded * window * window * dim
    return 3 * (linear + attn_global + attn_window + 2 * tokens * 768 * dim)


def worker_matmul(job: Job) -> dict[str, Any]:
    import torch

    n = 2048
    a, b = torch.randn(n, n, device=job.device), torch.randn(n, n, device=job.device)
    # Best of 8 rounds: shared / boosting cloud cores give single readings from ~100 to ~180 GFLOP/s here.
    sec = min(sum(timed_steps(lambda: torch.mm(a, b), job.device, 2 if i == 0 else 0, 5)) / 5 for i in range(8))
    return dict(gflops=2 * n ** 3 / sec / 1e9)


def build_pretrain(impl: str, job: Job, compile_ours: bool = False, bf16: bool = False) -> Bench:
    import torch

    torch.manual_seed(0)
    dims, size = _vit_dims(job.size), SIZES[job.size]
    batch, img, (dec_dim, dec_depth, dec_heads) = size.pretrain_batch, size.pretrain_img, size.decoder
    patches = (img // dims["patch_size"]) ** 2
    imgs = torch.randn(batch, 3, img, img, device=job.device)
    noise = torch.rand(batch, patches, device=job.device)
    if impl == "ours":
        from mae_transfer.mae import MaskedAutoencoder

        model = MaskedAutoencoder(size.model, img_size=img, decoder_embed_dim=dec_dim, decoder_depth=dec_depth,
                                  decoder_num_heads=dec_heads, encoder_overrides=size.arch).to(job.device)
        forward = torch.compile(model) if compile_ours else model  # as the training runtime's compile=True
        run = lambda: forward(imgs, noise=noise)[0]  # noqa: E731
    else:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        config = ViTMAEConfig(hidden_size=dims["embed_dim"], num_hidden_layers=dims["depth"],
                              num_attention_heads=dims["num_heads"], intermediate_size=4 * dims["embed_dim"],
                              image_size=img, patch_size=dims["patch_size"], decoder_hidden_size=dec_dim,
                              decoder_num_hidden_layers=dec_depth, decoder_num_attention_heads=dec_heads,
                              decoder_intermediate_size=4 * dec_dim, norm_pix_loss=True, layer_norm_eps=1e-6)
        model = ViTMAEForPreTraining(config).to(job.device)
        run = lambda: model(pixel_values=imgs, noise=noise).loss  # noqa: E731
    model.train()
    # Both sides: our pretraining's optimizer (torch's fused AdamW, no decay on 1-D tensors), which is also HF
    # Trainer's default (optim="adamw_torch_fused" on torch >= 2.8, bias/LayerNorm without decay).
    from mae_transfer.pretraining import build_optimizer

    opt = build_optimizer(model, {"weight_decay": 0.05, "betas": (0.9, 0.95)}, 1e-4)

    def step() -> None:
        # bf16: autocast around the forward and loss only, as our runtime's amp="bf16" and HF Trainer's bf16=True
        with torch.autocast(job.device, dtype=torch.bfloat16, enabled=bf16):
            loss = run()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = mae_flops_per_image(dims["embed_dim"], dims["depth"], dec_dim, dec_depth, patches,
                                3 * dims["patch_size"] ** 2)
    return Bench(step, batch, flops * batch)


def build_det(impl: str, job: Job) -> Bench:
    import torch

    torch.manual_seed(0)
    dims = _vit_dims(job.size)
    img = SIZES[job.size].det_img
    glob = GLOBAL_BLOCKS[dims["depth"]]
    x = torch.randn(1, 3, img, img, device=job.device)
    kwargs = dict(img_size=224, patch_size=16, embed_dim=dims["embed_dim"], depth=dims["depth"],
                  num_heads=dims["num_heads"], drop_path_rate=0.0, window_size=14, use_rel_pos=True)
    if impl == "ours":
        from backbones.vit import VisionTransformer

        model = VisionTransformer(global_block_indexes=glob, rel_pos_input_size=img, final_norm=False, **kwargs)
        run = lambda: model.forward_spatial(x)[0]  # noqa: E731
    else:  # detectron2 needs no workaround on this stack (mae_transfer.compat, 3.)
        from detectron2.modeling.backbone.vit import ViT

        model = ViT(window_block_indexes=[i for i in range(dims["depth"]) if i not in glob],
                    residual_block_indexes=[], use_abs_pos=True, pretrain_img_size=224,
                    pretrain_use_cls_token=True, out_feature="last_feat", **kwargs)
        run = lambda: model(x)["last_feat"]  # noqa: E731
    model.to(job.device).train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        run().float().square().mean().backward()

    return Bench(step, 1, vitdet_flops(dims["embed_dim"], dims["depth"], img // 16, 14, len(glob)))


def seg_out_indices(depth: int) -> tuple[int, ...]:
    """The blocks UperNet reads: after 1/3, 1/2, 2/3 of the depth and the last (B: 3, 5, 7, 11)."""
    return tuple(int(round(depth * f)) - 1 for f in (1 / 3, 1 / 2, 2 / 3)) + (depth - 1,)


def build_seg(impl: str, job: Job) -> Bench:
    import torch

    import backbones.mmseg  # noqa: F401  registers our backbone (and applies the compat shims)
    # isort: split
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    torch.manual_seed(0)
    dims = _vit_dims(job.size)
    crop, batch = SIZES[job.size].seg_crop, SIZES[job.size].seg_batch
    cfg = Config.fromfile(str(REPO_ROOT / "configs" / "ade20k_upernet_vit_b.py"))
    model_cfg = cfg.model
    for part in (model_cfg.neck, model_cfg.decode_head, model_cfg.auxiliary_head):
        part.norm_cfg = dict(type="BN", requires_grad=True)  # one process: no SyncBN
    model_cfg.data_preprocessor.size = (crop, crop)
    depth, dim = dims["depth"], dims["embed_dim"]
    out_indices = seg_out_indices(depth)
    if impl == "ours":
        model_cfg.backbone.update(embed_dim=dim, depth=depth, num_heads=dims["num_heads"], out_indices=out_indices)
    else:  # mmseg's own MAE backbone (BEiT-style, layer scale 1.0), same sizes
        model_cfg.backbone = dict(type="MAE", img_size=(crop, crop), patch_size=16, embed_dims=dim,
                                  num_layers=depth, num_heads=dims["num_heads"], mlp_ratio=4,
                                  init_values=1.0, drop_path_rate=0.1, out_indices=list(out_indices))
    model_cfg.neck.embed_dim = dim
    model_cfg.decode_head.in_channels = [dim] * 4
    model_cfg.auxiliary_head.in_channels = dim
    model = MODELS.build(model_cfg).to(job.device)
    optim_wrapper = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(
        type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)))
    samples = []
    for _ in range(batch):
        sample = SegDataSample(metainfo=dict(img_shape=(crop, crop), ori_shape=(crop, crop), pad_shape=(crop, crop)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, crop, crop)))
        samples.append(sample)
    data = dict(inputs=[torch.randint(0, 255, (3, crop, crop), dtype=torch.uint8) for _ in range(batch)],
                data_samples=samples)
    model.train()
    return Bench(lambda: model.train_step(data, optim_wrapper), batch)


def build_seg_backbone(impl: str, job: Job) -> Bench:
    """The backbone of the seg row alone: fwd+bwd of the seg batch, the ADE20K configs' layout on both sides
    (512-px position table, BEiT relative position bias, layer scale 1.0, drop path 0.1, cls token kept)."""
    import torch

    from backbones.mmseg import MAEViT  # first: applies the compat shims `import mmseg` needs (mmcv-lite)
    # isort: split
    from mmseg.models.backbones import MAE  # both sides import both: the same framework in each RSS

    torch.manual_seed(0)
    dims = _vit_dims(job.size)
    crop, batch = SIZES[job.size].seg_crop, SIZES[job.size].seg_batch
    depth, dim, heads = dims["depth"], dims["embed_dim"], dims["num_heads"]
    out_indices = seg_out_indices(depth)
    x = torch.randn(batch, 3, crop, crop, device=job.device)
    if impl == "ours":
        model = MAEViT(img_size=crop, embed_dim=dim, depth=depth, num_heads=heads, drop_path_rate=0.1,
                       out_indices=out_indices, use_rel_pos_bias=True, init_values=1.0)
    else:
        model = MAE(img_size=(crop, crop), patch_size=16, embed_dims=dim, num_layers=depth, num_heads=heads,
                    mlp_ratio=4, init_values=1.0, drop_path_rate=0.1, out_indices=list(out_indices))
    model.to(job.device).train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        sum(out.float().square().mean() for out in model(x)).backward()

    return Bench(step, batch, model=model)


BUILDERS: dict[str, Callable[[str, Job], Bench]] = {
    "pretrain": build_pretrain, "pretrain_bf16": partial(build_pretrain, bf16=True),
    "pretrain_compiled": partial(build_pretrain, compile_ours=True),
    "det": build_det, "seg": build_seg, "seg_backbone": build_seg_backbone}


def worker_memory(job: Job) -> dict[str, Any]:
    """Peak memory of one implementation alone in this process, over two steps: the second one runs with
    the optimizer state (AdamW moments) that the first created, next to its activations and gradients."""
    bench = BUILDERS[job.task](job.impl, job)
    for _ in range(2):
        bench.step()
    return {}


def worker_speed(job: Job) -> dict[str, Any]:
    """Both implementations in one process, steps interleaved ours, peer, peer, ours (ABBA) for
    `job.rounds` rounds; the speed ratio is the median of the ratios of neighbouring steps. The cores of
    this cloud machine drift by 10-20 % between minutes (and processes); neighbouring steps see nearly
    the same machine, so their ratio is far steadier than that of separate runs."""
    benches = {impl: BUILDERS[job.task](impl, job) for impl in ("ours", "peer")}
    times: dict[str, list[float]] = {"ours": [], "peer": []}

    def timed(impl: str) -> float:
        times[impl] += timed_steps(benches[impl].step, job.device, 0, 1)
        return times[impl][-1]

    for bench in benches.values():
        for _ in range(job.warmup):
            bench.step()
    ratios = []
    for _ in range(job.rounds):
        ours_first, peer_first = timed("ours"), timed("peer")
        peer_second, ours_second = timed("peer"), timed("ours")
        ratios += [peer_first / ours_first, peer_second / ours_second]
    result: dict[str, Any] = dict(speed_ratio=median(ratios), pair_ratios=ratios)
    for impl, bench in benches.items():
        sec = median(times[impl])
        result[impl] = dict(sec_per_step=sec, img_per_s=bench.images / sec)
        if bench.flops is not None:
            result[impl]["gflops"] = bench.flops / sec / 1e9
    return result


WORKERS = {"matmul": worker_matmul, "memory": worker_memory, "speed": worker_speed}


def run_worker(job: Job) -> None:
    """The body of a worker process: measure `job`, print `RESULT {json}` with this process's peak memory."""
    import torch

    torch.set_num_threads(job.threads)
    if job.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = WORKERS[job.worker](job)
    result["peak_mem_mb"] = peak_memory_gib(job.device) * 1024  # CPU: max RSS; GPU: max allocated
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------- driver
def measure(job: Job) -> dict[str, Any]:
    """Run `job` in a fresh worker process and return its result."""
    cmd = [sys.executable, "-m", "harnesses.benchmark", json.dumps(asdict(job))]
    print(f"[benchmark] {job.worker} {job.task} {job.impl if job.worker == 'memory' else ''}...", flush=True)
    with tempfile.TemporaryDirectory(prefix="benchmark_worker_") as scratch:
        done = run_process(cmd, log=Path(scratch) / "worker.log", cwd=REPO_ROOT)
        output = done.output()
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    if done.code != 0 or not lines:
        # Not a user error: exit 1 with the worker's own traceback, not one of this process on top of it.
        raise SystemExit(f"error: benchmark worker {job.worker} {job.task} {job.impl} failed:\n{output[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure_task(task: str, base: Job, rounds: int) -> dict[str, Any]:
    """Peak memory of each side in its own process; speed of both interleaved in one process."""
    memory = {impl: measure(replace(base, worker="memory", task=task, impl=impl))["peak_mem_mb"]
              for impl in ("ours", "peer")}
    speed = measure(replace(base, worker="speed", task=task, rounds=rounds or DEFAULT_ROUNDS[base.device][task]))
    ours, peer = (dict(speed[impl], peak_mem_mb=memory[impl]) for impl in ("ours", "peer"))
    return dict(ours=ours, peer=peer, speed_ratio=speed["speed_ratio"], pair_ratios=speed["pair_ratios"],
                memory_ratio=memory["ours"] / memory["peer"], measured=time.strftime("%Y-%m-%d %H:%M"))


def skip_reason(task: str, device: str) -> str | None:
    """Why a task is not run here, or None: bf16 rows on a CPU whose bf16 would be emulated."""
    if is_bf16(task) and device == "cpu" and not cpu_has_native_bf16():
        return f"skipped on {no_bf16_reason()}"
    return None


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    from mae_transfer.io import atomic_write_text

    peak = results["matmul_gflops"]
    rows = ["| task | ours img/s | peer | peer img/s | speed ratio (range) | ours peak MB | peer peak MB "
            "| memory ratio | ours GFLOP/s (% of matmul peak) | measured |", "|---" * 10 + "|"]
    for task, r in results["tasks"].items():
        if "skipped" in r:
            rows.append(f"| {task} | - | {PEERS[task]} | - | {r['skipped']} | - | - | - | - | {r['measured']} |")
            continue
        ours, peer = r["ours"], r["peer"]
        flops = "-"
        if "gflops" in ours:  # the peak is an fp32 matmul: bf16 rows run on other units (AMX where present)
            row_peak = r.get("matmul_gflops")  # that of the run that measured the row (--only keeps older rows)
            flops = f"{ours['gflops']:.1f}" + (" (bf16)" if is_bf16(task) else
                                               f" ({100 * ours['gflops'] / row_peak:.0f}%)" if row_peak else "")
        pairs = r["pair_ratios"]
        rows.append(f"| {task} | {ours['img_per_s']:.3f} | {PEERS[task]} | {peer['img_per_s']:.3f} | "
                    f"**{r['speed_ratio']:.2f}x** ({min(pairs):.2f}-{max(pairs):.2f}, {len(pairs)} pairs) | "
                    f"{ours['peak_mem_mb']:.0f} | {peer['peak_mem_mb']:.0f} | "
                    f"{r['memory_ratio']:.2f}x | {flops} | {r['measured']} |")
    meta = results["meta"]
    text = "\n".join([
        f"# Benchmark results ({meta['size']}, {meta['device']})", "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads; {meta['warmup']} warm-up "
        "step(s) per side.",
        f"Dense fp32 matmul (2048^3) on this machine: **{peak:.1f} GFLOP/s** (best of 8 rounds, measured before and "
        f"after the models: {' / '.join(f'{g:.1f}' for g in results.get('matmul_gflops_start_end', [peak]))}).", "",
        *rows, "",
        "Speed: both implementations in one process, steps interleaved ours, peer, peer, ours; speed ratio = median "
        "over neighbouring steps of peer time / our time (higher is better), range = lowest-highest of those "
        "ratios; img/s = median per side; GFLOP/s as a % of the matmul rate of the run that measured the row. "
        "Memory: each side alone in a fresh process for two steps (CPU: max RSS, includes the framework; GPU: max "
        "allocated); memory ratio = ours / peer (lower is better).", "",
    ])
    atomic_write_text(json.dumps(results, indent=2), out_dir / "results.json")
    return atomic_write_text(text, out_dir / "results.md")


def run_benchmark(size: str = "tiny", device: str = "cpu", tasks: Sequence[str] = DEFAULT_TASKS, rounds: int = 0,
                  warmup: int | None = None, threads: int | None = None,
                  output_dir: Path | str = DEFAULT_OUTPUT_DIR) -> Path:
    """Measure `tasks` and write results.{md,json} to `output_dir`; returns the path of results.md.

    rounds: ABBA rounds per task (0: DEFAULT_ROUNDS); warmup: steps per side (None: DEFAULT_WARMUP);
    threads: torch threads of each worker (None: all cores). Rows of other tasks already in
    `output_dir`/results.json, for the same size and device, are kept.
    """
    import torch

    output_dir = Path(output_dir)
    warmup = DEFAULT_WARMUP[device] if warmup is None else warmup
    threads = threads or os.cpu_count() or 1
    tasks = [t.strip() for t in tasks if t.strip()]
    unknown = set(tasks) - set(PEERS)
    if unknown:
        raise MaeTransferError(f"--only: unknown task(s) {sorted(unknown)}; expected some of {', '.join(PEERS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise MaeTransferError(f"--device cuda: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() "
                               "is False); run on a GPU machine or use --device cpu")
    skipped = {task: skip_reason(task, device) for task in tasks}  # before any measuring: fails fast
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), host {machine}"
    results: dict[str, Any] = {"meta": dict(size=size, device=device, warmup=warmup,
                                            threads=threads, torch=torch.__version__, machine=machine),
                               "tasks": {}}
    base = Job(worker="matmul", size=size, device=device, warmup=warmup, threads=threads)
    results["matmul_gflops"] = measure(base)["gflops"]
    previous = output_dir / "results.json"
    if previous.is_file():  # keep the rows of tasks not measured now (--only)
        old = json.loads(previous.read_text())
        if old.get("meta", {}).get("size") == size and old.get("meta", {}).get("device") == device:
            results["tasks"] = {t: r for t, r in old.get("tasks", {}).items() if t not in tasks and "pair_ratios" in r}
    for task in tasks:
        reason = skipped[task]
        if reason:
            results["tasks"][task] = dict(skipped=reason, measured=time.strftime("%Y-%m-%d %H:%M"))
            print(f"[benchmark] {task}: {reason}", flush=True)
            continue
        results["tasks"][task] = r = measure_task(task, base, rounds)
        print(f"[benchmark] {task}: {r['speed_ratio']:.2f}x speed ({min(r['pair_ratios']):.2f}-"
              f"{max(r['pair_ratios']):.2f}), {r['memory_ratio']:.2f}x memory", flush=True)
    # Measured again at the end: the peak the fractions use is the higher of the two readings.
    results["matmul_gflops_start_end"] = [results["matmul_gflops"], measure(base)["gflops"]]
    results["matmul_gflops"] = max(results["matmul_gflops_start_end"])
    for task in tasks:  # the rate each row's fraction is of: rows kept from earlier runs keep their own
        if "pair_ratios" in results["tasks"][task]:
            results["tasks"][task]["matmul_gflops"] = results["matmul_gflops"]
    results["tasks"] = {t: results["tasks"][t] for t in PEERS if t in results["tasks"]}
    return write_report(results, output_dir)


if __name__ == "__main__":  # a worker process started by measure()
    run_worker(Job(**json.loads(sys.argv[1])))
