"""Image folders for pretraining: unlabelled (MAE) and labelled (the supervised baseline).

`ImageFolderDataset`: any folder, ImageFolder-style (`root/class/x.jpg`) or flat, searched recursively
for `IMAGE_SUFFIXES`; labels are not used. `LabelledImageFolder`: class = first-level subfolder (as
torchvision's ImageFolder), images below it searched recursively; at least two classes are needed.
Images are not opened at scan time (slow on large folders); an image that fails to decode when loaded
is skipped with one warning and another image is used in its place (with its own label), and a folder
where no image can be read is a user error.

`read_coco_instances` reads a COCO instances json for every tool that takes one (tools/train_det.py,
tools/demo.py, `coco_crops_to_imagefolder`): a file that is wrong is a one-line error, single invalid
annotations (degenerate or outside boxes, empty masks) and unreadable images are skipped with one warning
per kind, so that all of them train on the same annotations. `coco_crops_to_imagefolder` turns such a json
into a labelled folder of object crops, a small real labelled set for CPU runs of the supervised baseline.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from mae_transfer.errors import MaeTransferError

logger = logging.getLogger(__name__)

# The image files every tool looks for (pretraining folders, detection --infer folders, segmentation data checks):
# the formats PIL, detectron2's read_image and mmcv's imread all decode.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# What PIL raises for a file that is not a readable image (truncated, corrupt, not an image, a decompression bomb):
# such files are skipped, or named in an error, wherever images are read.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files (`IMAGE_SUFFIXES`) below `root` (recursive, sorted, hidden files skipped)."""
    root = Path(root)
    if not root.exists():
        raise MaeTransferError(f"image folder not found: {root}")
    if not root.is_dir():
        raise MaeTransferError(f"image folder is not a directory: {root}")
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise MaeTransferError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


def pretrain_transform(img_size: int, scale: tuple[float, float] = (0.2, 1.0)) -> Callable:
    """The MAE pretraining augmentation: RandomResizedCrop (bicubic) + horizontal flip, ImageNet normalise."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(img_size: int, crop_pct: float = 1.0) -> Callable:
    """Deterministic view: resize the short side to img_size / crop_pct (bicubic), centre crop img_size.
    crop_pct 1.0 for reconstruction pictures; 224/256 (0.875) for classification evaluation, as MAE/DeiT."""
    return transforms.Compose([
        transforms.Resize(int(img_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def unnormalize(imgs: Tensor) -> Tensor:
    """ImageNet-normalised (B, 3, H, W) -> [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1)


class ImageFolderDataset(Dataset):
    """Images below a folder; `__getitem__` returns the transformed image tensor only."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.files = find_images(self.root)
        self.transform = transform
        self._bad: set[int] = set()  # per process (each DataLoader worker warns once per bad file)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as img:
            return img.convert("RGB")

    def readable_indices(self, count: int) -> list[int]:
        """Indices of the first `count` images that decode (raises if none does); a cheap up-front check."""
        found: list[int] = []
        for i in range(len(self.files)):
            if len(found) == count:
                break
            try:
                self.load(i)
            except IMAGE_READ_ERRORS as err:
                if i not in self._bad:
                    self._bad.add(i)
                    logger.warning("skipping unreadable image %s (%s: %s)", self.files[i], type(err).__name__, err)
                continue
            found.append(i)
        if not found:
            raise MaeTransferError(f"no readable images under {self.root}: "
                                   f"all {len(self.files)} image files failed to load")
        return found

    def _read(self, index: int) -> tuple[int, Any]:
        """(index actually used, transformed image): unreadable files are replaced by the next readable one."""
        n = len(self.files)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                img = self.load(i)
            except IMAGE_READ_ERRORS as err:
                # Skip, warn once, and use the next readable image so batches keep their size.
                self._bad.add(i)
                logger.warning("skipping unreadable image %s (%s: %s)", self.files[i], type(err).__name__, err)
                continue
            return i, (self.transform(img) if self.transform is not None else img)
        raise MaeTransferError(f"no readable images under {self.root}: all {n} image files failed to load")

    def __getitem__(self, index: int) -> Tensor:
        return self._read(index)[1]


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") for p in folder.rglob("*"))


def find_classes(root: str | os.PathLike, allow_empty: bool = True) -> list[str]:
    """Sorted names of the first-level subfolders of `root` that hold at least one image (the classes).
    With allow_empty=False a class subfolder without images is an error (a classifier's label space
    must not silently shrink)."""
    root = Path(root)
    find_images(root)  # missing / not a folder / no images at all -> one clear error
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    empty = [d for d in folders if not _has_images(d)]
    if empty and not allow_empty:
        raise MaeTransferError(f"class folder {empty[0]} has no images ({'/'.join(IMAGE_SUFFIXES)}); "
                               "remove it or add images")
    classes = [d.name for d in folders if d not in empty]
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise MaeTransferError(
            f"no classes in {root}: supervised pretraining needs an ImageFolder with at least 2 class subfolders "
            f"(root/<class>/<image>), found {found}"
        )
    return classes


class LabelledImageFolder(ImageFolderDataset):
    """ImageFolder with labels: class index = position of the first-level subfolder in sorted order.
    `__getitem__` returns (image tensor, class index); images directly in `root` are ignored.

    strict=True (classification fine-tuning and evaluation): an empty class folder or an image that does
    not decode is an error naming the file, instead of being skipped (a skipped image would change the
    evaluation set silently).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, strict: bool = False) -> None:
        self.root = Path(root)
        self.strict = strict
        self.classes = find_classes(self.root, allow_empty=not strict)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.files, self.targets = [], []
        for c in self.classes:
            for f in find_images(self.root / c):
                self.files.append(f)
                self.targets.append(self.class_to_idx[c])
        self.transform = transform
        self._bad = set()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:  # type: ignore[override]
        if self.strict:
            try:
                img = self.load(index)
            except IMAGE_READ_ERRORS as err:
                raise MaeTransferError(f"cannot read image {self.files[index]} ({type(err).__name__}: {err}); "
                                       "fix or remove it") from None
            return (self.transform(img) if self.transform is not None else img), self.targets[index]
        i, img = self._read(index)
        return img, self.targets[i]


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
# A file where more than this fraction of the annotations is invalid is wrong as a whole (another box
# format, another image set): an error, rather than training on what is left. Segmentation training data
# (mae_transfer.segmentation) applies it to unreadable images.
MAX_INVALID_FRACTION = 0.5


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


# ---------------------------------------------------------------------------------------------- image files
# Checking every image of a large set (COCO train: 118k) by decoding takes minutes; below this many images it
# takes seconds and no cache is written.
IMAGE_CHECK_CACHE_MIN = 500
_EXIF_ORIENTATION = 0x0112


def image_file_status(path: str | os.PathLike) -> tuple[int, int] | str:
    """(width, height) of an image file as detectron2's `read_image` sees it (EXIF rotation applied), or why it
    cannot be read. The size comes from the header; the whole file is decoded too (JPEGs at 1/8 scale, which
    still reads every byte), because a truncated file has a good header and fails only when decoded."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 degrees when read
                width, height = height, width
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except IMAGE_READ_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return width, height


def cache_dir(kind: str) -> Path:
    """Where facts read from data files are cached: $MAE_TRANSFER_CACHE_DIR, else $XDG_CACHE_HOME/mae_transfer,
    else ~/.cache/mae_transfer; one folder per `kind`."""
    base = os.environ.get("MAE_TRANSFER_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mae_transfer"
    return Path(base) / kind


class FileFacts:
    """Facts read from data files, kept in a json cache per `key` (e.g. a data folder), keyed by path, size and
    modification time: a dataset's files are read once (COCO's 118k images, ADE20K's 20k pairs take minutes),
    later runs only read files that changed."""

    def __init__(self, kind: str, key: str) -> None:
        self.path = cache_dir(kind) / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
        self.files: dict[str, Any] = {}
        self.read = 0
        try:
            files = json.loads(self.path.read_text()).get("files")
            self.files = files if isinstance(files, dict) else {}
        except (OSError, ValueError, AttributeError):  # no cache yet, or a damaged one: read the files again
            pass

    def get(self, path: str | os.PathLike, read: Any) -> Any:
        """`read(path)` (a json value), or what it gave before for the same file size and modification time."""
        path = str(path)
        stat = os.stat(path)
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self.files.get(path)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
            return entry[2]
        facts = read(path)
        self.files[path] = [*stamp, facts]
        self.read += 1
        return facts

    def save(self) -> None:
        if not self.read:
            return
        from mae_transfer.io import atomic_write_text

        try:
            atomic_write_text(json.dumps({"files": self.files}), self.path)
        except OSError as err:  # a read-only home: the check still ran, the next run reads the files again
            logger.warning("cannot write the data check cache %s (%s)", self.path, err)


def check_image_files(root: str | os.PathLike, names: list[str]) -> dict[str, tuple[int, int] | str]:
    """`image_file_status` of `root/name` for each name. For large sets the results are cached per file (by
    size and modification time, `FileFacts`) under `cache_dir("image_checks")`."""
    root = Path(root)
    names = list(dict.fromkeys(names))
    if len(names) < IMAGE_CHECK_CACHE_MIN:
        return {name: image_file_status(root / name) for name in names}
    facts = FileFacts("image_checks", str(root.resolve()))
    try:
        found = {name: facts.get(root / name, image_file_status) for name in names}
    finally:
        facts.save()
    return {name: tuple(v) if isinstance(v, list) else v for name, v in found.items()}


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
    try:
        data = json.loads(jp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MaeTransferError(f"{jp}: malformed json ({err})") from None
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
    from mae_transfer.io import atomic_write

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
