"""Loading is safe by default everywhere: a checkpoint whose unpickling would create a marker file is given to
every entry point that reads checkpoints (ours and the frameworks' own loaders: detectron2's checkpointer,
mmengine's load_from / resume / --eval-only). Each refuses with one `error:` line naming the opt-in, exits 2,
shows no traceback, and the marker never appears. Legitimate framework checkpoints still load (the resume
tests in test_detectron2 / test_mmseg / test_pretrain / test_classification and the Runner test below)."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from harnesses.synthetic import make_shapes_dataset
from mae_transfer.errors import MaeTransferError
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
DET_TINY = str(CONFIGS / "coco_mask_rcnn_vit_tiny_cpu.py")
SEG_TINY = str(CONFIGS / "shapes_upernet_vit_tiny_cpu.py")
CLS_TINY = str(CONFIGS / "cls_finetune_vit_tiny_cpu.py")
PRETRAIN_TINY = str(CONFIGS / "mae_pretrain_vit_tiny_cpu.py")
CLS_MICRO = ["model=vit_tiny_patch16_224", "encoder_overrides.depth=1", "encoder_overrides.embed_dim=32",
             "encoder_overrides.num_heads=2", "img_size=32", "batch_size=2", "epochs=1", "num_workers=0"]


class MarkerBomb:
    """Unpickling this object opens (creates) the marker file: stands for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Crafted files in the layouts each loader expects (so only the bomb stops them), and the marker path."""
    root = tmp_path_factory.mktemp("bombs")
    marker = root / "PWNED"
    weights = {"w": torch.zeros(2)}
    files = {
        "plain": {"model": weights, "x": MarkerBomb(marker)},
        "mmengine": {"state_dict": weights, "meta": {"iter": 1, "x": MarkerBomb(marker)}},
        "detectron2": {"model": weights, "iteration": 1, "x": MarkerBomb(marker)},
        "ours": {"format": "mae_transfer_pretrain", "model": weights, "epoch": 1, "x": MarkerBomb(marker)},
    }
    out = {"marker": marker}
    for name, obj in files.items():
        torch.save(obj, root / f"{name}.pth")
        out[name] = root / f"{name}.pth"
    with open(root / "zoo.pkl", "wb") as f:  # detectron2 model-zoo format: a plain pickle
        pickle.dump({"model": {"w": torch.zeros(2).numpy()}, "__author__": "x", "x": MarkerBomb(marker)}, f)
    out["pkl"] = root / "zoo.pkl"
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, num_train=12, num_val=2, size=96)
    from mae_transfer.coco import coco_crops_to_imagefolder

    coco_crops_to_imagefolder(root / "annotations" / "instances_train.json", root / "images" / "train",
                              root / "crops", min_size=8, val_fraction=0.34)  # every class on both sides
    return root


def _refused(tool: str, argv: list[Any], marker: Path, opt_in: bool = True) -> str:
    """Run tools/<tool>.py as a user would (own process: real exit code and stderr)."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / f"{tool}.py"), *map(str, argv)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert not marker.exists(), f"{argv}: the crafted file ran code"
    assert "pickled Python objects" in lines[0], lines[0]
    if opt_in:
        assert "--allow-pickle" in lines[0], lines[0]
    return lines[0]


def test_convert_refuses(bombs, tmp_path):
    line = _refused("convert_checkpoint", [bombs["plain"], tmp_path / "out.pth", "--to", "detectron2",
                                           "--model", "vit_tiny_patch16_224"], bombs["marker"])
    assert "builtins.open" in line or "io.open" in line  # the refused global is named


def _each_refused(tool: str, argvs: list[list[Any]], marker: Path) -> None:
    """_refused for each argv, two tool processes at a time: each is mostly interpreter and framework start-up."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda argv: _refused(tool, argv, marker), argvs))


def test_train_det_refuses_init_resume_and_eval_only(bombs, shapes, tmp_path):
    data = ["--train-json", shapes / "annotations" / "instances_train.json",
            "--train-images", shapes / "images" / "train",
            "--val-json", shapes / "annotations" / "instances_val.json", "--val-images", shapes / "images" / "val"]
    common = ["--config", DET_TINY, *data, "train.max_iter=1", "train.eval_period=0"]
    # --resume: detectron2's checkpointer follows output_dir/last_checkpoint
    out = tmp_path / "resume"
    out.mkdir()
    (out / "model_0000000.pth").write_bytes(bombs["detectron2"].read_bytes())
    (out / "last_checkpoint").write_text("model_0000000.pth")
    last = shutil.copytree(out, tmp_path / "last")  # its own folder: the runs below go two at a time
    _each_refused("train_det", [
        # training from train.init_checkpoint, in each format detectron2 reads
        *([*common, f"train.output_dir={tmp_path / name}", f"train.init_checkpoint={bombs[name]}"]
          for name in ("detectron2", "plain", "pkl")),
        [*common, f"train.output_dir={out}", "--resume"],
        # --eval-only of a given checkpoint, and of the output folder's last checkpoint
        [*common, f"train.output_dir={tmp_path / 'e'}", "--eval-only", f"train.init_checkpoint={bombs['detectron2']}"],
        [*common, f"train.output_dir={last}", "--eval-only"],
    ], bombs["marker"])


def test_train_seg_refuses_eval_only_resume_load_from_and_init(bombs, shapes, tmp_path):
    common = ["--config", SEG_TINY, "--cfg-options",
              *(f"{split}_dataloader.dataset.data_root={shapes}" for split in ("train", "val", "test")),
              "train_cfg.max_iters=1"]
    # --resume without a value: mmengine finds the work dir's last checkpoint itself
    work = tmp_path / "e"
    work.mkdir()
    (work / "iter_1.pth").write_bytes(bombs["mmengine"].read_bytes())
    (work / "last_checkpoint").write_text(str(work / "iter_1.pth"))
    _each_refused("train_seg", [
        [*common[:2], "--output-dir", tmp_path / "a", "--eval-only", bombs["mmengine"], *common[2:]],
        [*common[:2], "--output-dir", tmp_path / "b", "--resume", bombs["mmengine"], *common[2:]],
        [*common[:2], "--output-dir", tmp_path / "c", *common[2:], f"load_from={bombs['mmengine']}"],
        [*common[:2], "--output-dir", tmp_path / "d", "--init-checkpoint", bombs["plain"], *common[2:]],
        [*common[:2], "--output-dir", work, "--resume", *common[2:]],
    ], bombs["marker"])


def test_finetune_cls_and_pretrain_refuse(bombs, shapes, tmp_path):
    data = ["--config", CLS_TINY, "--data", shapes / "crops", *CLS_MICRO]
    marker = bombs["marker"]
    _refused("finetune_cls", [*data, "--output-dir", tmp_path / "ft", "--finetune", bombs["plain"]], marker)
    _refused("finetune_cls", [*data, "--output-dir", tmp_path / "ev", "--eval-only", bombs["plain"]], marker)
    # our own training checkpoints never hold pickled objects: refused outright (no opt-in needed or offered)
    line = _refused("finetune_cls", [*data, "--output-dir", tmp_path / "rs", "--resume", bombs["ours"]], marker,
                    opt_in=False)
    assert "tools/finetune_cls.py" in line
    line = _refused("pretrain", ["--config", PRETRAIN_TINY, "--data", shapes / "images" / "train",
                                 "--output-dir", tmp_path / "pt", "--resume", bombs["ours"], "epochs=1",
                                 "num_workers=0", "batch_size=2"], marker, opt_in=False)
    assert "tools/pretrain.py" in line


def test_study_refuses_the_backbone_before_any_cell(bombs, shapes, tmp_path):
    spec = tmp_path / "spec.py"
    spec.write_text(f"depth = 2\nfreeze_blocks = [0]\nbackbones = {{'crafted': {str(bombs['plain'])!r}}}\n"
                    f"tasks = {{'cls': dict(kind='cls', config={CLS_TINY!r}, epochs=1, "
                    f"args=['--data', {str(shapes / 'crops')!r}])}}\n")
    line = _refused("study", ["--spec", spec, "--output-dir", tmp_path / "study"], bombs["marker"])
    assert "backbone 'crafted'" in line
    assert not (tmp_path / "study" / "cells").exists()  # no cell ran


def test_study_passes_the_opt_in_to_every_cell(shapes, tmp_path):
    from mae_transfer.study.spec import cell_command, load_study

    spec = dict(depth=2, freeze_blocks=[0], backbones={"random": None},
                tasks={"det": dict(kind="det", config=DET_TINY, iters=1),
                       "seg": dict(kind="seg", config=SEG_TINY, iters=1),
                       "cls": dict(kind="cls", config=CLS_TINY, epochs=1)})
    for allow in (False, True):
        study = load_study(spec, tmp_path, allow_pickle=allow)
        for cell in study.cells():
            assert ("--allow-pickle" in cell_command(study, cell, None, False)[1]) == allow


def test_mmengine_reader_allows_exactly_the_runner_types(tmp_path):
    """A real Runner checkpoint (message hub with HistoryBuffers, numpy values) loads; a crafted one that asks
    `getattr` for anything but HistoryBuffer's statistics is refused."""
    from mmengine.logging import HistoryBuffer, MessageHub

    from mae_transfer.segmentation.checkpoint import read_mmengine_checkpoint

    hub = MessageHub(f"hub_{tmp_path.name}")
    hub.update_scalar("train/loss", 0.5)
    hub.update_info("epoch", 1)
    import numpy as np

    torch.save({"state_dict": {"w": torch.ones(1)}, "message_hub": hub.state_dict(),
                "meta": {"seed": np.int64(3), "lr": np.float32(0.1), "arr": np.arange(3)}}, tmp_path / "ok.pth")
    ckpt = read_mmengine_checkpoint(tmp_path / "ok.pth")
    buf = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, HistoryBuffer) and buf.current() == 0.5 and ckpt["meta"]["seed"] == 3

    class Gadget:
        def __reduce__(self) -> tuple[Any, tuple[Any, str]]:
            return getattr, (HistoryBuffer, "__init__")

    torch.save({"state_dict": {}, "x": Gadget()}, tmp_path / "gadget.pth")
    with pytest.raises(MaeTransferError, match="refusing getattr"):
        read_mmengine_checkpoint(tmp_path / "gadget.pth")
    assert read_mmengine_checkpoint(tmp_path / "gadget.pth", allow_pickle=True)["x"] is HistoryBuffer.__init__


def test_detectron2_checkpointer_reads_pkl_only_with_the_opt_in(bombs, tmp_path):
    import numpy as np

    from mae_transfer.detection.checkpoint import detection_checkpointer

    model = torch.nn.Linear(2, 1, bias=False)
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": {"weight": np.full((1, 2), 3.0, dtype=np.float32)}, "__author__": "test"}, f)
    with pytest.raises(MaeTransferError, match="--allow-pickle"):
        detection_checkpointer(model).load(str(tmp_path / "zoo.pkl"))
    detection_checkpointer(model, allow_pickle=True).load(str(tmp_path / "zoo.pkl"))
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))
    with pytest.raises(MaeTransferError, match="--allow-pickle"):
        detection_checkpointer(model).load(str(bombs["detectron2"]))
    assert not bombs["marker"].exists()
