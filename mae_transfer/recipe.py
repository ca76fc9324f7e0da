"""The effective training recipe of a run on the GPUs it has: arithmetic and the printed table, no framework.

A published recipe is a total batch on a reference number of GPUs (ViTDet: 64 GPUs x 1 image; mmseg's MAE
UperNet: 8 GPUs x 2 images). On another world size the *same* recipe is kept by default: each GPU takes the
reference's images per GPU (or `--images-per-gpu K`) and gradient accumulation fills the rest of the total
batch, so lr, iterations, schedule and periods keep their meaning (one iteration = one optimizer step).
`--total-batch B` asks for another total batch, scaled by the linear rule as detectron2's
`DefaultTrainer.auto_scale_workers` does: lr x B/B_ref; iterations, warmup, milestones, eval and checkpoint
periods x B_ref/B (the same number of epochs).

`mae_transfer.detection.recipe` / `segmentation_recipe` read a config into these numbers and write them back;
the tools print `format_table` before training (or alone with `--plan`, with `Recipe.to_json` on stdout) and
write `OUTPUT_DIR/recipe.json`. MAE core: imports no framework.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text

RECIPE_FILE = "recipe.json"
AMP_MODES = ("fp16", "bf16", "none")
# Training-set sizes the plan turns into epochs without reading the data (the ViTDet configs count COCO
# train2017 as 118,000 images: "100 ep = 184375 iters * 64 images/iter / 118000 images/ep").
DATASET_IMAGES = {"COCO train2017": 118000, "ADE20K training": 20210}


@dataclass(frozen=True)
class Reference:
    """The published run a config encodes: its total batch on `world_size` GPUs. world_size None: no published
    run, the config's own batch on one process is the recipe (the tiny CPU configs)."""

    total_batch: int
    world_size: int | None

    @property
    def images_per_gpu(self) -> int:
        return self.total_batch // (self.world_size or 1)


@dataclass
class Recipe:
    """What a run trains with. Iterations are optimizer steps (the unit of the reference recipe); `reference`
    holds the reference's values of the scaled quantities, for the table."""

    tool: str
    config: str
    device: str  # the device the plan is for: "cuda" or "cpu"
    world_size: int
    images_per_gpu: int
    accumulation: int
    total_batch: int
    lr: float
    max_iter: int
    warmup_iters: int
    amp: str  # "fp16" | "bf16" | "none"
    activation_checkpointing: bool
    reference_total_batch: int
    reference_world_size: int | None
    reference_images_per_gpu: int
    batch_scale: float  # total_batch / reference_total_batch: lr x this, iterations / this
    milestones: list[int] | None = None  # step decays (detectron2), in optimizer steps
    poly_end: int | None = None  # the end of the poly decay (mmseg), in optimizer steps
    eval_period: int | None = None
    checkpoint_period: int | None = None
    epochs: float | None = None
    dataset: str | None = None
    norm_layers: str = ""
    amp_detail: str = ""
    iteration_unit: str = "optimizer step (one iteration = accumulation x images_per_gpu x world_size images)"
    reference: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of `--plan` and recipe.json: the fixed keys first, then everything the tool knows."""
        data = asdict(self)
        first = ["world_size", "images_per_gpu", "accumulation", "total_batch", "lr", "max_iter", "warmup_iters",
                 "amp", "activation_checkpointing"]
        return {**{k: data.pop(k) for k in first}, **data}


# ---------------------------------------------------------------------------------------------- arithmetic
def positive(name: str, value: Any) -> int:
    """`value` as a positive int, else one MaeTransferError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MaeTransferError(f"{name} must be a positive integer, got {value!r}")
    return value


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_batch(total_batch: int, world_size: int, reference_images_per_gpu: int,
                images_per_gpu: int | None = None) -> tuple[int, int]:
    """(images per GPU, accumulation) that make `total_batch` on `world_size` processes. Default: the
    reference's images per GPU (fewer when a GPU's share is smaller); `images_per_gpu` asks for another.
    A split that does not divide the total batch is one error naming the valid choices."""
    if total_batch % world_size:
        valid = ", ".join(map(str, divisors(total_batch)))
        raise MaeTransferError(f"a total batch of {total_batch} does not split over {world_size} GPUs: the number of "
                               f"GPUs (--num-gpus x --num-machines) must divide it: {valid} (or choose another "
                               "--total-batch)")
    per_gpu = total_batch // world_size
    if images_per_gpu is None:
        images_per_gpu = max(d for d in divisors(per_gpu) if d <= max(1, reference_images_per_gpu))
    elif per_gpu % images_per_gpu:
        valid = ", ".join(map(str, divisors(per_gpu)))
        raise MaeTransferError(f"--images-per-gpu {images_per_gpu} on {world_size} GPUs does not divide the total "
                               f"batch {total_batch} ({per_gpu} images per GPU per optimizer step): valid choices "
                               f"are {valid}")
    return images_per_gpu, per_gpu // images_per_gpu


def scale_iters(n: int, batch_scale: float) -> int:
    """An iteration count under the linear rule (detectron2's rounding); 0 (disabled) stays 0, others stay >= 1."""
    return 0 if n <= 0 else max(1, int(round(n / batch_scale)))


def epochs(max_iter: int, total_batch: int, dataset: str | None) -> float | None:
    size = DATASET_IMAGES.get(dataset or "")
    return round(max_iter * total_batch / size, 1) if size else None


def resolve_plan_device(config_device: str | None, num_gpus_given: bool, cuda_available: bool) -> str:
    """The device a plan describes: a config pinned to the CPU stays there; otherwise the GPUs when the machine
    has them or `--num-gpus` was given (a plan for a GPU run, made anywhere), else this machine's CPU."""
    if config_device is not None and str(config_device).startswith("cpu"):
        return "cpu"
    return "cuda" if cuda_available or num_gpus_given else "cpu"


def plan(*, tool: str, config: str, device: str, reference: Reference, world_size: int, lr: float, max_iter: int,
         warmup_iters: int, amp: str, activation_checkpointing: bool, images_per_gpu: int | None = None,
         total_batch: int | None = None, milestones: list[int] | None = None, poly_end: int | None = None,
         eval_period: int | None = None, checkpoint_period: int | None = None,
         dataset: str | None = None) -> Recipe:
    """The recipe on `world_size` processes from the reference's values (the config's): the same total batch
    unless `total_batch` is given, then scaled by the linear rule."""
    positive("the world size", world_size)
    if images_per_gpu is not None:
        positive("--images-per-gpu", images_per_gpu)
    if total_batch is not None:
        positive("--total-batch", total_batch)
    if amp not in AMP_MODES:
        raise MaeTransferError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    total = total_batch or reference.total_batch
    ipg, accumulation = split_batch(total, world_size, reference.images_per_gpu, images_per_gpu)
    scale = total / reference.total_batch

    def steps(n: int | None) -> int | None:
        return None if n is None else scale_iters(n, scale)

    recipe = Recipe(
        tool=tool, config=config, device=device, world_size=world_size, images_per_gpu=ipg,
        accumulation=accumulation, total_batch=total, lr=lr * scale, max_iter=steps(max_iter),
        warmup_iters=steps(warmup_iters), amp=amp, activation_checkpointing=bool(activation_checkpointing),
        reference_total_batch=reference.total_batch, reference_world_size=reference.world_size,
        reference_images_per_gpu=reference.images_per_gpu, batch_scale=scale,
        milestones=None if milestones is None else [steps(m) for m in milestones], poly_end=steps(poly_end),
        eval_period=steps(eval_period), checkpoint_period=steps(checkpoint_period),
        epochs=epochs(steps(max_iter), total, dataset), dataset=dataset if dataset in DATASET_IMAGES else None,
        reference=dict(lr=lr, max_iter=max_iter, warmup_iters=warmup_iters, milestones=milestones, poly_end=poly_end,
                       eval_period=eval_period, checkpoint_period=checkpoint_period,
                       epochs=epochs(max_iter, reference.total_batch, dataset)))
    if scale != 1:
        recipe.notes.append(f"--total-batch {total} instead of {reference.total_batch}: linear rule, lr x {scale:g}, "
                            f"iterations, warmup, milestones and periods x {1 / scale:g} (the same epochs)")
    if accumulation > 1:
        recipe.notes.append(f"{accumulation} micro-batches of {ipg} image(s) per GPU per optimizer step, gradients "
                            "accumulated (each micro-batch's loss / accumulation); one iteration = one optimizer step")
    return recipe


# ---------------------------------------------------------------------------------------------- output
def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_num(v) for v in value) or "-"
    return str(value)


def format_table(recipe: Recipe) -> str:
    """The recipe as a readable two-column table (this run | the reference), notes below."""
    ref = recipe.reference
    ref_world = recipe.reference_world_size
    ref_name = (f"reference ({ref_world} GPU{'s' if ref_world != 1 else ''})" if ref_world
                else "reference (the config's own batch, 1 process)")
    milestones = ("milestones", recipe.milestones, ref.get("milestones")) if recipe.milestones is not None else None
    poly = ("poly decay ends at", recipe.poly_end, ref.get("poly_end")) if recipe.poly_end is not None else None
    rows = [
        ("world size (processes)", recipe.world_size, ref_world or 1),
        ("images per GPU", recipe.images_per_gpu, recipe.reference_images_per_gpu),
        ("gradient accumulation", recipe.accumulation, 1),
        ("total batch", recipe.total_batch, recipe.reference_total_batch),
        ("lr", recipe.lr, ref.get("lr")),
        ("max_iter (optimizer steps)", recipe.max_iter, ref.get("max_iter")),
        ("warmup iterations", recipe.warmup_iters, ref.get("warmup_iters")),
        *[r for r in (milestones, poly) if r],
        ("eval period", recipe.eval_period, ref.get("eval_period")),
        ("checkpoint period", recipe.checkpoint_period, ref.get("checkpoint_period")),
        ("epochs" + (f" ({recipe.dataset})" if recipe.dataset else ""), recipe.epochs, ref.get("epochs")),
        ("AMP", recipe.amp, ref.get("amp")),
        ("activation checkpointing", "on" if recipe.activation_checkpointing else "off", "-"),
        ("norm layers", recipe.norm_layers, ref.get("norm_layers")),
    ]
    cells = [(name, _num(a), "same" if a == b and len(_num(a)) > 24 else _num(b)) for name, a, b in rows]
    w0 = max(len(c[0]) for c in cells)
    w1 = max(len("this run"), *(len(c[1]) for c in cells))
    head = f"recipe of {recipe.tool} --config {recipe.config} on {recipe.world_size} x {recipe.device}"
    lines = [head, f"  {'':<{w0}}  {'this run':<{w1}}  {ref_name}"]
    lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in cells]
    notes = ([f"AMP: {recipe.amp_detail}"] if recipe.amp_detail else []) + list(recipe.notes)
    lines += [f"  - {n}" for n in notes]
    return "\n".join(lines)


def write_recipe(recipe: Recipe, output_dir: str | os.PathLike) -> Path:
    """OUTPUT_DIR/recipe.json (atomic)."""
    return atomic_write_text(json.dumps(recipe.to_json(), indent=2) + "\n", Path(output_dir) / RECIPE_FILE)


def announce_recipe(recipe: Recipe, output_dir: str | os.PathLike) -> Path:
    """A real run, before it trains: the table on stderr, OUTPUT_DIR/recipe.json written."""
    print(format_table(recipe), file=sys.stderr, flush=True)
    return write_recipe(recipe, output_dir)


def print_plan(recipe: Recipe) -> None:
    """--plan: the table on stderr, one JSON object on stdout."""
    print(format_table(recipe), file=sys.stderr, flush=True)
    print(json.dumps(recipe.to_json()), flush=True)


# ---------------------------------------------------------------------------------------------- CLI
def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe flags train_det.py and train_seg.py share (each adds its own --num-gpus / --num-machines)."""
    g = parser.add_argument_group("recipe on the GPUs you have (printed before training, saved as recipe.json)")
    g.add_argument("--plan", action="store_true",
                   help="print the effective recipe (table on stderr, one JSON object on stdout) and exit; "
                        "reads no data and no weights")
    g.add_argument("--images-per-gpu", type=int, default=None, metavar="K",
                   help="images per GPU per forward pass (default: the reference recipe's); gradient accumulation "
                        "fills the rest of the total batch")
    g.add_argument("--total-batch", type=int, default=None, metavar="B",
                   help="another total batch: lr x B/B_ref; iterations, warmup, milestones, eval and checkpoint "
                        "periods x B_ref/B (linear rule, the same epochs)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each ViT block in the backward pass (less memory, ~30%% more compute)")


def check_counts(args: argparse.Namespace) -> None:
    """The count flags are positive and --machine-rank names one of the --num-machines machines (one error line
    otherwise)."""
    for flag in ("num_gpus", "num_machines", "images_per_gpu", "total_batch"):
        value = getattr(args, flag, None)
        if value is not None:
            positive("--" + flag.replace("_", "-"), value)
    rank = getattr(args, "machine_rank", None)
    machines = getattr(args, "num_machines", None) or 1
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < machines):
        raise MaeTransferError(f"--machine-rank {rank} with --num-machines {machines}: the rank must be 0.."
                               f"{machines - 1} (machine 0 is the one --dist-url names)")
