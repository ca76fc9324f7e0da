"""Register a user's COCO instances json in detectron2 after `mae_transfer.coco.check_coco_instances`.

detectron2 reads a registered json itself (the training records through `load_coco_json`, the
COCOEvaluator's ground truth through pycocotools), so annotations and images our check skips would still be
trained and evaluated on, and some (an empty segmentation, a truncated image) crash. When the check skips any,
detectron2 is given a cleaned copy of the json instead, kept for the life of the process.
detectron2 is imported only when registering.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from mae_transfer.coco import CocoInstances, check_coco_instances
from mae_transfer.errors import MaeTransferError

logger = logging.getLogger(__name__)

_clean_dir: Path | None = None


def _cleaned_copy_path(json_file: str, name: str) -> Path:
    global _clean_dir
    if _clean_dir is None:
        _clean_dir = Path(tempfile.mkdtemp(prefix="mae_transfer_coco_"))
        atexit.register(shutil.rmtree, _clean_dir, True)
    return _clean_dir / f"{name}_{Path(json_file).name}"


def require_annotations(checked: CocoInstances, json_path: str | os.PathLike, use: str) -> None:
    """A training set needs non-crowd annotations (detectron2 trains only on images that have one, and stops with
    an assertion when none has); an evaluation set needs annotations to compare with."""
    anns, skipped = checked.data["annotations"], len(checked.skipped_ids) + len(checked.skipped_images)
    after = f" after skipping {skipped} invalid annotation(s) / unreadable image(s)" if skipped else ""
    if use == "train" and not any(not a.get("iscrowd", 0) for a in anns):
        found = f"only {len(anns)} crowd annotation(s) (iscrowd=1)" if anns else "no annotations"
        raise MaeTransferError(f"{json_path}: {found}{after} in {len(checked.data['images'])} images: nothing to "
                               "train on (detectron2 trains on images with non-crowd annotations)")
    if use == "eval" and not anns:
        raise MaeTransferError(f"{json_path}: no annotations{after} in {len(checked.data['images'])} images: "
                               "nothing to evaluate against (--infer draws predictions without ground truth)")


def register_coco_instances_checked(name: str, json_path: str | os.PathLike, image_root: str | os.PathLike,
                                    use: str | None = None) -> list[str]:
    """Check the json (errors raised, invalid annotations and unreadable images warned about), then
    `register_coco_instances` it under `name`, or a copy without what was skipped. `use` "train" / "eval": the
    annotations it needs for that (`require_annotations`). Registering a name again replaces it (the file may have
    changed). Returns the class names in category-id order (detectron2's contiguous ids).
    """
    checked = check_coco_instances(json_path, image_root)
    if use:
        require_annotations(checked, json_path, use)
    json_file = str(json_path)
    if checked.changed:
        clean = _cleaned_copy_path(json_file, name)
        clean.write_text(json.dumps(checked.data))
        logger.info("%s: training and evaluating %s on %s, a copy without the %d skipped annotations and %d "
                    "skipped images", json_file, name, clean, len(checked.skipped_ids), len(checked.skipped_images))
        json_file = str(clean)
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    register_coco_instances(name, {}, json_file, str(image_root))
    categories = sorted(checked.data["categories"], key=lambda c: c["id"])
    # the raw names, as load_coco_json sets them again when the dataset is loaded; set now for --infer,
    # which draws with the metadata without loading the dataset
    MetadataCatalog.get(name).set(thing_classes=[c["name"] for c in categories])
    return [str(c["name"]) for c in categories]
