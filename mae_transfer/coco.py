"""COCO instances json files: the checks every tool that takes one runs (tools/train_det.py, the demo,
`coco_crops_to_imagefolder`), and object crops as a small labelled folder.

`check_coco_instances` / `read_coco_instances`: a file that is wrong is a one-line error; single invalid
annotations (degenerate or outside boxes, empty masks) and unreadable images are skipped with one warning
per kind, so that all tools train on the same annotations. `coco_crops_to_imagefolder` turns such a json into
a labelled folder of object crops, a small real labelled set for CPU runs of the supervised baseline.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mae_transfer.data import MAX_INVALID_FRACTION, check_image_files
from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write, read_json

logger = logging.getLogger(__name__)


# Why an annotation is skipped (kind -> the words of its warning), in the order the warnings are printed.
# Skipped, not an error: real datasets (COCO itself) hold a few degenerate annotations among good ones.
COCO_SKIP_REASONS = {
    "ignore": "marked 'ignore' (not supported by detectron2)",
    "iscrowd": "with iscrowd other than 0 or 1",
    "bbox": "without a valid bbox (expected [x, y, width, height], 4 finite numbers)",
    "box_size": "with non-positive box width/height",
    "outside": "with a box entirely outside the image",
    "empty_segmentation": "with an empty segmentation ([], no polygon of at least 3 points, or an empty RLE)",
    "bad_segmentation": "with a malformed segmentation (expected polygons of numbers, or an RLE of the image's size)",
}

def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def coco_annotation_problem(ann: dict, width: float, height: float) -> str | None:
    """Why detectron2 should not train on this annotation (a key of COCO_SKIP_REASONS), or None.

    A box that overhangs the image is usable (detectron2 clips it; rounding makes such boxes common);
    "outside" means nothing of the box lies inside the width x height image.
    """
    if ann.get("ignore", 0):
        return "ignore"
    if ann.get("iscrowd", 0) not in (0, 1):
        return "iscrowd"
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(map(_finite_number, box))):
        return "bbox"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return "box_size"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "outside"
    if "segmentation" not in ann:  # box-only annotation: detectron2 reads it as such
        return None
    return _segmentation_problem(ann["segmentation"], width, height)


def _segmentation_problem(segm: Any, width: float, height: float) -> str | None:
    if isinstance(segm, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        if not all(isinstance(p, list) and all(map(_finite_number, p)) for p in segm):
            return "bad_segmentation"
        # detectron2 drops polygons of < 3 points and then the instances left without any
        return None if any(len(p) >= 6 and len(p) % 2 == 0 for p in segm) else "empty_segmentation"
    if not isinstance(segm, dict):
        return "bad_segmentation"
    if not segm:
        return "empty_segmentation"
    counts, size = segm.get("counts"), segm.get("size")
    if size != [height, width]:  # an RLE is a mask of the whole image
        return "bad_segmentation"
    if isinstance(counts, list):  # uncompressed RLE: run lengths, background first
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or \
                sum(counts) != height * width:
            return "bad_segmentation"
        return None if sum(counts[1::2]) else "empty_segmentation"
    if not isinstance(counts, (str, bytes)):
        return "bad_segmentation"
    if not counts:
        return "empty_segmentation"
    from pycocotools import mask as mask_utils  # compressed RLE: its area needs decoding

    return None if mask_utils.area(dict(segm)) else "empty_segmentation"


def _polygon_bounds(segm: Any) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) of a segmentation's polygons (those of at least 3 points); None for an RLE."""
    if not isinstance(segm, list):
        return None
    points = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    if not points:
        return None
    xs = [v for p in points for v in p[0::2]]
    ys = [v for p in points for v in p[1::2]]
    return min(xs), min(ys), max(xs), max(ys)


def box_vs_polygon(box: list[float], bounds: tuple[float, float, float, float]) -> str:
    """"agrees" when the [x, y, width, height] box is its polygon's bounding box (within 2 px or 5% of the
    bounds' size, rounding in real files), "xyxy" when it is those bounds written as [x1, y1, x2, y2],
    else "disagrees"."""
    x0, y0, x1, y1 = bounds
    tol_x, tol_y = max(2.0, 0.05 * (x1 - x0)), max(2.0, 0.05 * (y1 - y0))

    def near(found: list[float], expected: tuple[float, ...]) -> bool:
        pairs = enumerate(zip(found, expected, strict=False))
        return all(abs(f - e) <= (tol_x if i % 2 == 0 else tol_y) for i, (f, e) in pairs)

    if near(box, (x0, y0, x1 - x0, y1 - y0)):
        return "agrees"
    return "xyxy" if near(box, bounds) else "disagrees"


@dataclass
class CocoInstances:
    """A checked COCO instances json: `data` without the invalid annotations (whose ids are `skipped_ids`) and
    without the images that cannot be read (`skipped_images`: image id -> why) and their annotations."""
    data: dict[str, Any]
    skipped_ids: set[Any] = field(default_factory=set)
    skipped_images: dict[Any, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether `data` differs from the file (then frameworks that read the file need a cleaned copy)."""
        return bool(self.skipped_ids or self.skipped_images)


def check_coco_instances(json_path: str | os.PathLike, image_root: str | os.PathLike) -> CocoInstances:
    """Read a COCO instances json after checking it against its image folder.

    Errors (MaeTransferError, one line): missing paths, malformed json, non-list images/annotations/
    categories, no or duplicate categories, an image without file_name or positive width/height, a
    missing image file, an image whose width/height differs from its file's, an annotation without a unique
    id, an unknown category_id or image_id, more than MAX_INVALID_FRACTION of the images unreadable or of the
    annotations invalid, and most boxes written as [x1, y1, x2, y2] (told by their polygons' bounds). Invalid
    annotations otherwise (see COCO_SKIP_REASONS) are removed from `data`, with one warning per kind naming the
    file, how many and the first id; so are unreadable images (truncated, corrupt) with their annotations, in one
    warning. Boxes that disagree with their polygons otherwise are counted in a warning and kept.
    """
    jp, root = Path(json_path), Path(image_root)
    data = _read_coco_json(jp, root)
    cat_ids, sizes = _check_coco_images(jp, root, data)
    unreadable = _check_image_sizes(jp, root, data["images"])
    problems, on_unreadable, boxes = _sort_coco_annotations(jp, data["annotations"], cat_ids, sizes, unreadable)
    box_warning = boxes.check(jp)
    _check_invalid_fraction(jp, problems, len(data["annotations"]) - len(on_unreadable))
    _warn_skipped_annotations(jp, problems)
    if box_warning:
        logger.warning("%s", box_warning)
    skipped = {i for ids in problems.values() for i in ids}
    if unreadable:
        _warn_unreadable_images(jp, root, data["images"], unreadable, len(on_unreadable))
        data["images"] = [im for im in data["images"] if im["id"] not in unreadable]
    if skipped or unreadable:
        data["annotations"] = [a for a in data["annotations"]
                               if a["id"] not in skipped and a["image_id"] not in unreadable]
    return CocoInstances(data, skipped, unreadable)


def _read_coco_json(jp: Path, root: Path) -> dict:
    """The json's object, after checking that both paths exist and that it has the three COCO lists."""
    if not jp.is_file():
        raise MaeTransferError(f"annotation file not found: {jp}")
    if not root.is_dir():
        raise MaeTransferError(f"image folder not found: {root}")
    data = read_json(jp)
    if not isinstance(data, dict):
        raise MaeTransferError(f"{jp}: expected a COCO json object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise MaeTransferError(f"{jp}: missing or non-list '{key}' (expected COCO instances format)")
    if not data["categories"]:
        raise MaeTransferError(f"{jp}: 'categories' is empty; at least one category is needed")
    return data


def _check_coco_images(jp: Path, root: Path, data: dict) -> tuple[set[Any], dict[Any, tuple[Any, Any]]]:
    """The category ids and each image's (width, height), after checking that category ids are unique, sizes are
    positive numbers and every image file exists."""
    try:
        cat_ids = {c["id"] for c in data["categories"]}
        sizes = {im["id"]: (im.get("width"), im.get("height")) for im in data["images"]}
        files = [im["file_name"] for im in data["images"]]
    except (KeyError, TypeError, AttributeError) as err:
        raise MaeTransferError(f"{jp}: category/image entry without {err} (expected COCO instances format)") from None
    if len(cat_ids) != len(data["categories"]):
        raise MaeTransferError(f"{jp}: duplicate category ids")
    for image_id, (w, h) in sizes.items():
        if not (_finite_number(w) and _finite_number(h) and w > 0 and h > 0):
            raise MaeTransferError(f"{jp}: image {image_id!r} has width {w!r}, height {h!r}; "
                                   "positive numbers expected (the image size in pixels)")
    for name in files:
        if not (root / name).is_file():
            raise MaeTransferError(f"{jp}: image file not found: {root / name}")
    return cat_ids, sizes


def _check_annotation_refs(jp: Path, index: int, ann: Any, ann_ids: set[Any], cat_ids: set[Any],
                           sizes: dict[Any, Any]) -> Any:
    """The annotation's id, after checking it is a new int or string and that its category and image exist."""
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    if ann_id is None or not isinstance(ann_id, (int, str)) or ann_id in ann_ids:
        what = "has no id" if ann_id is None else f"has id {ann_id!r}, " + (
            "not an integer or string" if not isinstance(ann_id, (int, str)) else "which is not unique")
        raise MaeTransferError(f"{jp}: annotation #{index} {what} (COCO annotations need unique ids)")
    if ann.get("category_id") not in cat_ids:
        raise MaeTransferError(
            f"{jp}: annotation {ann_id} has category_id {ann.get('category_id')!r}, "
            f"absent from 'categories' (ids: {sorted(cat_ids)})"
        )
    if ann.get("image_id") not in sizes:
        raise MaeTransferError(f"{jp}: annotation {ann_id} refers to unknown image_id {ann.get('image_id')!r}")
    return ann_id


def _sort_coco_annotations(jp: Path, annotations: list, cat_ids: set[Any], sizes: dict[Any, Any],
                           unreadable: dict[Any, str]) -> tuple[dict[str, list[Any]], list[Any], _BoxFormatTally]:
    """Each annotation checked (ids and references: errors) and sorted: the ids of invalid ones by kind, the ids of
    those on unreadable images, and the box-format tally of the valid ones."""
    ann_ids: set[Any] = set()
    problems: dict[str, list[Any]] = {}
    on_unreadable: list[Any] = []  # annotations of skipped images
    boxes = _BoxFormatTally()
    for index, ann in enumerate(annotations):
        ann_id = _check_annotation_refs(jp, index, ann, ann_ids, cat_ids, sizes)
        ann_ids.add(ann_id)
        if ann["image_id"] in unreadable:
            on_unreadable.append(ann_id)
            continue
        kind = coco_annotation_problem(ann, *sizes[ann["image_id"]])
        if kind:
            problems.setdefault(kind, []).append(ann_id)
        else:
            boxes.add(ann)
    return problems, on_unreadable, boxes


def _check_invalid_fraction(jp: Path, problems: dict[str, list[Any]], total: int) -> None:
    """An error when more than MAX_INVALID_FRACTION of the `total` annotations are invalid (a wrong format rather
    than a few bad entries), naming the most common problem."""
    num_invalid = sum(map(len, problems.values()))
    if num_invalid > MAX_INVALID_FRACTION * total:
        kind, ids = max(problems.items(), key=lambda item: len(item[1]))
        raise MaeTransferError(
            f"{jp}: {num_invalid} of {total} annotations are invalid, {len(ids)} of them "
            f"{COCO_SKIP_REASONS[kind]} (first: id {ids[0]}); expected COCO instances (bbox [x, y, width, height] "
            "in pixels of the image)"
        )


def _warn_skipped_annotations(jp: Path, problems: dict[str, list[Any]]) -> None:
    """One warning per kind of invalid annotation: how many, why and the first id."""
    for kind, reason in COCO_SKIP_REASONS.items():
        if kind in problems:
            ids = problems[kind]
            logger.warning("%s: skipped %d annotation%s %s (first: id %s)", jp, len(ids), "" if len(ids) == 1 else "s",
                           reason, ids[0])


def _warn_unreadable_images(jp: Path, root: Path, images: list[dict], unreadable: dict[Any, str],
                            num_annotations: int) -> None:
    """One warning for the unreadable images skipped with their annotations, naming the first and why."""
    first = next(im for im in images if im["id"] in unreadable)
    logger.warning("%s: skipped %d unreadable image%s and %s %d annotation%s (first: %s: %s)", jp,
                   len(unreadable), "" if len(unreadable) == 1 else "s", "its" if len(unreadable) == 1 else "their",
                   num_annotations, "" if num_annotations == 1 else "s", root / first["file_name"],
                   unreadable[first["id"]])


def _check_image_sizes(jp: Path, root: Path, images: list[dict]) -> dict[Any, str]:
    """Decode every image of the json (`check_image_files`): unreadable ones (truncated, corrupt) are returned
    (image id -> why) to be skipped, an error when more than MAX_INVALID_FRACTION are; a width/height in the json
    other than the file's is an error (detectron2 would stop at the first such image in the middle of training)."""
    status = check_image_files(root, [im["file_name"] for im in images])
    unreadable = {im["id"]: status[im["file_name"]] for im in images if isinstance(status[im["file_name"]], str)}
    if unreadable and len(unreadable) > MAX_INVALID_FRACTION * len(images):
        first = next(im for im in images if im["id"] in unreadable)
        raise MaeTransferError(f"{jp}: {len(unreadable)} of {len(images)} images cannot be read (first: "
                               f"{root / first['file_name']}: {unreadable[first['id']]})")
    wrong = [im for im in images if im["id"] not in unreadable
             and tuple(status[im["file_name"]]) != (im["width"], im["height"])]
    if wrong:
        im = wrong[0]
        (fw, fh), what = status[im["file_name"]], "image has" if len(wrong) == 1 else "images have"
        raise MaeTransferError(
            f"{jp}: {len(wrong)} of {len(images)} {what} another width x height in the json than in the file "
            f"(first: {root / im['file_name']}: json {im['width']:g}x{im['height']:g}, file {fw}x{fh}); "
            "fix 'width'/'height' in the json")
    return unreadable


class _BoxFormatTally:
    """Boxes compared with the bounds of their annotation's polygons: a few disagreeing ones are a warning (kept);
    most of them being the bounds as [x1, y1, x2, y2] is an error (the file uses another box format)."""

    def __init__(self) -> None:
        self.compared, self.xyxy = 0, 0
        self.disagreeing: list[tuple[Any, list, tuple]] = []

    def add(self, ann: dict) -> None:
        bounds = _polygon_bounds(ann.get("segmentation"))
        if bounds is None:
            return
        self.compared += 1
        verdict = box_vs_polygon(ann["bbox"], bounds)
        if verdict != "agrees":
            self.disagreeing.append((ann["id"], ann["bbox"], bounds))
            self.xyxy += verdict == "xyxy"

    def check(self, jp: Path) -> str | None:
        """Raises when most boxes are [x1, y1, x2, y2]; else the warning about disagreeing boxes, if any."""
        if not self.disagreeing:
            return None
        ann_id, box, (x0, y0, x1, y1) = self.disagreeing[0]
        first = (f"first: id {ann_id}, bbox {[round(v, 1) for v in box]}, polygon bounds as [x, y, width, height] "
                 f"{[round(v, 1) for v in (x0, y0, x1 - x0, y1 - y0)]}")
        if self.xyxy > MAX_INVALID_FRACTION * self.compared:
            raise MaeTransferError(
                f"{jp}: {self.xyxy} of {self.compared} boxes are their polygon's bounds written as [x1, y1, x2, y2] "
                f"({first}); COCO boxes are [x, y, width, height]: convert them")
        return (f"{jp}: {len(self.disagreeing)} of {self.compared} boxes disagree with the bounds of their "
                f"segmentation polygons, kept ({first})")


def read_coco_instances(json_path: str | os.PathLike, image_root: str | os.PathLike) -> dict[str, Any]:
    """The json of `check_coco_instances` (errors raised, invalid annotations removed with a warning)."""
    return check_coco_instances(json_path, image_root).data


def coco_crops_to_imagefolder(json_path: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike,
                              min_size: int = 16, context: float = 0.1, val_fraction: float = 0.0) -> dict[str, int]:
    """Write every non-crowd instance of a COCO json whose box is at least `min_size` px on both sides as a
    crop (box + `context` margin on each side) to `out_dir/<category name>/<image stem>_<ann id>.jpg`.

    val_fraction > 0 splits by photo (crops of one photo never straddle the split): that fraction of the
    photos, evenly spaced in image-id order, goes to `out_dir/val/<category>/`, the rest to
    `out_dir/train/<category>/` — the train/val ImageFolder layout of tools/finetune_cls.py.
    Files are written atomically and existing crops are kept, so an interrupted run can simply be
    repeated. Returns {class name: number of crops} ({"train/<name>" / "val/<name>": ...} when split).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MaeTransferError(f"val_fraction must be in [0, 1), got {val_fraction}")

    json_path, images, out = Path(json_path), Path(images), Path(out_dir)
    data = read_coco_instances(json_path, images)
    try:
        cats = {c["id"]: re.sub(r"[^\w.-]+", "_", str(c["name"])) for c in data["categories"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
    except (KeyError, TypeError) as err:
        raise MaeTransferError(f"{json_path}: not a COCO instances json ({type(err).__name__}: {err})") from None
    anns = data["annotations"]
    by_image: dict[Any, list[dict]] = {}
    for ann in anns:  # all with a valid box and a known category (read_coco_instances)
        x, y, w, h = ann["bbox"]
        if not ann.get("iscrowd", 0) and min(w, h) >= min_size:
            by_image.setdefault(ann["image_id"], []).append(ann)
    counts: dict[str, int] = {}
    ordered = sorted(by_image, key=str)
    n_val = max(1, round(len(ordered) * val_fraction)) if val_fraction > 0 else 0
    if n_val and n_val >= len(ordered):
        raise MaeTransferError(f"{json_path}: {len(ordered)} photo(s) with crops cannot be split with "
                               f"val_fraction={val_fraction}")
    val_ids = {ordered[int((j + 0.5) * len(ordered) / n_val)] for j in range(n_val)}
    for image_id in ordered:
        image_anns = by_image[image_id]
        split = ("val/" if image_id in val_ids else "train/") if n_val else ""
        src = images / files[image_id]
        with Image.open(src) as im:
            im = im.convert("RGB")
            for ann in image_anns:
                x, y, w, h = ann["bbox"]
                mx, my = w * context, h * context
                box = (max(0, round(x - mx)), max(0, round(y - my)),
                       min(im.width, round(x + w + mx)), min(im.height, round(y + h + my)))
                name = split + cats[ann["category_id"]]
                dst = out / name / f"{Path(files[image_id]).stem}_{ann['id']}.jpg"
                if not dst.exists():
                    crop = im.crop(box)
                    atomic_write(dst, lambda tmp, crop=crop: crop.save(tmp, format="JPEG", quality=95))
                counts[name] = counts.get(name, 0) + 1
    if not counts:
        raise MaeTransferError(f"{json_path}: no non-crowd instances of at least {min_size} px to crop")
    logger.info("%d crops of %d classes from %s in %s", sum(counts.values()), len({n.split("/")[-1] for n in counts}),
                json_path, out)
    return counts
