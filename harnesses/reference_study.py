"""The committed reference CPU study (`tools/reference_study.py`, spec `configs/studies/cpu_reference.py`).

It asks, at a scale two CPU cores run in under an hour, the MAE paper's transfer questions: does the metric rise
with pretraining length, does MAE beat a random init (scratch) and a supervised backbone, and does fine-tuning
the last 1-2 blocks recover most of full fine-tuning. Steps:

1. data (`prepare_data`): an unlabelled pool of the photos of ../shared/data (CamVid train frames, COCO and
   fruits_nuts photos and their object crops; labels unused), shrunk to 128 px on the short side, plus generated
   shape pictures (`harnesses.synthetic`); a labelled ImageFolder of object crops for the supervised backbone;
   a one-shape-per-picture classification set (class by outline only) with few training labels;
2. the study (`mae_transfer.study`): scratch, supervised, and MAE after 3 lengths of one pretraining run;
   CamVid segmentation on a few labelled frames and shape classification; all / last 2 / last 1 / no blocks
   fine-tuned; 3 seeds;
3. evidence on the pretraining itself (`probe_pretraining`): the reconstruction loss per epoch, and a linear probe
   of the frozen features (shape classes; CamVid patch labels) at every saved epoch of the MAE run;
4. results: the study's tables plus the answers (paired differences, 95% t-intervals) and the probe figure,
   copied to the results folder (`benchmarks/study_reference/`).
"""
from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mae_transfer.io import atomic_write, atomic_write_text
from mae_transfer.paths import REPO_ROOT

logger = logging.getLogger(__name__)

SPEC = REPO_ROOT / "configs" / "studies" / "cpu_reference.py"
SHARED = REPO_ROOT.parent / "shared" / "data"
DATA = REPO_ROOT / "work_dirs" / "reference_data"  # the spec's `_data`
CAMVID_LABELLED = 20  # of the 60 training frames: label-scarce (all 60 are in the unlabelled pool)
POOL_SHORT_SIDE = 128  # pretraining crops 96-px views: larger files only cost decoding time
RESULT_FILES = ("results.md", "results.csv", "plot.png", "pretraining.png", "probe.csv")


# ---------------------------------------------------------------------------------------------- data
def _shrink_into(src: Path, dst: Path, short_side: int = POOL_SHORT_SIDE) -> None:
    with Image.open(src) as img:
        img = img.convert("RGB")
        scale = short_side / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        img.save(dst)


def prepare_data(data: Path, shared: Path = SHARED, shapes_pool: int = 800) -> dict[str, Any]:
    """The study's data under `data` (built once; `.complete` marks a finished folder). Returns the counts."""
    from harnesses.synthetic import make_shape_classes, make_unlabeled_shapes
    from mae_transfer.coco import coco_crops_to_imagefolder
    from mae_transfer.data import find_images

    pool = data / "pool"
    if not (pool / ".complete").is_file():
        crops = data / "crops"  # labelled: the supervised backbone's data, and part of the unlabelled pool
        for name, (json_file, images) in {
                "coco_tiny": ("coco_tiny/annotations/instances_train2017.json", "coco_tiny/train2017"),
                "fruits_nuts": ("fruits_nuts/trainval.json", "fruits_nuts/images")}.items():
            coco_crops_to_imagefolder(shared / json_file, shared / images, crops, min_size=16)
            for photo in find_images(shared / images):
                (pool / "photos").mkdir(parents=True, exist_ok=True)
                _shrink_into(photo, pool / "photos" / f"{name}_{photo.stem}.png")
        for frame in find_images(shared / "camvid_mini" / "train"):  # train frames only: val is evaluated on
            _shrink_into(frame, pool / "photos" / f"camvid_{frame.stem}.png")
        for crop in find_images(crops):
            (pool / "crops").mkdir(parents=True, exist_ok=True)
            _shrink_into(crop, pool / "crops" / f"{crop.parent.name}_{crop.stem}.png")
        make_unlabeled_shapes(pool / "shapes", shapes_pool, size=POOL_SHORT_SIDE, seed=1)
        atomic_write_text("ok", pool / ".complete")
    classes = make_shape_classes(data / "shape_classes", train_per_class=20, val_per_class=100, size=96, seed=2)
    camvid = _camvid_subset(shared / "camvid_mini", data / f"camvid_{CAMVID_LABELLED}", CAMVID_LABELLED)
    counts = {part.name: len(find_images(part)) for part in sorted(pool.iterdir()) if part.is_dir()}
    counts["crops (labelled)"] = len(find_images(data / "crops"))
    counts["shape classes train / val"] = (len(find_images(classes / "train")), len(find_images(classes / "val")))
    counts["camvid train / val"] = (len(find_images(camvid / "train")), len(find_images(camvid / "val")))
    return counts


def _camvid_subset(src: Path, dst: Path, frames: int) -> Path:
    """CamVid with `frames` labelled training frames, evenly spaced through the sequence (neighbouring frames are
    nearly the same picture), and the whole val split; links to the shared files, nothing copied."""
    if (dst / ".complete").is_file():
        return dst
    train = sorted((src / "train").glob("*.png"))
    step = len(train) / frames
    chosen = [train[int(i * step)] for i in range(frames)]
    for split, files in (("train", chosen), ("val", sorted((src / "val").glob("*.png")))):
        for folder, sub in ((split, ""), (f"{split}annot", "annot")):
            (dst / folder).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = dst / folder / f.name
                if not link.exists():
                    link.symlink_to((src / f"{split}{sub}" / f.name).resolve())
    atomic_write_text("ok", dst / ".complete")
    return dst


# ---------------------------------------------------------------------------------------------- linear probes
ENCODER = dict(name="vit_tiny_patch16_224", depth=4, img_size=96)  # the tiny CPU configs' ViT
CAMVID_PROBE_SIZE = (144, 192)  # (h, w): the 480x360 frames at 0.4, a 9 x 12 patch grid
CAMVID_CLASSES, CAMVID_IGNORE = 11, 11


def load_encoder(checkpoint: str | Path | None, seed: int = 0) -> torch.nn.Module:
    """The tiny ViT with a checkpoint's weights (any format the importer reads), or a seeded random init."""
    from backbones.vit import create_vit
    from mae_transfer.checkpoint import load_backbone

    torch.manual_seed(seed)
    model = create_vit(ENCODER["name"], depth=ENCODER["depth"], img_size=ENCODER["img_size"])
    if checkpoint is not None:
        load_backbone(checkpoint, model)
    return model.eval()


@torch.no_grad()
def _tokens(model: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Final-norm patch tokens (B, N, C) of the frozen encoder (cls token dropped)."""
    prefix = 1 if getattr(model, "cls_token", None) is not None else 0
    return torch.cat([model.forward_features(images[i:i + batch])[:, prefix:] for i in range(0, len(images), batch)])


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, classes: int,
                     l2: float = 1e-3, steps: int = 100) -> torch.Tensor:
    """Predicted classes of `x_test` from a multinomial logistic regression on standardised features (full-batch
    L-BFGS; the same settings for every checkpoint). Standardising plays the part of the MAE probe's BatchNorm."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(a), y_train) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return linear(b).argmax(1)


def load_shape_classes(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from harnesses.synthetic import SHAPE_CLASSES
    from mae_transfer.data import eval_transform

    view = eval_transform(ENCODER["img_size"])
    out = {}
    for split in ("train", "val"):
        images, labels = [], []
        for cls, name in enumerate(SHAPE_CLASSES):
            for f in sorted((root / split / name).glob("*.png")):
                with Image.open(f) as img:
                    images.append(view(img.convert("RGB")))
                labels.append(cls)
        out[split] = (torch.stack(images), torch.tensor(labels))
    return out


def load_camvid_patches(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Frames at CAMVID_PROBE_SIZE, normalised, and each 16x16 patch's majority label (ignore when most of the
    patch is unlabelled)."""
    from mae_transfer.data import IMAGENET_MEAN, IMAGENET_STD

    h, w = CAMVID_PROBE_SIZE
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = {}
    for split in ("train", "val"):
        images, labels = [], []
        for f in sorted((root / split).glob("*.png")):
            with Image.open(f) as img:
                arr = np.asarray(img.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
            images.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)
            with Image.open(root / f"{split}annot" / f.name) as lab:
                lab = np.asarray(lab.resize((w, h), Image.NEAREST), dtype=np.int64)
            blocks = lab.reshape(h // 16, 16, w // 16, 16).transpose(0, 2, 1, 3).reshape(-1, 256)
            counts = np.stack([(blocks == c).sum(1) for c in range(CAMVID_CLASSES + 1)], 1)
            majority = counts.argmax(1)
            labels.append(torch.from_numpy(np.where(counts[:, CAMVID_IGNORE] > 128, CAMVID_IGNORE, majority)))
        out[split] = (torch.stack(images), torch.stack(labels))
    return out


def probe(model: torch.nn.Module, shapes: dict[str, Any], camvid: dict[str, Any]) -> dict[str, float]:
    """Top-1 (%) of a linear probe on mean-pooled features of the shape pictures, and accuracy / mIoU (%) of a
    linear probe on patch features of the CamVid frames (patch labels as above)."""
    (xs, ys), (xv, yv) = (( _tokens(model, x).mean(1), y) for x, y in (shapes["train"], shapes["val"]))
    top1 = (fit_linear_probe(xs, ys, xv, int(ys.max()) + 1) == yv).float().mean().item() * 100
    (ct, lt), (cv, lv) = ((_tokens(model, x).flatten(0, 1), y.flatten()) for x, y in (camvid["train"], camvid["val"]))
    keep_t, keep_v = lt != CAMVID_IGNORE, lv != CAMVID_IGNORE
    pred = fit_linear_probe(ct[keep_t], lt[keep_t], cv[keep_v], CAMVID_CLASSES)
    truth = lv[keep_v]
    ious = [((pred == c) & (truth == c)).sum().item() / union for c in range(CAMVID_CLASSES)
            if (union := ((pred == c) | (truth == c)).sum().item()) > 0 and (truth == c).any()]
    return {"shapes_top1": top1, "camvid_patch_acc": (pred == truth).float().mean().item() * 100,
            "camvid_patch_mIoU": 100 * sum(ious) / max(1, len(ious))}


def probe_pretraining(study: Any, data: Path) -> list[dict[str, Any]]:
    """The linear probes at every saved epoch of the MAE run (epoch 0: the random init), and of the supervised
    backbone; with the reconstruction loss of each epoch where there is one."""
    from mae_transfer.study.spec import backbone_checkpoint, pretrain_group

    shapes, camvid = load_shape_classes(data / "shape_classes"), load_camvid_patches(data / f"camvid_{CAMVID_LABELLED}")
    mae = [n for n in study.backbones if isinstance(study.backbones[n], dict) and study.backbones[n].get("epoch")]
    run = study.output_dir / "backbones" / pretrain_group(study.backbones, mae[0])[0] / "pretrain"
    losses = {r["epoch"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
    rows = [{"backbone": "random init", "epoch": 0, "recon_loss": "", **probe(load_encoder(None), shapes, camvid)}]
    for ckpt in sorted(run.glob("checkpoint_0*.pth")):
        epoch = int(ckpt.stem.split("_")[1])
        rows.append({"backbone": "MAE", "epoch": epoch, "recon_loss": losses.get(epoch, ""),
                     **probe(load_encoder(ckpt), shapes, camvid)})
        logger.info("probe: MAE epoch %d: %s", epoch, rows[-1])
    for name, entry in study.backbones.items():
        if isinstance(entry, dict) and entry.get("pretrain") and name not in mae:
            rows.append({"backbone": name, "epoch": "", "recon_loss": "",
                         **probe(load_encoder(backbone_checkpoint(study, name)), shapes, camvid)})
    return rows


# ---------------------------------------------------------------------------------------------- answers
def _cell(d: Any) -> str:
    """A difference's text, in bold when its 95% interval excludes 0."""
    if d is None:
        return "-"
    return f"**{d.text()}**" if d.within_noise is False else d.text()


def answers_markdown(study: Any, rows: list[dict[str, Any]]) -> str:
    """The three questions, each answered by paired differences (seed-matched) with their 95% t-intervals."""
    from mae_transfer.study.tables import freeze_label, metric_columns, paired_difference, per_seed, summarise

    mae = [n for n in study.backbones if isinstance(study.backbones[n], dict) and study.backbones[n].get("epoch")]
    mae.sort(key=lambda n: study.backbones[n]["epoch"])
    longest, shortest = mae[-1], mae[0]
    cols = metric_columns(study)
    full, frozen = 0, -1
    partial = [f for f in study.freeze_blocks if f not in (full, frozen)]

    def diff(a: tuple[str, int], b: tuple[str, int], task: str, metric: str) -> Any:
        return paired_difference(per_seed(rows, a[0], task, metric, a[1]), per_seed(rows, b[0], task, metric, b[1]))

    lines = ["", "## Answers", "",
             "Paired by seed: mean ± sample std of the per-seed differences, [95% t-interval], n pairs; "
             "\"within noise\" when the interval contains 0; **bold** when it does not.", "",
             f"**1. Does the metric rise with pretraining length?** (MAE after more epochs − {shortest}, "
             "same run)", "",
             "| comparison | metric | " + " | ".join(freeze_label(study, f) for f in (full, frozen)) + " |",
             "|---|---|---|---|"]
    for longer in mae[1:]:
        for task, metric, label in cols:
            cells = [diff((longer, f), (shortest, f), task, metric) for f in (full, frozen)]
            lines.append(f"| {longer} − {shortest} | {label} | "
                         + " | ".join(_cell(d) for d in cells) + " |")
    lines += ["", f"**2. Does MAE beat scratch (and supervised)?** ({longest}, the longest pretraining)", "",
              "| comparison | metric | " + " | ".join(freeze_label(study, f) for f in study.freeze_blocks) + " |",
              "|---|---|" + "---|" * len(study.freeze_blocks)]
    for other in ("scratch", "supervised"):
        for task, metric, label in cols:
            cells = [diff((longest, f), (other, f), task, metric) for f in study.freeze_blocks]
            lines.append(f"| {longest} − {other} | {label} | "
                         + " | ".join(_cell(d) for d in cells) + " |")
    stats = summarise(study, rows)
    lines += ["", "**3. Does fine-tuning the last 1-2 blocks recover most of full fine-tuning?** Recovered = "
              "(partial − frozen) / (all − frozen), from the means, given only where all − frozen (paired) is "
              "above the noise (otherwise there is nothing to recover); partial − all is paired.", "",
              "| backbone | metric | all − frozen | " + " | ".join(f"last {study.blocks_tuned(f)}: recovered, − all"
                                                             for f in partial) + " |",
              "|---|---|---|" + "---|" * len(partial)]
    for backbone in (longest, "scratch"):
        for task, metric, label in cols:
            m = {f: stats.get((backbone, task, metric, f), (math.nan,))[0] for f in study.freeze_blocks}
            span = diff((backbone, full), (backbone, frozen), task, metric)
            cells = [_cell(span)]
            for f in partial:
                d = diff((backbone, f), (backbone, full), task, metric)
                recovered = (f"{(m[f] - m[frozen]) / (m[full] - m[frozen]):.0%}"
                             if span is not None and span.within_noise is False and span.mean > 0 else "-")
                cells.append(f"{recovered}, {_cell(d)}")
            lines.append(f"| {backbone} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_probe(rows: list[dict[str, Any]], out: Path, marks: list[int]) -> dict[str, Path]:
    """probe.csv and pretraining.png: the reconstruction loss and both probes against MAE epochs (the epochs the
    study takes marked), the random init at epoch 0 and the supervised backbone as a dashed line."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": atomic_write_text(buf.getvalue(), out / "probe.csv")}
    mae = [r for r in rows if r["backbone"] in ("MAE", "random init")]
    others = [r for r in rows if r["backbone"] not in ("MAE", "random init")]
    panels = [("recon_loss", "MAE reconstruction loss (train)"), ("shapes_top1", "linear probe: shape classes top-1 %"),
              ("camvid_patch_mIoU", "linear probe: CamVid patch mIoU %")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        pts = [(r["epoch"], r[key]) for r in mae if r[key] != ""]
        ax.plot(*zip(*pts, strict=True), marker="o", color="C0", label="MAE (epoch 0 = random init)")
        for i, r in enumerate(others):
            if r[key] != "":
                ax.axhline(r[key], color=f"C{i + 1}", linestyle="--", label=r["backbone"])
        for epoch in marks:
            ax.axvline(epoch, color="grey", alpha=0.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("MAE pretraining epoch (grey: the study's backbones)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    try:
        paths["png"] = atomic_write(out / "pretraining.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- run
def run(output_dir: Path, results_dir: Path, data: Path, spec: Any = SPEC) -> dict[str, Any]:
    """Data, study, probes, answers; the small result files copied to `results_dir`. Returns the summary."""
    from mae_transfer.hardware import cpu_model
    from mae_transfer.study.run import run_study
    from mae_transfer.study.spec import load_study
    from mae_transfer.study.tables import collect

    start = time.time()
    counts = prepare_data(data)
    logger.info("data: %s", counts)
    study = load_study(spec, output_dir=output_dir)
    summary = run_study(study)
    rows = collect(study)
    probes = probe_pretraining(study, data)
    marks = sorted(e["epoch"] for e in study.backbones.values() if isinstance(e, dict) and e.get("epoch"))
    write_probe(probes, study.output_dir, marks)
    runs = json.loads((study.output_dir / "timing.json").read_text()) if (
        study.output_dir / "timing.json").is_file() else []
    runs.append({"cpu": cpu_model(), "seconds": round(time.time() - start), "cells_run": len(summary["ran"])})
    atomic_write_text(json.dumps(runs), study.output_dir / "timing.json")
    working = [r for r in runs if r["cells_run"]]  # runs that trained something; later ones rewrote the results
    total = sum(r["seconds"] for r in working or runs)
    rewrites = len(runs) - len(working)
    header = (f"Wall time: {total / 60:.0f} min{f' over {len(working)} runs' if len(working) > 1 else ''} for data, "
              f"pretraining, {len(rows)} cells and the probes on **{cpu_model()}**, {torch.get_num_threads()} "
              f"threads, Python {platform.python_version()}, torch {torch.__version__} "
              f"(`tools/reference_study.py`; a re-run skips what is done{f', {rewrites} did' if rewrites else ''}).\n\n"
              f"Data: {counts}.\n")
    results_md = summary["results"]  # run_study wrote the tables and the plot last
    md = results_md.read_text()
    title, rest = md.split("\n", 1)
    atomic_write_text(f"{title}\n\n{header}{rest}{answers_markdown(study, rows)}\n"
                      "Pretraining evidence: `pretraining.png` (reconstruction loss and linear probes against MAE "
                      "epochs), numbers in `probe.csv`.\n", results_md)
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        shutil.copyfile(study.output_dir / name, results_dir / name)
    return {"seconds": total, "cells": len(rows), "results": results_dir / "results.md"}


def read_results_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a study's results.csv as `collect` returns them (integers, metrics as floats, empty ones left
    out), so the current report can re-read a committed study whose cell folders are gone."""
    import csv

    fixed = {"backbone", "task", "kind", "freeze_blocks", "blocks_tuned", "seed", "seconds", "cell_dir"}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {k: raw[k] for k in ("backbone", "task", "kind", "seconds", "cell_dir")}
            row.update({k: int(raw[k]) for k in ("freeze_blocks", "blocks_tuned", "seed")})
            row.update({k: float(v) for k, v in raw.items() if k not in fixed and v != ""})
            rows.append(row)
    return rows


def reread(results_dir: Path, spec: Any = SPEC) -> Path:
    """`reread.md` beside a committed results.csv: the tables of the current report (its exploratory family,
    Holm-adjusted) over the same cells, with nothing run."""
    from mae_transfer.study.report import results_markdown
    from mae_transfer.study.spec import load_study

    study = load_study(spec, output_dir=results_dir / "reread")
    md = results_markdown(study, read_results_csv(results_dir / "results.csv"))
    title, rest = md.split("\n", 1)
    out = results_dir / "reread.md"
    atomic_write_text(f"{title} — re-read\n\nThe committed `results.csv` read again by the current study report "
                      "(`tools/reference_study.py --reread`): no cell was run again. The spec declared no contrasts, "
                      "so every difference is exploratory and Holm-adjusted across its family.\n" + rest, out)
    return out
