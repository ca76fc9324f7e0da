"""The committed reference CPU study (`tools/reference_study.py`, spec `configs/studies/cpu_reference.py`).

At a scale two CPU cores run in under an hour, it asks the MAE paper's transfer question so that its answer can
survive new seeds: does MAE pretraining beat a random init (scratch) on label-scarce segmentation, with the ViT
frozen and with every block fine-tuned? The two contrasts are declared in the spec before the run; MAE is 8
pretraining runs, each paired with one of the 8 fine-tuning seeds. Steps:

1. data (`prepare_data`): an unlabelled pretraining pool of the photos of ../shared/data (CamVid train frames, COCO
   and fruits_nuts photos and their object crops; labels unused), shrunk to 128 px on the short side, plus
   generated shape pictures (`harnesses.synthetic`); CamVid with 20 labelled training frames and the 20 val frames;
2. the study (`mae_transfer.study`), or with `replicate=N` its declared contrasts again with N fresh fine-tuning
   seeds (`--replicate`), or the schedule pilot (`--pilot`, `configs/studies/cpu_reference_pilot.py`);
3. results: the study's files, headed by the wall time and the CPU model, copied to the results folder
   (`benchmarks/study_reference/`, its `pilot/` and `replication/`).

`reread` puts the first reference study (2026-12-03, `configs/studies/cpu_reference_v1.py`, results in
`benchmarks/study_reference/v1/`) through the current report.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image

from mae_transfer.io import atomic_write_text
from mae_transfer.paths import REPO_ROOT

logger = logging.getLogger(__name__)

SPEC = REPO_ROOT / "configs" / "studies" / "cpu_reference.py"
PILOT_SPEC = REPO_ROOT / "configs" / "studies" / "cpu_reference_pilot.py"
V1_SPEC = REPO_ROOT / "configs" / "studies" / "cpu_reference_v1.py"
SHARED = REPO_ROOT.parent / "shared" / "data"
DATA = REPO_ROOT / "work_dirs" / "reference_data"  # the specs' `_data`
CAMVID_LABELLED = 20  # of the 60 training frames: label-scarce (all 60 are in the unlabelled pool)
POOL_SHORT_SIDE = 128  # pretraining crops 96-px views: larger files only cost decoding time
RESULT_FILES = ("results.md", "results.csv", "plot.png", "contrasts.json", "replication.md", "replication.csv")


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
    from harnesses.synthetic import make_unlabeled_shapes
    from mae_transfer.coco import coco_crops_to_imagefolder
    from mae_transfer.data import find_images

    pool = data / "pool"
    if not (pool / ".complete").is_file():
        crops = data / "crops"  # object crops of the COCO-format photos: part of the unlabelled pool
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
    camvid = _camvid_subset(shared / "camvid_mini", data / f"camvid_{CAMVID_LABELLED}", CAMVID_LABELLED)
    counts: dict[str, Any] = {f"pool {part.name}": len(find_images(part))
                              for part in sorted(pool.iterdir()) if part.is_dir()}
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


# ---------------------------------------------------------------------------------------------- run
def run(output_dir: Path, results_dir: Path, data: Path, spec: Path = SPEC, replicate: int | None = None,
        parallel: int = 1, first_seed: int | None = None) -> dict[str, Any]:
    """Data, then the study (or its replication with `replicate` fresh seeds, from `first_seed` if given); its
    result files, headed by the wall time and the CPU model, copied to `results_dir`. `parallel` > 1: that many
    pretraining runs or cells at a time, as local submitit jobs of one thread each (a tiny model's step gains little
    from a second thread, and start-up and evaluation use one). Returns the summary."""
    import torch

    from mae_transfer.hardware import cpu_model
    from mae_transfer.study.claims import replication_study, write_replication
    from mae_transfer.study.cluster import run_study_jobs
    from mae_transfer.study.run import run_study
    from mae_transfer.study.spec import DONE, load_study

    start = time.time()
    original = load_study(spec, output_dir=output_dir)
    # refusals before the data
    study = original if replicate is None else replication_study(original, replicate, first_seed)
    counts = prepare_data(data)
    logger.info("data: %s", counts)
    cells = study.cells()
    finished_before = sum((study.cell_dir(c) / DONE).is_file() for c in cells)
    if parallel > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the jobs' processes
        summary = run_study_jobs(study, "local", max_parallel=parallel, wait=True)
    else:
        summary = run_study(study)
    if replicate is not None:
        write_replication(original, study)
    this_run = f"{parallel} jobs at a time, 1 thread each" if parallel > 1 else f"{torch.get_num_threads()} threads"
    timing = study.output_dir / "timing.json"
    runs = json.loads(timing.read_text()) if timing.is_file() else []
    ran = sum((study.cell_dir(c) / DONE).is_file() for c in cells) - finished_before
    runs.append({"cpu": cpu_model(), "seconds": round(time.time() - start), "cells_run": ran, "threads": this_run})
    atomic_write_text(json.dumps(runs), timing)
    working = [r for r in runs if r["cells_run"]]  # runs that trained something; later ones rewrote the results
    total = sum(r["seconds"] for r in working or runs)
    threads = ", ".join(dict.fromkeys(r.get("threads", "?") for r in working or runs))  # how the time was spent
    rewrites = len(runs) - len(working)
    header = (f"Wall time: {total / 60:.0f} min{f' over {len(working)} runs' if len(working) > 1 else ''} for data, "
              f"pretraining and {len(cells)} cells on **{cpu_model()}** ({threads}), Python "
              f"{platform.python_version()}, torch {torch.__version__} (`tools/reference_study.py`; a re-run skips "
              f"what is done{f', {rewrites} did' if rewrites else ''}).\n\nData: {counts}.\n")
    md = summary["results"].read_text()  # run_study wrote the tables and the plot last
    title, rest = md.split("\n", 1)
    atomic_write_text(f"{title}\n\n{header}{rest}", summary["results"])
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (study.output_dir / name).is_file():
            shutil.copyfile(study.output_dir / name, results_dir / name)
    return {"seconds": total, "cells": len(cells), "results": results_dir / "results.md"}


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


def reread(results_dir: Path, spec: Path = V1_SPEC) -> Path:
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
