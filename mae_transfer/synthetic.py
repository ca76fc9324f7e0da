"""A small built-in labelled dataset for the demo and smoke runs: rendered shapes on textured backgrounds.

`make_shapes_dataset(root)` writes, for splits train/val:
  images/<split>/NNNN.png                 RGB pictures
  annotations/instances_<split>.json      COCO instances (polygon masks, boxes, areas; ids start at 1)
  labels/<split>/NNNN.png                 semantic labels: 0 background, 1..3 = circle, square, triangle
Everything derives from the seed, so the same call always writes the same files.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mae_transfer.io import atomic_write_text

SHAPE_CLASSES = ("circle", "square", "triangle")
PALETTE = [(0, 0, 0), (220, 60, 60), (60, 170, 80), (70, 90, 220)]  # background + one colour per class


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour gradient plus blurred noise: texture that MAE can learn to reconstruct."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1, c2 = rng.uniform(40, 200, 3), rng.uniform(-60, 60, 3), rng.uniform(-60, 60, 3)
    img = c0 + xx[..., None] * c1 + yy[..., None] * c2
    noise = Image.fromarray(rng.uniform(0, 255, (size // 8, size // 8, 3)).astype(np.uint8)).resize(
        (size, size), Image.BICUBIC)
    img = 0.75 * img + 0.25 * np.asarray(noise, dtype=np.float64)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "circle":
        n, offset = 24, 0.0
    elif kind == "square":
        n, offset, r = 4, math.pi / 4, r * 1.15
    else:
        n, offset = 3, -math.pi / 2
    return [(cx + r * math.cos(offset + angle + 2 * math.pi * k / n),
             cy + r * math.sin(offset + angle + 2 * math.pi * k / n)) for k in range(n)]


def _render(rng: np.random.Generator, size: int, max_shapes: int) -> tuple[Image.Image, np.ndarray, list[dict]]:
    img = _background(rng, size)
    label = Image.new("L", (size, size), 0)
    draw, draw_label = ImageDraw.Draw(img), ImageDraw.Draw(label)
    instances = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        r = float(rng.uniform(size * 0.08, size * 0.2))
        cx, cy = rng.uniform(r, size - r, 2)
        poly = _polygon(SHAPE_CLASSES[cls], float(cx), float(cy), r, float(rng.uniform(0, math.pi)))
        colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in PALETTE[cls + 1])
        draw.polygon(poly, fill=colour)
        draw_label.polygon(poly, fill=cls + 1)
        instances.append(dict(cls=cls, poly=poly))
    label_arr = np.asarray(label)
    # later shapes may cover earlier ones: keep each instance's visible pixels only
    annotations = []
    for idx, inst in enumerate(instances):
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).polygon(inst["poly"], fill=1)
        visible = np.asarray(mask).astype(bool)
        for later in instances[idx + 1:]:
            cover = Image.new("L", (size, size), 0)
            ImageDraw.Draw(cover).polygon(later["poly"], fill=1)
            visible &= ~np.asarray(cover).astype(bool)
        if visible.sum() < 20:
            continue
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        annotations.append(dict(category_id=inst["cls"] + 1, bbox=[x0, y0, x1 - x0, y1 - y0],
                                area=float(visible.sum()), iscrowd=0,
                                segmentation=[[c for p in inst["poly"] for c in p]] if idx == len(instances) - 1
                                else _mask_polygons(visible)))
    return img.filter(ImageFilter.SMOOTH), label_arr, annotations


def _mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Polygons of a binary mask (outer contours), via scikit-image, for occluded instances."""
    from skimage import measure

    polygons = []
    for contour in measure.find_contours(np.pad(mask, 1).astype(np.uint8), 0.5):
        contour = measure.approximate_polygon(contour - 1, tolerance=0.8)
        if len(contour) >= 3:
            polygons.append([float(v) for y, x in contour for v in (x, y)])
    return polygons


def make_shapes_dataset(root: str | os.PathLike, num_train: int = 32, num_val: int = 8, size: int = 192,
                        max_shapes: int = 4, seed: int = 0) -> Path:
    """Write the dataset under `root` (skipped if it is already complete). Returns `root`."""
    root = Path(root)
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{num_train},{num_val},{size},{max_shapes},{seed}":
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        coco = dict(images=[], annotations=[],
                    categories=[dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(SHAPE_CLASSES)])
        for i in range(count):
            img, label, anns = _render(rng, size, max_shapes)
            name = f"{i:04d}.png"
            img.save(root / "images" / split / name)
            Image.fromarray(label).save(root / "labels" / split / name)
            coco["images"].append(dict(id=i + 1, file_name=name, width=size, height=size))
            for ann in anns:
                coco["annotations"].append(dict(ann, id=len(coco["annotations"]) + 1, image_id=i + 1))
        (root / "annotations").mkdir(exist_ok=True)
        atomic_write_text(json.dumps(coco), root / "annotations" / f"instances_{split}.json")
    done.write_text(f"{num_train},{num_val},{size},{max_shapes},{seed}")
    return root
