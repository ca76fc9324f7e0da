"""Transfer studies (spec -> cells -> runs -> table + plot, resumable) and the supervised baseline of the
pretraining engine (labelled ImageFolder of real COCO object crops, loss falls, backbone export)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones.vit import create_vit
from mae_transfer.checkpoint import BACKBONE_FORMAT
from mae_transfer.config import load_config
from mae_transfer.errors import MaeTransferError
from mae_transfer.metrics import read_eval_metrics
from mae_transfer.pretraining import export_encoder, load_checkpoint, pretrain
from mae_transfer.study.report import plot_caption, results_markdown, write_results
from mae_transfer.study.run import dry_run, read_seg_metrics, run_study
from mae_transfer.study.spec import DONE, Cell, cell_command, command_line, load_study
from mae_transfer.study.tables import collect, differences, paired_difference, summarise
from tests.conftest import REPO_ROOT

SUPERVISED = REPO_ROOT / "configs" / "supervised_pretrain_vit_tiny_cpu.py"
MICRO = ["encoder_overrides={'depth': 2}", "img_size=64", "batch_size=16", "num_workers=0"]


def seg_folder(root: Path) -> Path:
    """A folder in the CamVid layout of the tiny seg config, one 8x8 picture and label map per split: what the
    study's input check looks at (the stub runners below train nothing)."""
    from PIL import Image

    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        Image.new("RGB", (8, 8)).save(root / split / "a.png")
        Image.new("L", (8, 8), 3).save(root / f"{split}annot" / "a.png")
    return root


def spec(tmp_path: Path, **changes) -> dict:
    """A study spec dict with real config files; checkpoints and data are files in tmp_path."""
    (tmp_path / "mae.pth").write_bytes(b"x")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "imgs").mkdir(exist_ok=True)
    seg = tmp_path / "seg" if (tmp_path / "seg").is_dir() else seg_folder(tmp_path / "seg")
    base = dict(
        name="unit", depth=4, freeze_blocks=[0, 2, -1], seeds=[0, 1],
        backbones={"MAE": str(tmp_path / "mae.pth"), "scratch": None},
        tasks={"det": dict(kind="det", config="configs/coco_mask_rcnn_vit_tiny_cpu.py", iters=8,
                           args=[f"--{split}-{what}={tmp_path / name}" for split in ("train", "val")
                                 for what, name in (("json", "a.json"), ("images", "imgs"))],
                           opts=["train.log_period=2"]),
               "seg": dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=20,
                           opts=[*(f"{split}_dataloader.dataset.data_root={seg}" for split in ("train", "val", "test")),
                                 "param_scheduler.0.end={warmup}", "param_scheduler.1.end={iters}"])},
    )
    base.update(changes)
    return base


# ------------------------------------------------------------------------------------------- spec
def test_spec_expands_to_cells_and_tool_commands(tmp_path: Path) -> None:
    study = load_study(spec(tmp_path), tmp_path / "out")
    cells = study.cells()
    assert len(cells) == 2 * 2 * 3 * 2 and len({c.name for c in cells}) == len(cells)
    assert cells[0] == Cell("MAE", "det", 0, 0) and {c.seed for c in cells[:12]} == {0}  # seed-major
    assert [study.blocks_tuned(f) for f in study.freeze_blocks] == [4, 2, 0]

    tool, det = cell_command(study, Cell("MAE", "det", 2, 1), str(tmp_path / "mae.pth"), resume=True)
    assert tool == "train_det" and det[det.index("--freeze-blocks") + 1] == "2"
    line = command_line(study, Cell("MAE", "det", 2, 1), str(tmp_path / "mae.pth"), resume=True)
    assert line[0] == study.python and line[1].endswith("tools/train_det.py") and line[2:] == det
    assert f"train.init_checkpoint={tmp_path / 'mae.pth'}" in det and "train.max_iter=8" in det
    assert "train.seed=1" in det and det[-1] == "--resume" and "train.log_period=2" in det
    assert det[det.index("--output-dir") + 1] == str(study.output_dir / "cells" / "MAE__det__freeze2__seed1")

    tool, seg = cell_command(study, Cell("scratch", "seg", -1, 0), None, resume=False)
    assert command_line(study, Cell("scratch", "seg", -1, 0), None, resume=False)[1].endswith("tools/train_seg.py")
    assert tool == "train_seg" and "--init-checkpoint" not in seg and "--resume" not in seg
    assert seg[seg.index("--config") + 1].endswith("configs/camvid_upernet_vit_tiny_cpu.py")
    assert seg[seg.index("--output-dir") + 1] == str(study.cell_dir(Cell("scratch", "seg", -1, 0)))
    assert seg.count("--cfg-options") == 1  # train_seg takes one list: a second flag would replace the first
    opts = seg[seg.index("--cfg-options") + 1:]
    assert {"train_cfg.max_iters=20", "param_scheduler.0.end=2", "param_scheduler.1.end=20",
            "randomness.seed=0"} <= set(opts)
    assert seg[seg.index("--freeze-blocks") + 1] == "-1"

    with pytest.raises(MaeTransferError, match=r"freeze_blocks \[5\] outside -1..4"):
        load_study(spec(tmp_path, freeze_blocks=[0, 5]))
    with pytest.raises(MaeTransferError, match="unknown key"):
        load_study(spec(tmp_path, freeze=[0]))
    with pytest.raises(MaeTransferError, match="kind must be one of"):
        load_study(spec(tmp_path, tasks={"x": dict(kind="pose", config="configs/coco_mask_rcnn_vit_tiny_cpu.py",
                                                   iters=1)}))
    with pytest.raises(MaeTransferError, match="takes epochs=, not iters="):
        load_study(spec(tmp_path, tasks={"x": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py",
                                                   iters=1)}))
    # classification cells: tools/finetune_cls.py with the backbone as `finetune=`, epochs in place of iterations
    cls_study = load_study(spec(tmp_path, tasks={"cls": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py",
                                                             epochs=3, args=["--data", "crops"])}))
    cell = next(c for c in cls_study.cells() if c.freeze_blocks == 2)
    tool, cmd = cell_command(cls_study, cell, "/ckpt/mae.pth", resume=True)
    assert command_line(cls_study, cell, "/ckpt/mae.pth", resume=True)[1].endswith("tools/finetune_cls.py")
    assert tool == "finetune_cls" and cmd[cmd.index("--data") + 1] == "crops"
    assert {"finetune=/ckpt/mae.pth", "epochs=3", "seed=0"} <= set(cmd) and cmd[-1] == "--resume"
    assert cmd[cmd.index("--freeze-blocks") + 1] == "2"
    assert cmd[cmd.index("--output-dir") + 1] == str(cls_study.cell_dir(cell))
    assert cls_study.metrics_of("cls") == ["top1"]
    # The shipped specs load and expand.
    cpu = load_study(REPO_ROOT / "configs" / "studies" / "cpu_shared_data.py", tmp_path / "cpu")
    assert len(cpu.cells()) == 18 and cpu.depth == 4
    assert len(load_study(REPO_ROOT / "configs" / "studies" / "cpu_cls_crops.py", tmp_path / "cls").cells()) == 9
    pft = load_study(REPO_ROOT / "configs" / "studies" / "imagenet_partial_ft.py", tmp_path / "pft")
    assert [pft.blocks_tuned(f) for f in pft.freeze_blocks] == [24, 18, 12, 6, 4, 2, 1, 0] and len(pft.cells()) == 16
    full = load_study(REPO_ROOT / "configs" / "studies" / "coco_ade20k_full.py", tmp_path / "full")
    assert len(full.cells()) == 36 and [full.blocks_tuned(f) for f in full.freeze_blocks] == [12, 8, 4, 2, 0, 0]


# ------------------------------------------------------------------------------------------- bookkeeping
def test_resume_skips_finished_cells_and_writes_table_and_plot(tmp_path: Path) -> None:
    study = load_study(spec(tmp_path), tmp_path / "out")
    calls: list[tuple[str, bool]] = []
    interrupt_at = [5]  # the 5th cell is interrupted, once

    def fake_metric(cell: Cell) -> float:  # depends on every cell coordinate, so misplaced values show
        return {"MAE": 40.0, "scratch": 10.0}[cell.backbone] + study.blocks_tuned(cell.freeze_blocks) + cell.seed

    def stub(st, cell, checkpoint, resume):
        calls.append((cell.name, resume))
        assert checkpoint == (str(tmp_path / "mae.pth") if cell.backbone == "MAE" else None)
        if len(calls) == interrupt_at[0]:
            interrupt_at[0] = -1
            (st.cell_dir(cell)).mkdir(parents=True, exist_ok=True)
            (st.cell_dir(cell) / "last_checkpoint").write_text("model_0000004.pth")  # died after a checkpoint
            raise KeyboardInterrupt
        value = fake_metric(cell)
        return {"AP_box": value, "AP_mask": value - 1} if cell.task == "det" else {"mIoU": value + 0.5}

    with pytest.raises(KeyboardInterrupt):
        run_study(study, runner=stub)
    assert len(collect(study)) == 4  # the 4 finished cells were kept ...
    with open(study.output_dir / "results.csv") as f:  # ... and written out despite the interruption
        assert len(list(csv.DictReader(f))) == 4
    interrupted = calls[-1][0]

    calls.clear()
    result = run_study(study, runner=stub)
    assert len(result["skipped"]) == 4 and len(result["ran"]) == 20
    assert calls[0] == (interrupted, True)  # resumed with --resume, the rest fresh
    assert all(not resume for _, resume in calls[1:])
    calls.clear()
    assert run_study(study, runner=stub)["ran"] == [] and calls == []  # everything finished: nothing runs

    rows = list(csv.DictReader(open(study.output_dir / "results.csv")))
    assert len(rows) == 24 and {r["blocks_tuned"] for r in rows} == {"4", "2", "0"}
    row = next(r for r in rows if (r["backbone"], r["task"], r["freeze_blocks"], r["seed"]) == ("MAE", "seg", "2", "1"))
    assert float(row["mIoU"]) == 40 + 2 + 1 + 0.5
    md = (study.output_dir / "results.md").read_text()
    assert "| backbone | 4 (all) | 2 | 0 (frozen ViT) |" in md
    # mean over the two seeds (+0 / +1): MAE with 4 blocks tuned -> 44.5 AP^box, 43.5 AP^mask, 45.0 mIoU
    assert ("| MAE | 44.5±0.7 / 43.5±0.7 / 45.0±0.7 | 42.5±0.7 / 41.5±0.7 / 43.0±0.7 "
            "| 40.5±0.7 / 39.5±0.7 / 41.0±0.7 |") in md
    assert "| scratch | 14.5±0.7" in md
    from PIL import Image

    with Image.open(study.output_dir / "plot.png") as img:
        assert img.size[0] > 3 * img.size[1] / 2  # three panels side by side
    assert not list(study.output_dir.glob(".*.tmp"))

    # A failing cell does not stop the others; the failure is reported at the end and nothing is marked done.
    shutil.rmtree(study.cell_dir(Cell("scratch", "seg", 0, 1)))
    shutil.rmtree(study.cell_dir(Cell("scratch", "det", 2, 0)))

    def failing(st, cell, checkpoint, resume):
        if cell.task == "seg":
            raise MaeTransferError("cell boom failed (exit 2)")
        return stub(st, cell, checkpoint, resume)

    with pytest.raises(MaeTransferError, match="1 of 2 cell"):
        run_study(study, runner=failing)
    assert (study.cell_dir(Cell("scratch", "det", 2, 0)) / DONE).is_file()
    assert not (study.cell_dir(Cell("scratch", "seg", 0, 1)) / DONE).is_file()
    assert "| scratch | 14.5±0.7 / 13.5±0.7 / 14.5 |" in results_markdown(study, collect(study))  # one seed left


# configs/studies/cpu_cls_crops.py before its coco_to_imagefolder step (crops folder missing), plus one mistake of
# each other kind: a missing backbone file, unknown override keys of every config kind, missing det / seg data and
# a misspelled tool argument
BAD_SPEC = """
depth = 4
freeze_blocks = [0, -1]
seeds = [0]
_crops = "{tmp}/fruit_crops"
backbones = {{
    "MAE": dict(pretrain=dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=_crops + "/train",
                              opts=["epochs=2", "warmup_epoch=1"])),
    "file": "{tmp}/missing.pth",
    "scratch": None,
}}
tasks = {{
    "cls": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py", epochs=2, args=["--data", _crops],
                opts=["warmup_epoch=1", "smoothing=0.2", "mixupp=0"]),
    "det": dict(kind="det", config="configs/coco_mask_rcnn_vit_tiny_cpu.py", iters=2,
                args=["--train-json", "{tmp}/none.json", "--train-images", "{tmp}", "--val-json", "{tmp}/none.json",
                      "--val-images", "{tmp}/no_images"], opts=["model.roi_heads.box_predictor.test_topk=20"]),
    "seg": dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=2,
                opts=["train_dataloader.dataset.data_root={tmp}/no_camvid", "train_cfg.max_iterz=3"]),
    "typo": dict(kind="det", config="configs/coco_mask_rcnn_vit_tiny_cpu.py", iters=2, args=["--train-jsn", "a.json"]),
}}
"""


def test_every_input_is_checked_before_the_first_cell_runs_or_job_is_submitted(tmp_path: Path) -> None:
    """One report of everything wrong in a spec (a line per problem, exit 2, no traceback), before anything runs:
    through tools/study.py --executor local, the in-process runner and the Slurm executor alike."""
    from mae_transfer.study.cluster import run_study_jobs

    spec_file = tmp_path / "spec.py"
    spec_file.write_text(BAD_SPEC.format(tmp=tmp_path))
    expected = [
        f"backbone 'MAE': pretraining image folder not found: {tmp_path}/fruit_crops/train",
        "backbone 'MAE': pretraining config mae_pretrain_vit_tiny_cpu.py: unknown config key 'warmup_epoch'",
        f"backbone 'file': checkpoint not found: {tmp_path}/missing.pth",
        "task 'cls': config cls_finetune_vit_tiny_cpu.py: unknown config key 'warmup_epoch'",
        "task 'cls': config cls_finetune_vit_tiny_cpu.py: unknown config key 'mixupp'",
        f"task 'cls': data root {tmp_path}/fruit_crops not found: it needs train/<class>/ and val/<class>/ folders",
        "task 'det': config coco_mask_rcnn_vit_tiny_cpu.py: config override "
        "'model.roi_heads.box_predictor.test_topk': no such key",
        f"task 'det': --train-json file not found: {tmp_path}/none.json",
        f"task 'det': --val-json file not found: {tmp_path}/none.json",
        f"task 'det': --val-images folder not found: {tmp_path}/no_images",
        "task 'seg': config camvid_upernet_vit_tiny_cpu.py: --cfg-options: unknown config key 'train_cfg.max_iterz'",
        f"task 'seg': data root not found: {tmp_path}/no_camvid (train_dataloader.dataset.data_root)",
        "task 'typo': tools/train_det.py arguments: unrecognized arguments: --train-jsn",
    ]

    def problems(message: str) -> list[str]:
        lines = message.splitlines()
        assert lines[0].endswith(f"{len(expected)} problem(s) with its inputs, "
                                 f"{'nothing was submitted' if 'submitted' in lines[0] else 'no cell was run'}:")
        assert all(line.startswith("  - ") for line in lines[1:])
        return [line[4:] for line in lines[1:]]

    def assert_reported(found: list[str]) -> None:
        assert len(found) == len(expected), "\n".join(found)
        for want in expected:
            assert any(line.startswith(want) for line in found), f"{want}\nnot in:\n" + "\n".join(found)

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "study.py"), "--spec", str(spec_file),
                           "--output-dir", str(out), "--executor", "local"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = proc.stderr[proc.stderr.index("error: "):]
    assert report.count("error: ") == 1 and "nothing was submitted" in report.splitlines()[0]
    assert_reported(problems(report.removeprefix("error: ")))
    assert not (out / "jobs.json").exists() and not (out / "jobs").exists()  # nothing was submitted

    study = load_study(spec_file, out)
    with pytest.raises(MaeTransferError) as err:
        run_study(study)
    assert "no cell was run" in str(err.value).splitlines()[0]
    assert_reported(problems(str(err.value)))
    assert not (out / "cells").exists() and not (out / "backbones").exists()
    with pytest.raises(MaeTransferError, match="nothing was submitted") as err:
        run_study_jobs(study, "slurm")  # stops before submitit looks for sbatch
    assert_reported(problems(str(err.value)))
    with pytest.raises(MaeTransferError, match="no cell was run") as err:  # --dry-run checks what a run checks
        dry_run(study)
    assert_reported(problems(str(err.value)))


def test_summary_mean_std_n_and_difference_to_reference(tmp_path: Path) -> None:
    """Finished cells with known values: mean ± sample std and n per cell, and backbone - reference paired by
    seed (mean ± std of per-seed differences) or, where the seeds differ, unpaired (sqrt(std_a^2 + std_b^2))."""
    seg = dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=20)
    study = load_study(dict(name="ref", depth=4, freeze_blocks=[0, 2], seeds=[0, 1, 2], reference="scratch",
                            backbones={"MAE": str(tmp_path / "mae.pth"), "scratch": None}, tasks={"seg": seg}),
                       tmp_path / "out")
    values = {("MAE", 0): [50.0, 52.0, 57.0], ("scratch", 0): [40.0, 41.0, 45.0],
              ("MAE", 2): [30.0, 32.0, 34.0], ("scratch", 2): [20.0, 24.0]}  # scratch seed 2 at freeze 2: failed
    for (backbone, freeze), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            cell = study.cell_dir(Cell(backbone, "seg", freeze, seed))
            cell.mkdir(parents=True)
            (cell / DONE).write_text(json.dumps({"metrics": {"mIoU": value}, "seconds": 1.0}))
    rows = collect(study)
    assert len(rows) == 11
    stats = summarise(study, rows)
    mean, std, n = stats[("MAE", "seg", "mIoU", 0)]
    assert (mean, n) == (53.0, 3) and std == pytest.approx(13 ** 0.5)  # deviations -3, -1, 4; n - 1 = 2
    assert stats[("scratch", "seg", "mIoU", 2)] == (22.0, pytest.approx(8 ** 0.5), 2)

    diff = differences(study, rows)
    assert set(diff) == {("MAE", "seg", "mIoU", 0), ("MAE", "seg", "mIoU", 2)}  # the reference has no row
    paired = diff[("MAE", "seg", "mIoU", 0)]  # per-seed differences 10, 11, 12
    assert paired.paired and paired.n == 3 and paired.mean == 11.0 and paired.std == pytest.approx(1.0)
    half = 4.303 / 3 ** 0.5  # t(0.975, 2 degrees of freedom) = 4.303 (printed tables), std 1, n 3
    assert paired.ci95 == pytest.approx((11.0 - half, 11.0 + half), abs=1e-3) and paired.within_noise is False
    unpaired = diff[("MAE", "seg", "mIoU", 2)]  # 32 ± 2 (3 seeds) vs 22 ± sqrt(8) (2 seeds)
    assert not unpaired.paired and unpaired.n == 2 and unpaired.ci95 is None and unpaired.within_noise is None
    assert unpaired.mean == 10.0 and unpaired.std == pytest.approx(12 ** 0.5)

    md = results_markdown(study, rows)
    assert "| backbone | 4 (all) | 2 | n |" in md
    assert "| MAE | 53.0±3.6 | 32.0±2.0 | 3 |" in md and "| scratch | 42.0±2.6 | 22.0±2.8 | 2-3 |" in md
    assert "Fewer than 3 seeds: scratch mIoU at 2 (n=2)." in md
    assert "## Difference to `scratch`" in md
    assert "| MAE − scratch | mIoU | +11.0±1.0 [+8.5, +13.5] (n=3) | +10.0±3.5† (n=2) |" in md
    # an interval around 0 reads "within noise"; two pairs give ± but no interval
    small = paired_difference({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert small.within_noise and small.text().endswith("within noise (n=3)")
    assert paired_difference({0: 2.0, 1: 4.0}, {0: 1.0, 1: 1.0}).text() == "+2.0±1.4 (n=2)"
    assert "per-seed differences" in md and "sqrt(std_a² + std_b²)" in md
    caption = plot_caption(study, rows)
    assert "seg: mIoU after 20 iterations (camvid_upernet_vit_tiny_cpu.py)" in caption
    assert "seeds 0, 1, 2 (n = 2-3 per point)" in caption and "error bars" in caption
    written = write_results(study)
    assert written["md"].read_text() == md and written["plot"].stat().st_size > 0
    # results.csv: one row per finished cell, no summary rows
    assert len(list(csv.DictReader(open(written["csv"])))) == 11

    # Without a reference there is no difference table; an unknown reference is one error naming the key.
    no_ref = load_study(dict(depth=4, freeze_blocks=[0], backbones={"MAE": None, "scratch": None},
                             tasks={"seg": seg}), tmp_path / "out2")
    assert no_ref.reference is None and differences(no_ref, []) == {}
    assert "Difference" not in results_markdown(no_ref, [])
    with pytest.raises(MaeTransferError, match=r"reference 'random' is not one of the backbones \('MAE', 'scratch'\)"):
        load_study(spec(tmp_path, reference="random"))


@pytest.mark.slow
def test_one_real_segmentation_cell_end_to_end(tmp_path: Path, camvid_small: Path) -> None:
    """A real cell through tools/study.py -> tools/train_seg.py (mmseg UperNet) on 2 + 1 CamVid frames."""
    data = camvid_small
    spec_file = tmp_path / "spec.py"
    spec_file.write_text(
        "depth = 4\nfreeze_blocks = [-1]\nseeds = [0]\nbackbones = {'scratch': None}\n"
        "tasks = {'seg': dict(kind='seg', config='configs/camvid_upernet_vit_tiny_cpu.py', iters=2, opts=[\n"
        f"    'train_dataloader.dataset.data_root={data}', 'val_dataloader.dataset.data_root={data}',\n"
        f"    'test_dataloader.dataset.data_root={data}', 'train_dataloader.batch_size=2',\n"
        "    'param_scheduler.0.end=1', 'param_scheduler.1.begin=1', 'param_scheduler.1.end={iters}'])}\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # robust when other jobs share the cores
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "study.py"), "--spec", str(spec_file), "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    cell = out / "cells" / "scratch__seg__freeze-1__seed0"
    assert proc.returncode == 0, proc.stderr[-3000:] + (cell / "run.log").read_text()[-3000:]
    done = json.loads((cell / DONE).read_text())
    assert done["metrics"] == read_seg_metrics(cell) and 0.0 <= done["metrics"]["mIoU"] <= 100.0
    log = (cell / "run.log").read_text()
    assert "freeze_blocks=-1," in log and "max_iters=2," in log  # the config train_seg ran with
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 1 and float(rows[0]["mIoU"]) == done["metrics"]["mIoU"]
    assert (out / "plot.png").stat().st_size > 0 and "| scratch | " in (out / "results.md").read_text()
    assert "ran 1 cell(s), skipped 0 finished" in proc.stdout


@pytest.mark.slow
def test_one_real_detection_cell_end_to_end(tmp_path: Path, fruits_nuts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real cell in-process through run_study -> tools/train_det.py (detectron2 Mask R-CNN + COCOEvaluator)
    on 2 fruits_nuts photos; the metrics come from the tool's eval_metrics.json, the same numbers as detectron2's
    own log (metrics.json)."""
    data = json.loads((fruits_nuts / "trainval.json").read_text())
    images = data["images"][:2]
    ids = {im["id"] for im in images}
    data.update(images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    (tmp_path / "two.json").write_text(json.dumps(data))
    args = ["--train-json", str(tmp_path / "two.json"), "--train-images", str(fruits_nuts / "images"),
            "--val-json", str(tmp_path / "two.json"), "--val-images", str(fruits_nuts / "images")]
    task = dict(kind="det", config="configs/coco_mask_rcnn_vit_tiny_cpu.py", iters=2, args=args,
                opts=["model.roi_heads.box_predictor.test_topk_per_image=20"])
    study = load_study(dict(depth=4, freeze_blocks=[2], seeds=[0], backbones={"scratch": None}, tasks={"det": task}),
                       tmp_path / "out")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the tool; robust when other jobs share the cores
    result = run_study(study)
    assert result["ran"] == ["scratch__det__freeze2__seed0"]
    cell = study.cell_dir(Cell("scratch", "det", 2, 0))
    metrics = json.loads((cell / DONE).read_text())["metrics"]
    assert set(metrics) == {"AP_box", "AP_mask"} and all(0.0 <= v <= 100.0 for v in metrics.values())
    rows = [json.loads(line) for line in (cell / "metrics.json").read_text().splitlines()]
    assert metrics["AP_box"] == [r for r in rows if "bbox/AP" in r][-1]["bbox/AP"]
    record = read_eval_metrics(cell, "det")
    assert record["iteration"] == 2 and record["checkpoint"] == str(cell / "model_final.pth")
    assert (cell / "model_final.pth").is_file() and "freeze_blocks: 2" in (cell / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------- supervised
@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mae_transfer.coco import coco_crops_to_imagefolder
    from tests.conftest import repo_dataset

    root = repo_dataset("fruits_nuts")
    out = tmp_path_factory.mktemp("crops")
    counts = coco_crops_to_imagefolder(root / "trainval.json", root / "images", out, min_size=16)
    assert counts == {"date": 71, "fig": 41, "hazelnut": 53}  # non-crowd instances of >= 16 px per class
    return out


def test_supervised_objective_learns_on_coco_crops_and_exports_backbone(crops: Path, tmp_path: Path,
                                                                        one_thread) -> None:
    cfg = load_config(SUPERVISED, [*MICRO, "epochs=5", "warmup_epochs=1", "lr=1e-3", "save_every=5"])
    cfg.update(data_path=str(crops), output_dir=str(tmp_path / "sup"))
    history = pretrain(cfg)
    losses, accs = [h["loss"] for h in history], [h["acc"] for h in history]
    # 3 classes (71/41/53 crops): always guessing the majority class scores 43%; the classifier learns.
    assert losses[-1] < 0.8 * losses[0], losses
    assert max(accs[-2:]) > 0.6, accs
    ckpt = load_checkpoint(tmp_path / "sup" / "checkpoint_last.pth")
    assert ckpt["classes"] == ["date", "fig", "hazelnut"] and ckpt["config"]["num_classes"] == 3
    assert ckpt["model"]["encoder.head.weight"].shape == (3, 192)
    assert not list((tmp_path / "sup").glob("recon_*.png"))  # no reconstruction pictures for a classifier

    exported = export_encoder(tmp_path / "sup" / "checkpoint_last.pth", tmp_path / "bb.pth")
    backbone = torch.load(exported, weights_only=True)
    assert backbone["format"] == BACKBONE_FORMAT and backbone["objective"] == "supervised"
    assert not any(k.startswith(("head.", "encoder.")) for k in backbone["model"])
    vit = create_vit(backbone["name"], **backbone["arch"])
    vit.load_state_dict(backbone["model"], strict=True)
    for key, value in vit.state_dict().items():
        assert torch.equal(value, ckpt["model"]["encoder." + key]), key
    # The importer used by train_det / train_seg reads it as our backbone format.
    from mae_transfer.checkpoint import load_backbone_state_dict

    state, report = load_backbone_state_dict(tmp_path / "bb.pth", create_vit(backbone["name"], **backbone["arch"]))
    assert torch.equal(state["blocks.1.mlp.fc2.weight"], ckpt["model"]["encoder.blocks.1.mlp.fc2.weight"])


@pytest.mark.parametrize("layout", ["flat", "one_class"])
def test_supervised_needs_two_class_folders(layout: str, crops: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = sorted((crops / "fig").glob("*.jpg"))[:4]
    target = data if layout == "flat" else data / "fig"
    target.mkdir(parents=True)
    for f in src:
        shutil.copy(f, target / f.name)
    cfg = load_config(SUPERVISED, MICRO)
    cfg.update(data_path=str(data), output_dir=str(tmp_path / "out"))
    with pytest.raises(MaeTransferError, match="no classes in .*at least 2 class subfolders"):
        pretrain(cfg)
    with pytest.raises(MaeTransferError, match="num_classes=5 but .* has 3 class folders"):
        pretrain({**cfg, "data_path": str(crops), "num_classes": 5})


def test_done_marker_is_strict_json_with_an_undefined_metric(tmp_path: Path) -> None:
    """A cell whose evaluation is undefined (COCO AP without detections: NaN) writes null in done.json, which parses
    as strict JSON and counts as no value in the table."""
    from mae_transfer.study.run import write_done

    study = load_study(spec(tmp_path), tmp_path / "out")
    cell = next(c for c in study.cells() if c.task == "det")
    study.cell_dir(cell).mkdir(parents=True)
    write_done(study, cell, None, {"AP_box": float("nan"), "AP_mask": 1.5}, 2.0, False)

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    record = json.loads((study.cell_dir(cell) / DONE).read_text(), parse_constant=refuse)
    assert record["metrics"] == {"AP_box": None, "AP_mask": 1.5}
    (row,) = collect(study)
    assert row["AP_box"] is None and row["AP_mask"] == 1.5


def test_backbones_at_several_epochs_share_one_pretraining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three backbones taken from one MAE run (after epochs 1 and 2, and its last, epoch 3): the study pretrains
    once, exports three different encoders, and a second preparation runs nothing."""
    from harnesses.synthetic import make_unlabeled_shapes
    from mae_transfer.study import run as study_run

    pool = make_unlabeled_shapes(tmp_path / "pool", 8, size=64)
    mae = dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=str(pool),
               opts=["epochs=3", "warmup_epochs=1", "batch_size=4", "save_every=10", "recon_images=0"])
    seg = dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=4)
    study = load_study(dict(depth=4, freeze_blocks=[0], backbones={
        "MAE-1": dict(pretrain=mae, epoch=1), "MAE-2": dict(pretrain=mae, epoch=2), "MAE": dict(pretrain=mae),
        "scratch": None}, tasks={"seg": seg}), tmp_path / "out")
    launched = []
    real = study_run.run_logged
    monkeypatch.setattr(study_run, "run_logged", lambda cmd, *a, **k: (launched.append(cmd), real(cmd, *a, **k)))
    checkpoints = {name: study_run.prepare_backbone(study, name) for name in ("MAE-1", "MAE-2", "MAE")}
    pretrainings = [cmd for cmd in launched if "--export-encoder" not in cmd]
    assert len(pretrainings) == 1 and "save_epochs=[1,2]" in pretrainings[0]
    run = tmp_path / "out" / "backbones" / "MAE-1" / "pretrain"
    assert sorted(p.name for p in run.glob("checkpoint_0*.pth")) == [
        "checkpoint_0001.pth", "checkpoint_0002.pth", "checkpoint_0003.pth"]
    weights = [torch.load(checkpoints[n], weights_only=True)["model"]["blocks.0.attn.qkv.weight"]
               for n in ("MAE-1", "MAE-2", "MAE")]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert torch.equal(weights[2], load_checkpoint(run / "checkpoint_last.pth")["model"][
        "encoder.blocks.0.attn.qkv.weight"])
    launched.clear()
    assert [study_run.prepare_backbone(study, n) for n in ("MAE-1", "MAE-2", "MAE")] == list(checkpoints.values())
    assert launched == [] and study_run.plan(study)[0][0].startswith("cell ")

    # an epoch after the run's end, or epoch= without a pretraining, is one error naming the backbone
    with pytest.raises(MaeTransferError, match=r"backbone 'MAE-9': epoch=9 is after the end of its pretraining run"):
        load_study(dict(depth=4, freeze_blocks=[0], backbones={"MAE-9": dict(pretrain=mae, epoch=9)},
                        tasks={"seg": seg}))
    with pytest.raises(MaeTransferError, match=r"backbone 'x': epoch must be a positive integer, given with pretrain"):
        load_study(dict(depth=4, freeze_blocks=[0], backbones={"x": dict(checkpoint="a.pth", epoch=2)},
                        tasks={"seg": seg}))


# ------------------------------------------------------------------------------------------- interrupted pretraining
SHARED_MAE_OPTS = ["epochs=3", "warmup_epochs=1", "batch_size=4", "save_every=10", "recon_images=0"]


def shared_mae_spec(pool: Path, data: Path, **changes) -> dict:
    """Two backbones of one MAE run (after epoch 1, and its end, epoch 3) and one classification task (the stub
    runners below train nothing; `data` is what the task's input check looks at)."""
    mae = dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=str(pool), opts=SHARED_MAE_OPTS)
    base = dict(name="shared", depth=4, freeze_blocks=[-1], seeds=[0],
                backbones={"MAE-1": dict(pretrain=mae, epoch=1), "MAE": dict(pretrain=mae)},
                tasks={"cls": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py", epochs=1,
                                   args=["--data", str(data)])})
    base.update(changes)
    return base


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, Path]]:
    """An uninterrupted shared pretraining run through a study: (spec, exported backbone per name)."""
    from harnesses.synthetic import make_unlabeled_shapes
    from mae_transfer.study.run import prepare_backbone

    root = tmp_path_factory.mktemp("shared_run")
    for split in ("train", "val"):
        (root / "cls" / split / "a").mkdir(parents=True)
    spec_dict = shared_mae_spec(make_unlabeled_shapes(root / "pool", 8, size=64), root / "cls")
    study = load_study(spec_dict, root / "whole")
    return spec_dict, {name: Path(prepare_backbone(study, name)) for name in study.backbones}


def stop_after_epoch_1(whole: Path, out: Path) -> Path:
    """The run folder of a study `out` as a pretraining stopped (SIGTERM) during epoch 2 leaves it: checkpoint_0001
    (kept for epoch=1), checkpoint_last after epoch 1 and a 1-line log.jsonl (the uninterrupted run's own files,
    which resume repeats exactly). Returns the run folder."""
    src, run = whole / "backbones" / "MAE-1" / "pretrain", out / "backbones" / "MAE-1" / "pretrain"
    run.mkdir(parents=True)
    shutil.copyfile(src / "checkpoint_0001.pth", run / "checkpoint_0001.pth")
    shutil.copyfile(src / "checkpoint_0001.pth", run / "checkpoint_last.pth")
    (run / "log.jsonl").write_text((src / "log.jsonl").read_text().splitlines()[0] + "\n")
    return run


def assert_same_backbones(made: dict[str, Path], reference: dict[str, Path]) -> None:
    """Bit-identical exports: every tensor equal, and each from the epoch its backbone asks for."""
    for name, path in reference.items():
        ours, theirs = torch.load(made[name], weights_only=True), torch.load(path, weights_only=True)
        assert ours["epoch"] == theirs["epoch"] == {"MAE-1": 1, "MAE": 3}[name]
        assert ours["model"].keys() == theirs["model"].keys(), name
        assert all(torch.equal(ours["model"][k], v) for k, v in theirs["model"].items()), name


def test_an_interrupted_shared_pretraining_is_continued_to_the_same_backbone(shared_run, tmp_path: Path) -> None:
    """A study stopped during its shared pretraining (epoch 1's checkpoint saved, the run at epoch 1 of 3) and run
    again continues the run with --resume and exports what the uninterrupted study exports, bit for bit; the
    interrupted run's checkpoint_last is never exported as the run's end (the export refuses it: one error line)."""
    from mae_transfer.cli import run_cli
    from mae_transfer.study.spec import backbone_commands

    spec_dict, reference = shared_run
    study = load_study(spec_dict, tmp_path / "out")
    run = stop_after_epoch_1(reference["MAE"].parents[2], study.output_dir)
    # the owner's epoch is saved, the run's end is not: the run is continued before anything is exported
    (pretraining, *exports) = backbone_commands(study, "MAE-1")[1]
    assert "--export-encoder" not in pretraining and "--resume" in pretraining
    assert [c[2:4] for c in exports] == [["--epoch", "1"], ["--export-encoder", str(run / "checkpoint_last.pth")]]

    # the tool refuses to export the unfinished run's last checkpoint, or a checkpoint of another epoch
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("_pretrain_tool", REPO_ROOT / "tools" / "pretrain.py")
    tool = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(tool)
    with pytest.raises(MaeTransferError, match=r"checkpoint_last.pth is from an unfinished run \(1 of 3 epochs\)"):
        export_encoder(run / "checkpoint_last.pth", tmp_path / "early.pth")
    with pytest.raises(MaeTransferError, match=r"holds the weights after epoch 1, not after epoch 3"):
        export_encoder(run / "checkpoint_last.pth", tmp_path / "early.pth", epoch=3)
    assert run_cli(tool.main, ["--export-encoder", str(run / "checkpoint_last.pth"), str(tmp_path / "e.pth")]) == 2
    assert not (tmp_path / "early.pth").exists() and not (tmp_path / "e.pth").exists()

    used = {}

    def stub(st, cell, checkpoint, resume):
        used[cell.backbone] = checkpoint
        return {"top1": 1.0}

    run_study(study, runner=stub)
    made = {name: Path(used[name]) for name in reference}
    assert_same_backbones(made, reference)
    log = (study.output_dir / "backbones" / "MAE-1" / "run.log").read_text()
    assert f"resumed from {run / 'checkpoint_last.pth'} (1 epoch(s) done)" in log
    # all saved and exported: a re-run has nothing to do; only the exports missing: exports alone
    assert backbone_commands(study, "MAE-1")[1] == []
    for path in made.values():
        path.unlink()
    assert all("--export-encoder" in cmd for cmd in backbone_commands(study, "MAE-1")[1])


def _study_tool(monkeypatch: pytest.MonkeyPatch):
    """tools/study.py as a module, run in this process (without its SIGTERM handler and logging set-up)."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("_study_tool", REPO_ROOT / "tools" / "study.py")
    tool = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "setup_long_run_cli", lambda: None)
    return tool


def test_dry_run_checks_the_spec_and_job_options_are_refused_before_anything(tmp_path: Path, capsys,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--dry-run makes a run's checks (a pretraining override of a wrong type: one error line, exit 2, nothing
    planned, nothing written), a problem of a shared pretraining is reported once for its backbones, and bad job
    options (--max-parallel -1, --poll -1, job options without --executor, resources the executor cannot give)
    are refused with one error line before anything is checked, run or submitted."""
    from mae_transfer.cli import run_cli

    tool = _study_tool(monkeypatch)
    (tmp_path / "pool").mkdir()
    for split in ("train", "val"):
        (tmp_path / "cls" / split / "a").mkdir(parents=True)
    spec_dict = shared_mae_spec(tmp_path / "pool", tmp_path / "cls")
    spec_file, out = tmp_path / "spec.py", tmp_path / "out"

    def run(*args: str, bad: str = "save_epochs=abc") -> tuple[int, str, str]:
        mae = {**spec_dict["backbones"]["MAE"]["pretrain"], "opts": [*SHARED_MAE_OPTS, bad]}
        spec_file.write_text(f"_mae = {mae!r}\n" + "".join(
            f"{key} = {value!r}\n" for key, value in spec_dict.items() if key != "backbones")
            + "backbones = {'MAE-1': dict(pretrain=_mae, epoch=1), 'MAE': dict(pretrain=_mae)}\n")
        code = run_cli(tool.main, ["--spec", str(spec_file), "--output-dir", str(out), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, stdout, stderr = run("--dry-run")
    assert code == 2 and stdout == "" and stderr == (
        "error: study shared (no cell was run): backbones 'MAE-1', 'MAE' (one pretraining run): pretraining config "
        "mae_pretrain_vit_tiny_cpu.py: config key 'save_epochs' must be a list of positive integers, got 'abc'\n")
    code, stdout, stderr = run("--dry-run", "--executor", "local", bad="mask_ratio=0.5")
    assert code == 0 and stderr == "" and stdout.splitlines()[0].endswith("; inputs checked")
    assert stdout.splitlines()[-1] == "5 step(s) to run"  # the shared pretraining, its 2 exports, 2 cells
    assert stdout.count("--export-encoder") == 2 and stdout.count("tools/finetune_cls.py") == 2
    assert not out.exists()
    for args, message in (
            (["--executor", "local", "--max-parallel", "-1"],
             "--max-parallel must be a positive number of jobs, got -1"),
            (["--executor", "slurm", "--wait", "--poll", "-1"], "--poll must be a positive number of seconds, got -1"),
            (["--executor", "local", "--poll", "5"], "--poll is the interval of --wait: give --wait too"),
            (["--max-parallel", "2", "--wait"], "--max-parallel, --wait: only with --executor local|slurm"),
            (["--executor", "local", "--dry-run", "--slurm", "nodes=2"],
             "backbone 'MAE-1': the local executor runs on this machine only: nodes=2 needs slurm")):
        code, stdout, stderr = run(*args, bad="mask_ratio=0.5")
        assert code == 2 and stdout == "" and stderr.startswith(f"error: {message}") and stderr.count("\n") == 1
        assert not out.exists()
