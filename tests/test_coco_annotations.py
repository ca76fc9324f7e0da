"""Invalid COCO annotations: on a copy of the real fruits_nuts json with injected faults, the invalid
annotations are skipped with one counted warning per kind (and really absent from what detectron2 trains
and evaluates on, and from the crops), while a file that is wrong as a whole is a one-line error."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mae_transfer.coco import check_coco_instances, coco_crops_to_imagefolder, read_coco_instances
from mae_transfer.data import check_image_files
from mae_transfer.errors import MaeTransferError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "coco_mask_rcnn_vit_tiny_cpu.py"
WIDTH, HEIGHT = 800, 600  # every fruits_nuts image

# Faults injected into annotations of the first two images (ids 1-12 on image 0, 13-21 on image 1).
NEGATIVE_WIDTH, ZERO_HEIGHT, OUTSIDE, EMPTY_SEGM, TWO_POINT_POLYGON, SHORT_BBOX, NAN_WIDTH = 2, 5, 8, 11, 14, 16, 19
FAULTY = {NEGATIVE_WIDTH, ZERO_HEIGHT, OUTSIDE, EMPTY_SEGM, TWO_POINT_POLYGON, SHORT_BBOX, NAN_WIDTH}
OVERHANG = 4  # overhangs the right border by 0.4 px (rounding): kept, detectron2 clips it


def _expected_warnings(path: Path, compared: int = 165 - len(FAULTY)) -> list[str]:
    """The warnings for the faults: one per kind of skipped annotation, then the moved OVERHANG box, which no longer
    agrees with its polygon (of the `compared` valid annotations with polygons)."""
    return [
        f"{path}: skipped 2 annotations without a valid bbox (expected [x, y, width, height], 4 finite numbers) "
        f"(first: id {SHORT_BBOX})",
        f"{path}: skipped 2 annotations with non-positive box width/height (first: id {NEGATIVE_WIDTH})",
        f"{path}: skipped 1 annotation with a box entirely outside the image (first: id {OUTSIDE})",
        f"{path}: skipped 2 annotations with an empty segmentation ([], no polygon of at least 3 points, or an "
        f"empty RLE) (first: id {EMPTY_SEGM})",
        f"{path}: 1 of {compared} boxes disagree with the bounds of their segmentation polygons, kept (first: id "
        f"{OVERHANG}, bbox [642.4, 413.0, 158.0, 114.0], polygon bounds as [x, y, width, height] "
        "[431.6, 413.9, 158.4, 113.7])",
    ]


@pytest.fixture
def clean(fruits_nuts: Path) -> dict:
    return json.loads((fruits_nuts / "trainval.json").read_text())


def _faulty(clean: dict) -> dict:
    data = copy.deepcopy(clean)
    anns = {a["id"]: a for a in data["annotations"]}
    assert all(anns[i]["image_id"] in (0, 1) for i in FAULTY | {OVERHANG})
    anns[NEGATIVE_WIDTH]["bbox"][2] *= -1
    anns[ZERO_HEIGHT]["bbox"][3] = 0
    anns[OUTSIDE]["bbox"][0] = WIDTH + 10
    anns[EMPTY_SEGM]["segmentation"] = []
    anns[TWO_POINT_POLYGON]["segmentation"] = [anns[TWO_POINT_POLYGON]["segmentation"][0][:4]]
    anns[SHORT_BBOX]["bbox"] = anns[SHORT_BBOX]["bbox"][:3]
    anns[NAN_WIDTH]["bbox"][2] = float("nan")
    anns[OVERHANG]["bbox"][0] = WIDTH - anns[OVERHANG]["bbox"][2] + 0.4
    return data


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings_of():
    """The warning lines of mae_transfer.coco, from a handler on that logger itself (detectron2's
    setup_logger, run earlier in the same session, stops 'mae_transfer' loggers from propagating)."""
    log, handler = logging.getLogger("mae_transfer.coco"), _Collect()
    log.addHandler(handler)
    yield lambda: list(handler.lines)
    log.removeHandler(handler)


def test_faults_are_skipped_with_one_warning_per_kind(fruits_nuts, clean, tmp_path, warnings_of):
    images = fruits_nuts / "images"
    assert read_coco_instances(fruits_nuts / "trainval.json", images) == clean and warnings_of() == []

    bad = _write(tmp_path / "bad.json", _faulty(clean))
    checked = check_coco_instances(bad, images)
    assert warnings_of() == _expected_warnings(bad)
    assert checked.skipped_ids == FAULTY
    kept = [a["id"] for a in checked.data["annotations"]]
    assert kept == [a["id"] for a in clean["annotations"] if a["id"] not in FAULTY] and OVERHANG in kept


@pytest.mark.parametrize("fault, expected", [
    ("unknown category", "annotation 3 has category_id 99, absent from 'categories' (ids: [1, 2, 3])"),
    ("most boxes invalid", "83 of 165 annotations are invalid, 83 of them with non-positive box width/height "
                           "(first: id 1); expected COCO instances"),
    ("duplicate id", "annotation #1 has id 1, which is not unique"),
    ("no id", "annotation #0 has no id"),
    ("image without size", "image 0 has width None, height 600; positive numbers expected"),
])
def test_a_wrong_file_is_one_error(fruits_nuts, clean, tmp_path, fault, expected, warnings_of):
    data = copy.deepcopy(clean)
    anns = data["annotations"]
    if fault == "unknown category":
        anns[2]["category_id"] = 99
    elif fault == "most boxes invalid":  # 83 of 165 is just over half; 82 would be skipped with a warning
        for a in anns[:83]:
            a["bbox"][2] = -1.0
    elif fault == "duplicate id":
        anns[1]["id"] = anns[0]["id"]
    elif fault == "no id":
        del anns[0]["id"]
    else:
        del data["images"][0]["width"]
    bad = _write(tmp_path / "bad.json", data)
    with pytest.raises(MaeTransferError) as err:
        read_coco_instances(bad, fruits_nuts / "images")
    message = str(err.value)
    assert message.startswith(f"{bad}: {expected}") and "\n" not in message, message
    assert warnings_of() == []


def test_just_under_half_invalid_is_skipped(fruits_nuts, clean, tmp_path, warnings_of):
    data = copy.deepcopy(clean)
    for a in data["annotations"][:82]:
        a["bbox"][3] = 0.0
    bad = _write(tmp_path / "bad.json", data)
    assert len(read_coco_instances(bad, fruits_nuts / "images")["annotations"]) == 165 - 82
    assert warnings_of() == [f"{bad}: skipped 82 annotations with non-positive box width/height (first: id 1)"]


def test_rle_checks_on_coco_tiny_crowd_annotations(coco_tiny, tmp_path, warnings_of):
    """The real crowd RLEs pass; an RLE of another size, an all-background one and an empty one are skipped."""
    path = coco_tiny / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and isinstance(crowd[0]["segmentation"]["counts"], list)  # tests/data: one crowd RLE
    assert len(read_coco_instances(path, coco_tiny / "train2017")["annotations"]) == 105 and warnings_of() == []
    copies = [dict(copy.deepcopy(crowd[0]), id=max(a["id"] for a in data["annotations"]) + i) for i in (1, 2)]
    data["annotations"] += copies  # the real RLE twice more (new ids): one per fault below
    crowd += copies
    h, w = crowd[0]["segmentation"]["size"]
    crowd[0]["segmentation"]["size"] = [h + 1, w]
    crowd[1]["segmentation"]["counts"] = [sum(crowd[1]["segmentation"]["counts"])]  # background only
    crowd[2]["segmentation"] = {}
    bad = _write(tmp_path / "rle.json", data)
    checked = check_coco_instances(bad, coco_tiny / "train2017")
    assert checked.skipped_ids == {crowd[0]["id"], crowd[1]["id"], crowd[2]["id"]}
    assert warnings_of() == [
        f"{bad}: skipped 2 annotations with an empty segmentation ([], no polygon of at least 3 points, or an "
        f"empty RLE) (first: id {crowd[1]['id']})",
        f"{bad}: skipped 1 annotation with a malformed segmentation (expected polygons of numbers, or an RLE of "
        f"the image's size) (first: id {crowd[0]['id']})",
    ]


def test_detectron2_gets_the_cleaned_records(fruits_nuts, clean, tmp_path):
    """What DatasetCatalog returns for the registered faulty file equals detectron2's own load_coco_json of
    a json the test writes without the faulty annotations; the evaluator's ground truth is cleaned too."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json
    from pycocotools.coco import COCO

    from mae_transfer.detection.data import register_coco_instances_checked

    images = str(fruits_nuts / "images")
    bad = _write(tmp_path / "bad.json", _faulty(clean))
    reference = copy.deepcopy(_faulty(clean))
    reference["annotations"] = [a for a in reference["annotations"] if a["id"] not in FAULTY]
    reference_json = _write(tmp_path / "reference.json", reference)
    names = ["test_coco_annotations_bad", "test_coco_annotations_clean", "test_coco_annotations_reference"]
    try:
        assert register_coco_instances_checked(names[0], bad, images) == ["date", "fig", "hazelnut"]
        records = DatasetCatalog.get(names[0])
        assert records == load_coco_json(str(reference_json), images, names[2])
        assert sum(len(r["annotations"]) for r in records) == 165 - len(FAULTY)
        meta = MetadataCatalog.get(names[0])
        assert (meta.image_root, meta.evaluator_type) == (images, "coco")
        assert meta.thing_classes == ["date", "fig", "hazelnut"]
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
        # the evaluator's ground truth: a cleaned copy (an empty segmentation crashes pycocotools' COCOeval)
        assert meta.json_file != str(bad)
        assert set(COCO(meta.json_file).anns) == {a["id"] for a in reference["annotations"]}

        # A clean file is registered as it is: detectron2 reads the original.
        original = str(fruits_nuts / "trainval.json")
        register_coco_instances_checked(names[1], original, images)
        assert MetadataCatalog.get(names[1]).json_file == original
        assert DatasetCatalog.get(names[1]) == load_coco_json(original, images, names[2])
    finally:
        for name in names:
            for catalog in (DatasetCatalog, MetadataCatalog):
                if name in catalog.list():
                    catalog.remove(name)


def test_crops_skip_the_same_annotations(fruits_nuts, clean, tmp_path, warnings_of):
    bad = _write(tmp_path / "bad.json", _faulty(clean))
    coco_crops_to_imagefolder(bad, fruits_nuts / "images", tmp_path / "crops", min_size=16)
    assert warnings_of() == _expected_warnings(bad)
    files = {im["id"]: Path(im["file_name"]).stem for im in clean["images"]}
    expected = {f"{files[a['image_id']]}_{a['id']}" for a in clean["annotations"]
                if a["id"] not in FAULTY and min(a["bbox"][2:]) >= 16}
    assert {p.stem for p in (tmp_path / "crops").rglob("*.jpg")} == expected


def _linked_images(fruits_nuts: Path, dst: Path, truncated: set[str]) -> Path:
    """A folder of links to the fruits_nuts photos, except `truncated` ones: copies cut to half their bytes."""
    dst.mkdir()
    for src in sorted((fruits_nuts / "images").iterdir()):
        if src.name in truncated:
            (dst / src.name).write_bytes(src.read_bytes()[:src.stat().st_size // 2])
        else:
            (dst / src.name).symlink_to(src)
    return dst


def test_truncated_images_are_skipped_with_their_annotations(fruits_nuts, clean, tmp_path, warnings_of):
    """A truncated JPEG (a good header, an error only when decoded) is found before training: skipped with its
    annotations in one counted warning, and absent from what detectron2 trains and evaluates on; more than half
    of the images truncated is an error."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from pycocotools.coco import COCO

    from mae_transfer.detection.data import register_coco_instances_checked

    images = _linked_images(fruits_nuts, tmp_path / "images", {"2.jpg"})
    path = fruits_nuts / "trainval.json"
    checked = check_coco_instances(path, images)
    image_2 = next(im["id"] for im in clean["images"] if im["file_name"] == "2.jpg")
    on_2 = {a["id"] for a in clean["annotations"] if a["image_id"] == image_2}
    assert list(checked.skipped_images) == [image_2] and not checked.skipped_ids and len(on_2) > 0
    assert checked.skipped_images[image_2].startswith("OSError: image file is truncated")
    assert warnings_of() == [f"{path}: skipped 1 unreadable image and its {len(on_2)} annotations (first: "
                             f"{images / '2.jpg'}: {checked.skipped_images[image_2]})"]
    assert {a["id"] for a in checked.data["annotations"]} == {a["id"] for a in clean["annotations"]} - on_2
    name = "test_coco_annotations_truncated"
    try:
        register_coco_instances_checked(name, path, images)
        assert "2.jpg" not in {Path(r["file_name"]).name for r in DatasetCatalog.get(name)}
        assert len(DatasetCatalog.get(name)) == len(clean["images"]) - 1
        assert image_2 not in COCO(MetadataCatalog.get(name).json_file).imgs  # the evaluator's ground truth
    finally:
        for catalog in (DatasetCatalog, MetadataCatalog):
            catalog.remove(name)

    most = _linked_images(fruits_nuts, tmp_path / "most", {f"{i}.jpg" for i in range(10)})  # 10 of 18
    with pytest.raises(MaeTransferError, match=rf"{path}: 10 of 18 images cannot be read \(first: {most}/0.jpg: "
                                               "OSError: image file is truncated"):
        check_coco_instances(path, most)


def test_image_checks_are_cached_for_large_sets(fruits_nuts, tmp_path, monkeypatch):
    """Above IMAGE_CHECK_CACHE_MIN images the decode results are cached by file size and modification time: a
    second check decodes nothing, a changed file is decoded again."""
    import mae_transfer.data as data_module

    monkeypatch.setattr(data_module, "IMAGE_CHECK_CACHE_MIN", 2)
    monkeypatch.setenv("MAE_TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    images = _linked_images(fruits_nuts, tmp_path / "images", {"3.jpg"})
    names = sorted(p.name for p in images.iterdir())
    first = data_module.check_image_files(images, names)
    assert first["0.jpg"] == (800, 600) and first["3.jpg"].startswith("OSError")
    decoded = []
    real = data_module.image_file_status
    monkeypatch.setattr(data_module, "image_file_status", lambda p: decoded.append(Path(p).name) or real(p))
    assert data_module.check_image_files(images, names) == first and decoded == []
    (images / "3.jpg").write_bytes((fruits_nuts / "images" / "3.jpg").read_bytes())  # repaired
    assert data_module.check_image_files(images, names)["3.jpg"] == (800, 600) and decoded == ["3.jpg"]


def test_image_size_is_read_as_detectron2_reads_it(tmp_path):
    """EXIF orientation 6 (rotated 90 degrees): detectron2 reads the image transposed, so must the check."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (40, 30)).save(tmp_path / "plain.png")
    assert check_image_files(tmp_path, ["rotated.jpg", "plain.png"]) == {"rotated.jpg": (30, 40), "plain.png": (40, 30)}


def test_json_size_other_than_the_file_is_one_error(fruits_nuts, clean, tmp_path):
    data = copy.deepcopy(clean)
    for im in data["images"][3:5]:
        im["width"] = 640
    bad = _write(tmp_path / "size.json", data)
    name = data["images"][3]["file_name"]
    with pytest.raises(MaeTransferError) as err:
        check_coco_instances(bad, fruits_nuts / "images")
    assert str(err.value) == (f"{bad}: 2 of 18 images have another width x height in the json than in the file "
                              f"(first: {fruits_nuts / 'images' / name}: json 640x600, file 800x600); "
                              "fix 'width'/'height' in the json")


def test_boxes_against_their_polygons(fruits_nuts, clean, tmp_path, warnings_of):
    """Boxes written as [x1, y1, x2, y2] are told from their polygons' bounds: an error when most are; a few boxes
    that disagree with their polygons are counted in a warning and kept."""
    data = copy.deepcopy(clean)
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        a["bbox"] = [x, y, x + w, y + h]
    xyxy = _write(tmp_path / "xyxy.json", data)
    with pytest.raises(MaeTransferError, match=rf"{xyxy}: 165 of 165 boxes are their polygon's bounds written as "
                                               r"\[x1, y1, x2, y2\] \(first: id 1, .*COCO boxes are \[x, y, width, "
                                               r"height\]: convert them"):
        check_coco_instances(xyxy, fruits_nuts / "images")

    data = copy.deepcopy(clean)
    moved = data["annotations"][5:8]
    for a in moved:
        a["bbox"][1] += 40  # 40 px lower than the object
    shifted = _write(tmp_path / "shifted.json", data)
    checked = check_coco_instances(shifted, fruits_nuts / "images")
    assert checked.data["annotations"] == data["annotations"] and not checked.changed
    (line,) = warnings_of()
    assert line.startswith(f"{shifted}: 3 of 165 boxes disagree with the bounds of their segmentation polygons, "
                           f"kept (first: id {moved[0]['id']}, bbox "), line


def _train_det(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "train_det.py"), "--config", str(TINY), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_train_det_warns_and_trains_or_stops_with_one_line(fruits_nuts, clean, tmp_path):
    """The real tool: the faulty file, with its third photo truncated, trains (2 iterations) and evaluates (val:
    its two faulty images and the truncated one), printing the warnings; an unknown category id ends with one
    error line, exit 2, no traceback."""
    third = clean["images"][2]
    images = _linked_images(fruits_nuts, tmp_path / "images", {third["file_name"]})
    bad = _write(tmp_path / "bad.json", _faulty(clean))
    val = _faulty(clean)
    val["images"] = val["images"][:3]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in (0, 1, third["id"])]
    bad_val = _write(tmp_path / "bad_val.json", val)
    out = tmp_path / "run"
    proc = _train_det("--train-json", bad, "--train-images", images, "--val-json", bad_val, "--val-images", images,
                      "train.max_iter=2", "train.eval_period=2", "train.checkpointer.period=100",
                      f"train.output_dir={out}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    on_third = sum(a["image_id"] == third["id"] for a in clean["annotations"])
    expected = _expected_warnings(bad, 165 - len(FAULTY) - on_third) + _expected_warnings(bad_val, 21 - len(FAULTY))
    for path in (bad, bad_val):
        expected.append(f"{path}: skipped 1 unreadable image and its {on_third} annotations (first: "
                        f"{images / third['file_name']}: OSError: image file is truncated")
    for line in expected:
        assert line in output, (line, output[-3000:])
    assert "Evaluation results for segm" in output and (out / "model_final.pth").is_file()

    data = copy.deepcopy(clean)
    data["annotations"][2]["category_id"] = 99
    wrong = _write(tmp_path / "wrong.json", data)
    proc = _train_det("--train-json", wrong, "--train-images", images, "--val-json", fruits_nuts / "trainval.json",
                      "--val-images", images, f"train.output_dir={tmp_path / 'wrong_run'}")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {wrong}: annotation 3 has category_id 99, absent from 'categories' (ids: [1, 2, 3])"]
    assert "Traceback" not in proc.stdout + proc.stderr
