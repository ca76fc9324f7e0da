"""Built-in data for the demo, smoke runs and studies: rendered shapes on textured backgrounds.

The class is decided by the outline alone: every shape's fill (a random colour, two-colour stripes or a noisy
colour) and the background are drawn independently of its class, and every class covers the same area for the same
size draw (a smaller triangle would show in a picture's colour spread), so no colour statistic tells the classes
apart (tests/harnesses/test_synthetic.py fits a colour-only classifier to check it). Earlier versions gave each
class its own colour: a shortcut a random ViT keeps and norm-pix MAE learns to ignore.

`make_shapes_dataset(root)` writes, for splits train/val:
  images/<split>/NNNN.png                 RGB pictures
  annotations/instances_<split>.json      COCO instances (polygon masks, boxes, areas; ids start at 1)
  labels/<split>/NNNN.png                 semantic labels: 0 background, 1..3 = circle, square, triangle
`make_unlabeled_shapes(root, count)` writes unlabelled pictures of the same kind (a pretraining pool), and
`make_shape_classes(root, ...)` an ImageFolder (train/<class>/, val/<class>/) of one shape per picture.
Everything derives from the seed, so the same call always writes the same files; the three use separate random
streams, so a pool never repeats a labelled picture.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mae_transfer.io import atomic_write_text

SHAPE_CLASSES = ("circle", "square", "triangle")
_STREAMS = {"labelled": 0, "unlabeled": 1, "classes": 2}  # one random stream per kind of set
FILLS = ("plain", "stripes", "noise")


@dataclass(frozen=True)
class ShapeStyle:
    """How shapes are drawn: their size range (radius of the equal-area circle, as a fraction of the picture's
    side) and the fills a shape's surface is drawn from. Neither depends on the class."""

    radius: tuple[float, float] = (0.08, 0.2)
    fills: tuple[str, ...] = FILLS
    rotate: bool = True  # False: squares and triangles stand upright
    # True: class k is always drawn with fills[k] (its colour still random), so the surface pattern tells the
    # class as well as the outline
    fill_by_class: bool = False

    def __post_init__(self) -> None:
        unknown = [f for f in self.fills if f not in FILLS]
        if unknown or not self.fills:
            raise ValueError(f"ShapeStyle fills: expected some of {', '.join(FILLS)}, got {list(self.fills)}")
        if self.fill_by_class and len(self.fills) != len(SHAPE_CLASSES):
            raise ValueError(f"ShapeStyle fill_by_class: expected one fill per class ({', '.join(SHAPE_CLASSES)}), "
                             f"got {list(self.fills)}")
        widest = max(_reach(kind, 1.0) for kind in SHAPE_CLASSES)  # a shape's reach per unit of radius
        if not 0 < self.radius[0] <= self.radius[1] < 0.5 / widest:  # every shape fits inside the picture
            raise ValueError(f"ShapeStyle radius: expected 0 < low <= high < {0.5 / widest:.3f} of the side (the "
                             f"widest shape inside the picture), got {self.radius}")

    def stamp(self) -> list[str]:
        """The style's part of a finished folder's stamp (the default style keeps earlier versions' stamps)."""
        default = ShapeStyle()
        return ([] if self.radius == default.radius else [f"r{self.radius[0]}-{self.radius[1]}"]) + (
            [] if self.fills == default.fills else ["+".join(self.fills)]) + ([] if self.rotate else ["upright"]) + (
            ["fill-by-class"] if self.fill_by_class else [])


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour gradient plus blurred noise: texture that MAE can learn to reconstruct."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1, c2 = rng.uniform(40, 200, 3), rng.uniform(-60, 60, 3), rng.uniform(-60, 60, 3)
    img = c0 + xx[..., None] * c1 + yy[..., None] * c2
    noise = Image.fromarray(rng.uniform(0, 255, (size // 8, size // 8, 3)).astype(np.uint8)).resize(
        (size, size), Image.BICUBIC)
    img = 0.75 * img + 0.25 * np.asarray(noise, dtype=np.float64)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _fill(rng: np.random.Generator, size: int, fills: tuple[str, ...], by_class: int | None = None) -> Image.Image:
    """A shape's surface: a plain colour, stripes of two colours at a random angle and period, or a colour with
    blurred noise; drawn without looking at its class unless `by_class` names the fill's index."""
    base = rng.uniform(0, 255, 3)
    style = fills[int(rng.integers(len(fills)))]  # drawn either way: a by-class style keeps the random stream
    if by_class is not None:
        style = fills[by_class]
    if style == "plain":
        img = np.broadcast_to(base, (size, size, 3))
    elif style == "stripes":
        yy, xx = np.mgrid[0:size, 0:size]
        angle, period = rng.uniform(0, math.pi), rng.uniform(size * 0.04, size * 0.15)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        img = np.where((np.floor(phase) % 2 == 0)[..., None], base, rng.uniform(0, 255, 3))
    else:
        noise = Image.fromarray(rng.uniform(0, 255, (size // 6, size // 6, 3)).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC)
        img = 0.6 * base + 0.4 * np.asarray(noise, dtype=np.float64)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


_CORNERS = {"circle": (24, 0.0), "square": (4, math.pi / 4), "triangle": (3, -math.pi / 2)}


def _reach(kind: str, r: float) -> float:
    """Circumradius of a `kind` of size `r`: every class covers the area of the 24-gon of circumradius r, so the
    area a shape covers (and with it a picture's colour spread) does not give its class away."""
    n = _CORNERS[kind][0]
    return r * math.sqrt(math.sin(2 * math.pi / 24) * 12 / (math.sin(2 * math.pi / n) * n / 2))


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    n, offset = _CORNERS[kind]
    reach = _reach(kind, r)
    return [(cx + reach * math.cos(offset + angle + 2 * math.pi * k / n),
             cy + reach * math.sin(offset + angle + 2 * math.pi * k / n)) for k in range(n)]


def _draw_shape(rng: np.random.Generator, img: Image.Image, cls: int, cx: float, cy: float,
                r: float, style: ShapeStyle = ShapeStyle()) -> list[tuple[float, float]]:
    """Paint one shape of class `cls` onto `img` (its fill independent of the class unless the style ties them);
    returns its polygon."""
    angle = float(rng.uniform(0, math.pi))  # drawn either way: an upright style keeps the random stream
    poly = _polygon(SHAPE_CLASSES[cls], cx, cy, r, angle if style.rotate else 0.0)
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).polygon(poly, fill=255)
    img.paste(_fill(rng, img.size[0], style.fills, cls if style.fill_by_class else None), (0, 0), mask)
    return poly


def _render(rng: np.random.Generator, size: int, max_shapes: int, with_labels: bool = True,
            style: ShapeStyle = ShapeStyle()) -> tuple[Image.Image, np.ndarray, list[dict]]:
    img = _background(rng, size)
    label = Image.new("L", (size, size), 0)
    draw_label = ImageDraw.Draw(label)
    instances = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        r = float(rng.uniform(size * style.radius[0], size * style.radius[1]))
        reach = _reach(SHAPE_CLASSES[cls], r)  # the whole shape inside the picture
        cx, cy = rng.uniform(reach, size - reach, 2)
        poly = _draw_shape(rng, img, cls, float(cx), float(cy), r, style)
        draw_label.polygon(poly, fill=cls + 1)
        instances.append(dict(cls=cls, poly=poly))
    if not with_labels:
        return img.filter(ImageFilter.SMOOTH), np.asarray(label), []
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
                        max_shapes: int = 4, seed: int = 0, style: ShapeStyle = ShapeStyle()) -> Path:
    """Write the dataset under `root` (skipped if it is already complete). Returns `root`."""
    root = Path(root)
    done, stamp = root / ".complete", ",".join(map(str, ["v3", num_train, num_val, size, max_shapes, seed,
                                                          *style.stamp()]))
    if done.is_file() and done.read_text() == stamp:
        return root
    rng = np.random.default_rng([seed, _STREAMS["labelled"]])
    for split, count in (("train", num_train), ("val", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        coco = dict(images=[], annotations=[],
                    categories=[dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(SHAPE_CLASSES)])
        for i in range(count):
            img, label, anns = _render(rng, size, max_shapes, style=style)
            name = f"{i:04d}.png"
            img.save(root / "images" / split / name)
            Image.fromarray(label).save(root / "labels" / split / name)
            coco["images"].append(dict(id=i + 1, file_name=name, width=size, height=size))
            for ann in anns:
                coco["annotations"].append(dict(ann, id=len(coco["annotations"]) + 1, image_id=i + 1))
        (root / "annotations").mkdir(exist_ok=True)
        atomic_write_text(json.dumps(coco), root / "annotations" / f"instances_{split}.json")
    done.write_text(stamp)
    return root


def make_unlabeled_shapes(root: str | os.PathLike, count: int, size: int = 192, max_shapes: int = 4,
                          seed: int = 0, style: ShapeStyle = ShapeStyle()) -> Path:
    """`count` unlabelled pictures like make_shapes_dataset's (root/NNNN.png): a pool for MAE pretraining."""
    root = Path(root)
    done, stamp = root / ".complete", ",".join(map(str, ["unlabeled-v3", count, size, max_shapes, seed,
                                                          *style.stamp()]))
    if done.is_file() and done.read_text() == stamp:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _STREAMS["unlabeled"]])
    for i in range(count):
        _render(rng, size, max_shapes, with_labels=False, style=style)[0].save(root / f"{i:05d}.png")
    done.write_text(stamp)
    return root


def make_shape_classes(root: str | os.PathLike, train_per_class: int, val_per_class: int, size: int = 96,
                       seed: int = 0) -> Path:
    """An ImageFolder of one shape per picture: root/{train,val}/<circle|square|triangle>/NNNN.png."""
    root = Path(root)
    done, stamp = root / ".complete", f"classes-v3,{train_per_class},{val_per_class},{size},{seed}"
    if done.is_file() and done.read_text() == stamp:
        return root
    rng = np.random.default_rng([seed, _STREAMS["classes"]])
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for cls, name in enumerate(SHAPE_CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = _background(rng, size)
                r = float(rng.uniform(size * 0.18, size * 0.3))  # a triangle's reach stays under size / 2
                reach = _reach(name, r)
                cx, cy = rng.uniform(reach, size - reach, 2)
                _draw_shape(rng, img, cls, float(cx), float(cy), r)
                img.filter(ImageFilter.SMOOTH).save(root / split / name / f"{i:04d}.png")
    done.write_text(stamp)
    return root
