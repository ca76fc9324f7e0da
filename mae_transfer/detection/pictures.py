"""Pictures of detections for tools/train_det.py --infer: the ground truth beside the model's top detections after
class-agnostic NMS, drawn by detectron2's Visualizer at a size where the labels read."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer
from torchvision.ops import nms

from mae_transfer.pictures import side_by_side

PANEL_MIN = 512  # px: the short side of each panel, at least (small images are enlarged so labels read)
PANEL_MAX = 1280  # px: the long side of each panel, at most
LABEL_PT = 16  # label text size in the saved picture (detectron2 Visualizer points)
DISPLAY_NMS_IOU = 0.5


def display_detections(inst: Any, score_thresh: float, top_k: int) -> Any:
    """The detections a picture shows: class-agnostic NMS (one object drawn once, not once per class it might be),
    then the `top_k` highest scores (0: all) of at least `score_thresh`."""
    keep = nms(inst.pred_boxes.tensor.float(), inst.scores.float(), DISPLAY_NMS_IOU)  # sorted by score
    keep = keep[inst.scores[keep] >= score_thresh]
    return inst[keep[:top_k] if top_k > 0 else keep]


def ground_truth_records(cfg: Any) -> dict[str, dict]:
    """Resolved image path -> detectron2 record (with "annotations") of the config's test dataset(s) that have a
    readable COCO json (--val-json, or a builtin one that is present); {} when none has."""
    names = cfg.dataloader.test.dataset.names
    records: dict[str, dict] = {}
    for name in [names] if isinstance(names, str) else list(names):
        json_file = MetadataCatalog.get(name).get("json_file") if name in DatasetCatalog.list() else None
        if not json_file or not Path(json_file).is_file():
            continue
        for record in DatasetCatalog.get(name):
            records.setdefault(str(Path(record["file_name"]).resolve()), record)
    return records


def _panel_scale(h: int, w: int) -> float:
    """Small images are enlarged to PANEL_MIN on the short side, large ones reduced to PANEL_MAX on the long side."""
    return min(max(1.0, PANEL_MIN / min(h, w)), PANEL_MAX / max(h, w))


def _visualizer(rgb: Any, metadata: Any, scale: float) -> Visualizer:
    vis = Visualizer(rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    # detectron2 sizes text from the input image (10 pt for a 192 px one, unreadable once scaled up); set it
    # for the picture as saved: text is drawn at this size times `scale`
    vis._default_font_size = LABEL_PT / scale
    return vis


def _class_color(index: int) -> Any:
    colors = colormap(rgb=True, maximum=1)
    return colors[index % len(colors)]  # the same class has the same colour in both panels


def draw_ground_truth(rgb: Any, record: dict, metadata: Any, scale: float) -> Any:
    """The image with the record's boxes, masks and class names (crowd regions marked), as an RGB array."""
    annos = record.get("annotations", [])
    names = metadata.get("thing_classes", None) or []
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    masks = [a["segmentation"] for a in annos] if annos and all("segmentation" in a for a in annos) else None
    labels = [(names[a["category_id"]] if a["category_id"] < len(names) else str(a["category_id"]))
              + (" (crowd)" if a.get("iscrowd") else "") for a in annos]
    vis = _visualizer(rgb, metadata, scale)
    out = vis.overlay_instances(boxes=boxes or None, masks=masks, labels=labels or None,
                                assigned_colors=[_class_color(a["category_id"]) for a in annos] or None)
    return out.get_image()


def draw_prediction(rgb: Any, inst: Any, metadata: Any, scale: float) -> Any:
    """The image with the shown detections: box, mask, "class score%", as an RGB array."""
    names = metadata.get("thing_classes", None) or []
    classes = inst.pred_classes.tolist()
    scores = inst.scores.tolist()
    labels = [f"{names[c] if c < len(names) else c} {s:.0%}" for c, s in zip(classes, scores, strict=True)]
    masks = inst.pred_masks.numpy() if inst.has("pred_masks") else None
    vis = _visualizer(rgb, metadata, scale)
    out = vis.overlay_instances(boxes=inst.pred_boxes.tensor.numpy() if len(inst) else None,
                                masks=masks if len(inst) else None, labels=labels or None,
                                assigned_colors=[_class_color(c) for c in classes] or None)
    return out.get_image()


def prediction_title(inst: Any, shown: Any, score_thresh: float, top_k: int) -> str:
    """What the prediction panel shows; when no detection reaches the floor, the best score (an empty panel alone
    does not tell a weak model from a broken one)."""
    top = f"top {top_k}" if top_k > 0 else "all"
    title = f"prediction ({top} after class-agnostic NMS, score >= {score_thresh:g}): {len(shown)} of {len(inst)} shown"
    if not len(shown) and len(inst):
        title += f"; best score {float(inst.scores.max()):.2f}"
    return title


def prediction_picture(rgb: Any, inst: Any, metadata: Any, record: dict | None, score_thresh: float,
                       top_k: int) -> Any:
    """Ground truth (when `record` is given) beside the prediction, each panel under its title, enlarged so that
    labels read; `inst` are all the model's detections (the shown ones are chosen here). A PIL image."""
    shown = display_detections(inst, score_thresh, top_k)
    scale = _panel_scale(*rgb.shape[:2])
    pred_title = prediction_title(inst, shown, score_thresh, top_k)
    panels, titles = [], []
    if record is not None:
        n = len(record.get("annotations", []))
        panels.append(draw_ground_truth(rgb, record, metadata, scale))
        titles.append(f"ground truth: {n} object{'s' if n != 1 else ''}")
    else:
        pred_title += " (no ground truth for this image)"
    panels.append(draw_prediction(rgb, shown, metadata, scale))
    titles.append(pred_title)
    return side_by_side(panels, titles)
