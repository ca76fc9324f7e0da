"""The GPU kit (harnesses/gpu_kit.py): the check scripts/gpu_kit.sh runs on the downloaded wheels, and the offline
install scripts/gpu_acceptance.sh --kit runs on the GPU machine. Wheels are made here, in tmp_path."""
from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import pytest

from harnesses import gpu_kit
from mae_transfer.errors import MaeTransferError
from tests.conftest import REPO_ROOT


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), tag: str = "py3-none-any",
               modules: dict[str, str] | None = None) -> Path:
    """A minimal wheel pip installs: METADATA (with Requires-Dist), WHEEL, RECORD and `modules` {name: source}."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    path = folder / f"{stem}-{version}-{tag}.whl"
    meta = "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{info}/METADATA": meta, f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
             f"Tag: {tag}\n", **{f"{m}.py": src for m, src in (modules or {}).items()}}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
    return path


def test_complete_kit_passes_and_each_gap_is_named(tmp_path: Path) -> None:
    image = {"numpy": "2.5.2", "opencv-python-headless": "", "pyyaml": ""}
    kit = tmp_path / "kit"
    make_wheel(kit, "sal-detectron2", "0.7.2", ("numpy<2", "yacs>=0.1.8", 'tomli; python_version < "3.11"',
                                                'pytest; extra == "dev"'))
    make_wheel(kit, "yacs", "0.1.8", ("PyYAML",))
    make_wheel(kit, "mmengine", "0.10.7", ("opencv-python>=3", "numpy"))  # headless: the same cv2 module
    pins = {"sal-detectron2": "0.7.2", "yacs": "0.1.8", "mmengine": "0.10.7"}
    assert gpu_kit.check_kit(kit, pins, image) == []  # numpy<2: the one known exception, for detectron2 only

    make_wheel(kit, "ftfy", "6.3.1", ("wcwidth", "numpy<2"))
    make_wheel(kit, "yacs", "0.1.7")  # a second version of a pinned one
    make_wheel(kit, "shapely", "2.2.0", tag="cp310-cp310-manylinux_2_17_x86_64")
    problems = gpu_kit.check_kit(kit, {**pins, "ftfy": "6.3.1", "shapely": "2.2.0", "pyyaml": "6.0"}, image)
    assert "ftfy-6.3.1-py3-none-any.whl requires wcwidth: neither in the kit nor in the image" in problems
    assert "ftfy-6.3.1-py3-none-any.whl requires numpy<2: the image has numpy 2.5.2" in problems
    assert any(p.startswith("yacs: two wheels") for p in problems)
    assert "yacs-0.1.7-py3-none-any.whl: version 0.1.7, requirements/gpu_kit.txt pins 0.1.8" in problems
    assert "shapely-2.2.0-cp310-cp310-manylinux_2_17_x86_64.whl: not installable by CPython 3.12 on x86_64 Linux " \
           "(its tags)" in problems
    assert "pyyaml: pinned for the kit, but the image has it (requirements/gpu_image.txt)" in problems
    assert "pyyaml==6.0: no wheel in " + str(kit) in problems
    assert len(problems) == 7, problems


@pytest.mark.parametrize("filename,ok", [
    ("sal_detectron2-0.7.2-py3-none-any.whl", True),
    ("mmcv_lite-2.1.0-py2.py3-none-any.whl", True),
    ("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl", True),
    ("wcwidth-0.9.4-cp310-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("shapely-2.2.0-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", True),
    ("sal_detectron2-0.7.2-cp310-none-any.whl", False),  # as published: why gpu_kit.sh re-names it
    ("shapely-2.2.0-cp311-cp311-manylinux_2_17_x86_64.whl", False),
    ("shapely-2.2.0-cp312-cp312-musllinux_1_2_x86_64.whl", False),
    ("shapely-2.2.0-cp312-cp312-manylinux_2_17_aarch64.whl", False),
    ("pycocotools-2.0.11-cp313-abi3-manylinux_2_17_x86_64.whl", False),
])
def test_wheel_tags_for_the_gpu_machines_python(filename: str, ok: bool) -> None:
    assert gpu_kit.wheel_tags_ok(filename) is ok


def test_kit_and_image_cover_the_pinned_stack() -> None:
    """Every package of the project's stack is either on the GPU image or in the kit (ruff and vulture only lint), and
    the kit carries nothing the image has; versions as lock.txt."""
    kit, image = gpu_kit.read_pins(gpu_kit.KIT_PINS), gpu_kit.read_pins(gpu_kit.IMAGE_PACKAGES)
    stack = gpu_kit.read_pins(REPO_ROOT / "requirements" / "stack.txt")
    assert sorted(set(stack) - set(kit) - set(image)) == ["ruff", "vulture"]
    assert not set(kit) & set(image) and "sal-detectron2" in kit
    assert {"torch", "torchvision", "numpy"} <= set(image) and image["torch"] == "2.11.0"
    lock = gpu_kit.read_pins(REPO_ROOT / "requirements" / "lock.txt")
    assert {name: v for name, v in kit.items() if name in lock and lock[name] != v} == {}


def test_install_kit_offline_into_a_folder_then_checks_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    kit = tmp_path / "kit"
    make_wheel(kit, "kit-probe", "1.0", modules={"kit_probe_ok": "VALUE = 42\n",
                                                 "kit_probe_bad": "raise ImportError('needs a GPU')\n"})
    site, log = tmp_path / "site", tmp_path / "out" / "setup.log"
    seconds = gpu_kit.install_kit(kit, site, log, imports=("kit_probe_ok", "mae_transfer"))
    assert (site / "kit_probe_ok.py").is_file() and seconds > 0
    assert os.environ["PYTHONPATH"].split(os.pathsep)[:2] == [str(site), str(REPO_ROOT)]
    assert "[kit] imports ok: kit_probe_ok, mae_transfer" in log.read_text()
    with pytest.raises(MaeTransferError, match=f"an import failed .*kit_probe_bad.*; see {log}"):
        gpu_kit.install_kit(kit, site, log, imports=("kit_probe_bad",))
    assert "ImportError: needs a GPU" in log.read_text()
    with pytest.raises(MaeTransferError, match="no \\*.whl files there"):
        gpu_kit.install_kit(tmp_path / "empty", site, log)


def test_acceptance_run_with_an_empty_kit_or_without_torch_is_one_line(tmp_path: Path) -> None:
    """scripts/gpu_acceptance.sh --kit EMPTY_DIR on a python without torch (as the GPU machine's python is before
    the kit is installed, or a wrong MAE_TRANSFER_PYTHON): one error line naming the folder and what it must hold,
    exit 2, nothing written; without --kit on such a python, one line naming the interpreter (was: a traceback,
    "No module named torch")."""
    import subprocess

    empty, out = tmp_path / "kit", tmp_path / "out"
    empty.mkdir()
    # a python that cannot import torch: this one, with an import hook that refuses it
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('No module named torch')\n"
        "sys.meta_path.insert(0, _NoTorch())\n")
    env = {**os.environ, "MAE_TRANSFER_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO_ROOT)])}
    env.pop("MAE_TRANSFER_KIT", None)
    for args, message in (
            (["--kit", str(empty)], f"error: --kit {empty}: no *.whl files there; expected the wheels of "
                                    "scripts/gpu_kit.sh (make the kit with it, docs/GPU.md)"),
            ([], f"error: {sys.executable} has no torch: run on the GPU machine's image python (docs/GPU.md), or "
                 "name one with torch: MAE_TRANSFER_PYTHON=/path/to/python")):
        done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_acceptance.sh"), *args, "--output-dir",
                               str(out)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [message]
        assert not out.exists()
