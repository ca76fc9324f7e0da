"""The in-repository test data (tests/data): licences in order, the cut reproducible from ../shared/data; and the
strict-skip check CI's fresh-clone run relies on (MAE_TRANSFER_STRICT_SKIPS)."""
from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, TEST_DATA, shared_dataset

NON_COMMERCIAL = {1, 2, 3}  # COCO's `licenses` ids of the NonCommercial Flickr licences


def test_coco_subset_is_redistributable_and_keeps_attribution(coco_tiny: Path) -> None:
    data = json.loads((coco_tiny / "annotations" / "instances_train2017.json").read_text())
    assert [lic["id"] for lic in data["licenses"]] == list(range(1, 9)) and len(data["categories"]) == 80
    assert data["images"] and not {im["license"] for im in data["images"]} & NON_COMMERCIAL
    for im in data["images"]:
        assert im["flickr_url"].startswith("http") and im["coco_url"].endswith(im["file_name"]), im
    photos = sorted(p.name for p in (coco_tiny / "train2017").iterdir())
    assert photos == sorted(im["file_name"] for im in data["images"])
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"], dict) and "counts" in a["segmentation"] for a in crowd)


def test_every_folder_says_where_it_came_from_and_fits_the_budget() -> None:
    folders = sorted(p for p in TEST_DATA.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["ade20k_sample", "camvid_layout", "coco_tiny", "fruits_nuts"]
    for folder in folders:
        assert "From: github" in (folder / "README.md").read_text() or folder.name == "camvid_layout", folder
        assert (folder / "LICENSE.upstream").is_file() or folder.name == "camvid_layout", folder
    assert "not CamVid photos" in (TEST_DATA / "camvid_layout" / "README.md").read_text()
    notice = (REPO_ROOT / "NOTICE").read_text()
    assert all(f"tests/data/{p.name}/" in notice for p in folders)
    assert sum(f.stat().st_size for f in TEST_DATA.rglob("*") if f.is_file()) <= 10 * 2**20


def test_camvid_layout_labels(camvid_mini: Path) -> None:
    for split in ("train", "val"):
        names = sorted(p.name for p in (camvid_mini / split).iterdir())
        assert names and names == sorted(p.name for p in (camvid_mini / f"{split}annot").iterdir())
        for name in names:
            label = np.asarray(Image.open(camvid_mini / f"{split}annot" / name))
            assert Image.open(camvid_mini / split / name).size == (480, 360) and label.shape == (360, 480)
            values = set(np.unique(label).tolist())
            assert values <= set(range(12)) and 11 in values and len(values - {11}) >= 8, (name, values)


@pytest.mark.large_data
def test_make_test_data_reproduces_tests_data(tmp_path: Path) -> None:
    """tools/make_test_data.py on ../shared/data writes exactly the committed tests/data (photos byte-identical)."""
    shared = shared_dataset("coco_tiny").parent
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_test_data.py"), "--shared", str(shared),
                           "--output-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    made = sorted(str(p.relative_to(tmp_path / "data")) for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert made == sorted(str(p.relative_to(TEST_DATA)) for p in TEST_DATA.rglob("*") if p.is_file())
    assert all(filecmp.cmp(tmp_path / "data" / f, TEST_DATA / f, shallow=False) for f in made)
    for photo in (TEST_DATA / "coco_tiny" / "train2017").iterdir():
        assert filecmp.cmp(photo, shared / "coco_tiny" / "train2017" / photo.name, shallow=False)


def test_make_test_data_bad_input_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_test_data.py"), "--shared",
                           str(tmp_path / "nope"), "--output-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} not found: expected the shared data folder (the shared data set, "
        "../shared/data/README.md)"]
    assert not (tmp_path / "data").exists()


STRICT_CASES = '''
import pytest

def test_runs():
    pass

@pytest.mark.cuda
def test_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.large_data
def test_large():
    pytest.skip("large test data not found")
'''


def _run_strict(folder: Path, strict: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MAE_TRANSFER_STRICT_SKIPS"}
    env.update(PYTHONPATH=str(REPO_ROOT), **({"MAE_TRANSFER_STRICT_SKIPS": "1"} if strict else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, timeout=180, cwd=folder, env=env)


def test_strict_skips_fail_the_run_on_a_skip_not_marked_cuda_or_large_data(tmp_path: Path) -> None:
    # the hooks tests/conftest.py registers, in a folder of its own (no setup.cfg: the markers are unregistered there)
    (tmp_path / "conftest.py").write_text("from tests.strict_skips import (pytest_collectreport, "
                                          "pytest_runtest_makereport, pytest_sessionfinish, pytest_terminal_summary)\n")
    (tmp_path / "test_cases.py").write_text(STRICT_CASES)
    proc = _run_strict(tmp_path, strict=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "[strict skips] 2 skipped: 2 marked cuda or large_data, 0 not" in proc.stdout.splitlines()

    (tmp_path / "test_cases.py").write_text(STRICT_CASES + "\ndef test_data():\n    pytest.skip('data not found')\n")
    proc = _run_strict(tmp_path, strict=True)
    assert proc.returncode == 1, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    assert "[strict skips] 3 skipped: 2 marked cuda or large_data, 1 not" in lines
    assert "[strict skips] not allowed to skip: test_cases.py::test_data: Skipped: data not found" in lines
    assert "1 passed, 3 skipped" in proc.stdout

    proc = _run_strict(tmp_path, strict=False)  # the README command: skips reported, not failed
    assert proc.returncode == 0 and "[strict skips]" not in proc.stdout, proc.stdout[-3000:]
