"""Image folders for pretraining: unlabelled (MAE) and labelled (the supervised baseline).

`ImageFolderDataset`: any folder, ImageFolder-style (`root/class/x.jpg`) or flat, searched recursively
for `IMAGE_SUFFIXES`; labels are not used. `LabelledImageFolder`: class = first-level subfolder (as
torchvision's ImageFolder), images below it searched recursively; at least two classes are needed.
Images are not opened at scan time (slow on large folders); an image that fails to decode when loaded
is skipped with one warning and another image is used in its place (with its own label), and a folder
where no image can be read is a user error.

The checks of image files every tool shares (`image_file_status`, `check_image_files`, cached by
`FileFacts`) are here; the COCO json checks that use them are in `mae_transfer.coco`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text

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


# A file where more than this fraction of the annotations is invalid is wrong as a whole (another box
# format, another image set): an error, rather than training on what is left. Segmentation training data
# (mae_transfer.segmentation.train) applies it to unreadable images.
MAX_INVALID_FRACTION = 0.5


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
