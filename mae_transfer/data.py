"""Unlabelled image folders for MAE pretraining.

Any folder works: ImageFolder-style (`root/class/x.jpg`) or flat, searched recursively for
.jpg/.jpeg/.png. Labels are not used. Images are not opened at scan time (slow on large folders);
an image that fails to decode when loaded is skipped with one warning and another image is used in
its place, and a folder where no image can be read is a user error.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from mae_transfer.errors import MaeTransferError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_images(root: str | os.PathLike) -> list[Path]:
    """All .jpg/.jpeg/.png files below `root` (recursive, sorted, hidden files skipped)."""
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


def eval_transform(img_size: int) -> Callable:
    """Deterministic view (resize + centre crop) for reconstruction pictures."""
    return transforms.Compose([
        transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
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
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                if i not in self._bad:
                    self._bad.add(i)
                    logger.warning("skipping unreadable image %s (%s: %s)", self.files[i], type(err).__name__, err)
                continue
            found.append(i)
        if not found:
            raise MaeTransferError(f"no readable images under {self.root}: all {len(self.files)} image files failed to load")
        return found

    def __getitem__(self, index: int) -> Tensor:
        n = len(self.files)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                img = self.load(i)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                # Skip, warn once, and use the next readable image so batches keep their size.
                self._bad.add(i)
                logger.warning("skipping unreadable image %s (%s: %s)", self.files[i], type(err).__name__, err)
                continue
            return self.transform(img) if self.transform is not None else img
        raise MaeTransferError(f"no readable images under {self.root}: all {n} image files failed to load")
