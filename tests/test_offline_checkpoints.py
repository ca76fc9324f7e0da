"""URL-valued checkpoints (the ViTDet configs' `detectron2://ImageNetPretrained/MAE/...` defaults) on a machine
without network: one `error:` line naming the URL, the cache file looked for and how to pass a local file; a file
already in iopath's cache is used without network. The network is made unreachable for the tools by an
HTTP(S) proxy on a closed local port (urllib then fails at once, whether or not this host has internet)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harnesses.synthetic import make_shapes_dataset
from mae_transfer.errors import MaeTransferError
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


def _offline_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    return {**env, "FVCORE_CACHE": str(cache), "http_proxy": UNREACHABLE, "https_proxy": UNREACHABLE,
            "HTTP_PROXY": UNREACHABLE, "HTTPS_PROXY": UNREACHABLE, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=2, num_val=2, size=96)


def _data_args(shapes: Path) -> list[str]:
    return ["--train-json", str(shapes / "annotations" / "instances_train.json"), "--train-images",
            str(shapes / "images" / "train"), "--val-json", str(shapes / "annotations" / "instances_val.json"),
            "--val-images", str(shapes / "images" / "val")]


def _train_det(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "train_det.py"), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_unreachable_url_is_one_error_naming_url_cache_and_the_local_option(tmp_path, monkeypatch):
    from mae_transfer.detection.checkpoint import local_checkpoint_path

    for key, value in _offline_env(tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    url = "https://checkpoints.invalid/mae/mae_pretrain_vit_base.pth"
    with pytest.raises(MaeTransferError) as err:
        local_checkpoint_path(url)
    msg = str(err.value)
    assert "\n" not in msg and url in msg and "train.init_checkpoint=PATH" in msg
    assert str(tmp_path / "cache" / "mae" / "mae_pretrain_vit_base.pth") in msg, msg
    assert local_checkpoint_path("relative/file.pth") == "relative/file.pth"  # local paths pass through


@pytest.mark.parametrize("size", ["b", "l", "h"])
def test_vitdet_configs_offline_fail_in_one_line(size, shapes, tmp_path):
    proc = _train_det(["--config", str(CONFIGS / f"coco_mask_rcnn_vit_{size}.py"), *_data_args(shapes),
                       f"train.output_dir={tmp_path / 'out'}"], _offline_env(tmp_path / "cache"))
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    name = {"b": "base", "l": "large", "h": "huge"}[size]
    url = f"detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_{name}"
    cached = tmp_path / "cache" / "detectron2" / "ImageNetPretrained" / "MAE" / f"mae_pretrain_vit_{name}"
    assert url in errors[0] and str(cached) in errors[0] and "train.init_checkpoint=PATH" in errors[0], errors[0]


def test_a_cached_url_is_used_without_network(shapes, tmp_path):
    """The tiny config evaluated from a `detectron2://` URL whose file is already in the cache: no download."""
    from backbones.vit import create_vit

    cache = tmp_path / "cache"
    cached = cache / "detectron2" / "test" / "vit_tiny_depth4.pth"
    cached.parent.mkdir(parents=True)
    torch.save(create_vit("vit_tiny_patch16_224", depth=4, num_classes=0).state_dict(), cached)
    proc = _train_det(["--config", str(CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py"), *_data_args(shapes), "--eval-only",
                       f"train.output_dir={tmp_path / 'out'}", "train.init_checkpoint=detectron2://test/vit_tiny_depth4.pth"],
                      _offline_env(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "init checkpoint converted for detectron2" in log and "timm" in log, log[-3000:]
    assert (tmp_path / "out" / "init_checkpoint_detectron2.pth").is_file()
