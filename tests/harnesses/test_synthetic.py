"""The built-in shapes (harnesses/synthetic.py): no colour shortcut to the class, and deterministic files.

The shortcut test fits a colour-only classifier and checks it does no better than chance on held-out pictures; the
same classifier on two outline statistics (how much of its bounding box a shape covers, how spread out it is) does
well above chance, so the test can tell a learnable class signal from none."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harnesses.synthetic import (
    SHAPE_CLASSES,
    ShapeStyle,
    make_shape_classes,
    make_shapes_dataset,
    make_unlabeled_shapes,
)


def _qda_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Held-out accuracy of a Gaussian class-conditional classifier (QDA: a mean and a covariance per class, on
    features standardised with the training statistics; a small ridge keeps the covariances invertible)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-9
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    scores = []
    for c in range(len(SHAPE_CLASSES)):
        xc = train_x[train_y == c]
        cov = np.cov(xc, rowvar=False).reshape(train_x.shape[1], train_x.shape[1]) + 1e-3 * np.eye(train_x.shape[1])
        diff = test_x - xc.mean(0)
        maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        scores.append(-0.5 * (maha + np.linalg.slogdet(cov)[1]) + math.log(len(xc) / len(train_x)))
    return float((np.argmax(np.stack(scores, 1), 1) == test_y).mean())


def _chance_bound(test_y: np.ndarray) -> float:
    """An accuracy a classifier without class information stays under: the majority class's share plus 4.5
    binomial standard deviations (exceeded by chance with probability ~3e-6)."""
    p = np.bincount(test_y, minlength=len(SHAPE_CLASSES)).max() / len(test_y)
    return float(p + 4.5 * math.sqrt(p * (1 - p) / len(test_y)))


def _picture_features(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """make_shape_classes pictures: per-picture mean and std of R, G, B; labels from the folder."""
    feats, labels = [], []
    for cls, name in enumerate(SHAPE_CLASSES):
        for path in sorted((root / split / name).glob("*.png")):
            px = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3)
            feats.append(np.concatenate([px.mean(0), px.std(0)]))
            labels.append(cls)
    return np.array(feats), np.array(labels)


def _instance_features(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_shapes_dataset instances: mean R, G, B inside each instance's visible mask (its COCO polygons clipped
    to the label map's pixels of its class), two outline statistics of the mask (the fraction of its bounding box
    it covers, its polar moment over its squared area), and the class."""
    from pycocotools import mask as mask_utils

    coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    by_image = {im["id"]: im for im in coco["images"]}
    colour, outline, labels = [], [], []
    for ann in coco["annotations"]:
        im = by_image[ann["image_id"]]
        h, w = im["height"], im["width"]
        rles = mask_utils.frPyObjects(ann["segmentation"], h, w)
        mask = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
        label = np.asarray(Image.open(root / "labels" / split / im["file_name"]))
        mask &= label == ann["category_id"]
        if mask.sum() < 20:
            continue
        px = np.asarray(Image.open(root / "images" / split / im["file_name"]).convert("RGB"), dtype=np.float64)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        colour.append(px[mask].mean(0))
        # polar moment / area^2: rotation- and scale-free, circle 1/(2 pi) < square 1/6 < triangle sqrt(3)/9
        polar = ((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).sum() / mask.sum() ** 2
        outline.append([mask.sum() / box, polar])
        labels.append(ann["category_id"] - 1)
    return np.array(colour), np.array(outline), np.array(labels)


def test_classes_are_not_separable_by_colour_but_are_by_outline(tmp_path: Path) -> None:
    classes = make_shape_classes(tmp_path / "classes", train_per_class=100, val_per_class=100, size=64)
    (train_x, train_y), (test_x, test_y) = (_picture_features(classes, s) for s in ("train", "val"))
    acc = _qda_accuracy(train_x, train_y, test_x, test_y)
    assert len(test_y) == 300 and acc < _chance_bound(test_y), f"colour predicts the class of a picture: {acc:.3f}"

    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=80, num_val=80, size=96)
    (train_c, train_o, train_y), (test_c, test_o, test_y) = (_instance_features(shapes, s) for s in ("train", "val"))
    assert len(train_y) > 150 and len(test_y) > 150
    bound = _chance_bound(test_y)
    acc = _qda_accuracy(train_c, train_y, test_c, test_y)
    assert acc < bound, f"an instance's colour predicts its class: {acc:.3f} (chance bound {bound:.3f})"
    # positive control: the same classifier on a statistic of the outline finds the class
    acc = _qda_accuracy(train_o, train_y, test_o, test_y)
    assert acc > bound, f"the outline statistics should predict the class: {acc:.3f} (chance bound {bound:.3f})"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make", [
    lambda root, seed: make_shapes_dataset(root, num_train=3, num_val=2, size=64, seed=seed),
    lambda root, seed: make_unlabeled_shapes(root, 4, size=64, seed=seed),
    lambda root, seed: make_shape_classes(root, 2, 1, size=64, seed=seed),
], ids=["labelled", "unlabeled", "classes"])
def test_same_seed_same_files_other_seed_other_pictures(tmp_path: Path, make) -> None:
    first, again, other = (_files(make(tmp_path / name, seed)) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert first == again
    pictures = [k for k in first if k.endswith(".png") and not k.startswith("labels")]
    assert pictures and all(first[k] != other[k] for k in pictures)


def test_unlabeled_pool_does_not_repeat_labelled_pictures(tmp_path: Path) -> None:
    labelled = make_shapes_dataset(tmp_path / "shapes", num_train=4, num_val=2, size=64)
    pool = make_unlabeled_shapes(tmp_path / "pool", 8, size=64)
    labelled_pixels = [np.asarray(Image.open(p)) for p in sorted((labelled / "images").rglob("*.png"))]
    pool_pixels = [np.asarray(Image.open(p)) for p in sorted(pool.glob("*.png"))]
    assert len(pool_pixels) == 8 and len(labelled_pixels) == 6
    assert not any(np.array_equal(a, b) for a in pool_pixels for b in labelled_pixels)
    assert len({p.tobytes() for p in pool_pixels}) == 8  # and no picture twice within the pool


def _interior_spread(root: Path, file_name: str, category_id: int) -> float:
    """The largest per-channel colour sd over a shape's interior (its label's pixels 2 px inside the outline, so
    the smoothed rim does not count) in training picture `file_name`."""
    label = np.asarray(Image.open(root / "labels" / "train" / file_name))
    px = np.asarray(Image.open(root / "images" / "train" / file_name).convert("RGB"), dtype=np.float64)
    inside = label == category_id
    core = inside[2:-2, 2:-2] & inside[:-4, 2:-2] & inside[4:, 2:-2] & inside[2:-2, :-4] & inside[2:-2, 4:]
    return float(px[2:-2, 2:-2][core].std(0).max())


def test_a_shape_style_draws_what_it_says_and_the_default_style_keeps_the_files(tmp_path: Path) -> None:
    """benchmarks/demo_pilot draws variants of the shapes (size range, fills, upright); the default style must keep
    the files the committed studies were run on."""
    plain = make_shapes_dataset(tmp_path / "a", num_train=3, num_val=2, size=64)
    assert _files(plain) == _files(make_shapes_dataset(tmp_path / "b", num_train=3, num_val=2, size=64,
                                                       style=ShapeStyle()))
    style = ShapeStyle(radius=(0.25, 0.3), fills=("plain",), rotate=False)
    root = make_shapes_dataset(tmp_path / "c", num_train=24, num_val=1, size=64, max_shapes=1, style=style)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert len(coco["annotations"]) == 24
    by_image = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"]:
        im = by_image[ann["image_id"]]
        # the area of the equal-area circle of radius 0.25-0.3 x 64 px (rasterising adds or drops a rim)
        assert math.pi * 16 ** 2 * 0.9 < ann["area"] < math.pi * 19.2 ** 2 * 1.1, ann
        assert _interior_spread(root, im["file_name"], ann["category_id"]) < 3, "a plain fill is one colour"
        if SHAPE_CLASSES[ann["category_id"] - 1] == "square":  # upright: it fills its bounding box
            x, y, w, h = ann["bbox"]
            assert ann["area"] > 0.95 * w * h


def test_a_fill_by_class_style_draws_each_class_with_its_own_fill(tmp_path: Path) -> None:
    """benchmarks/demo_pilot rows AF-AN: class k drawn with fills[k]; here only the triangles are plain."""
    style = ShapeStyle(radius=(0.25, 0.3), fills=("stripes", "noise", "plain"), fill_by_class=True)
    root = make_shapes_dataset(tmp_path / "d", num_train=24, num_val=1, size=64, max_shapes=1, style=style)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    by_image = {im["id"]: im for im in coco["images"]}
    spreads = {name: [] for name in SHAPE_CLASSES}
    for ann in coco["annotations"]:
        spreads[SHAPE_CLASSES[ann["category_id"] - 1]].append(
            _interior_spread(root, by_image[ann["image_id"]]["file_name"], ann["category_id"]))
    assert all(spreads.values()), spreads  # 24 pictures draw every class
    assert max(spreads["triangle"]) < 3 < min(spreads["circle"] + spreads["square"]), spreads


@pytest.mark.parametrize("kwargs,expected", [
    (dict(fills=("plain", "stripes"), fill_by_class=True),
     "ShapeStyle fill_by_class: expected one fill per class (circle, square, triangle), got ['plain', 'stripes']"),
    (dict(fills=("plain", "dots")), "ShapeStyle fills: expected some of plain, stripes, noise, got ['plain', 'dots']"),
    (dict(fills=()), "ShapeStyle fills: expected some of plain, stripes, noise, got []"),
    (dict(radius=(0.3, 0.2)), "ShapeStyle radius: expected 0 < low <= high < 0.323 of the side (the widest shape "
                              "inside the picture), got (0.3, 0.2)"),
    (dict(radius=(0.2, 0.33)), "ShapeStyle radius: expected 0 < low <= high < 0.323 of the side (the widest shape "
                               "inside the picture), got (0.2, 0.33)"),
])
def test_a_shape_style_refuses_what_it_cannot_draw(kwargs: dict, expected: str) -> None:
    with pytest.raises(ValueError) as err:
        ShapeStyle(**kwargs)
    assert str(err.value) == expected
