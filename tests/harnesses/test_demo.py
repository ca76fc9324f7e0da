"""The demo job's own logic (tools/demo.py): data layouts and up-front input checks, settings of an output
folder, and its resumability: DONE markers, Ctrl-C / kill of a running step, re-run. The steps themselves
are the real tools, tested in their own files; here a tiny stand-in tool takes their place."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harnesses import demo
from harnesses.synthetic import make_shapes_dataset
from mae_transfer.cli import run_cli
from mae_transfer.errors import MaeTransferError
from tests.conftest import REPO_ROOT, default_sigint

DEMO_PATH = REPO_ROOT / "tools" / "demo.py"


@pytest.fixture(scope="module")
def demo_tool():
    spec = importlib.util.spec_from_file_location("demo_tool", DEMO_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- data layouts
def test_seg_data_finds_ade20k_and_its_options_fit_the_config(ade20k_sample: Path, tmp_path: Path,
                                                              capsys) -> None:
    """The real ADE20K sample (validation only): found from the root and from ADEChallengeData2016, trained on
    validation with a warning; a copy with a training split trains on it. The options are keys of the config
    train_seg.py accepts, and its own data check (label values vs 150 classes) passes on them."""
    from mmengine.config import Config

    inner = ade20k_sample / "ADEChallengeData2016"
    for root in (ade20k_sample, inner):
        seg = demo.find_seg_data(root)
        assert (seg.layout, seg.root, seg.train_split) == ("ade20k", inner.resolve(), "validation")
        assert "no training split" in capsys.readouterr().out
    assert seg.config.name == "ade20k_upernet_vit_tiny_cpu.py"
    assert "train_dataloader.dataset.data_prefix.img_path=images/validation" in seg.cfg_options()

    full = tmp_path / "ade" / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        shutil.copytree(inner / kind / "validation", full / kind / "validation")
        shutil.copytree(inner / kind / "validation", full / kind / "training")
    seg = demo.find_seg_data(tmp_path / "ade")
    assert (seg.root, seg.train_split) == (full, "training") and "warning" not in capsys.readouterr().out

    from mae_transfer.segmentation import checks as seg_checks

    cfg = Config.fromfile(str(seg.config))
    seg_checks.apply_cfg_options(cfg, seg.cfg_options(), str(seg.config))  # unknown keys would raise
    assert cfg.train_dataloader.dataset.data_prefix.img_path == "images/training"
    assert cfg.val_dataloader.dataset.data_prefix.img_path == "images/validation"
    assert cfg.test_dataloader.dataset.data_root == str(full)
    seg_checks.check_data(cfg, ["train_dataloader", "val_dataloader", "test_dataloader"])


def test_seg_data_builtin_layout_and_unknown_layout(tmp_path: Path) -> None:
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=1, size=48)
    seg = demo.find_seg_data(shapes)
    assert (seg.layout, seg.root, seg.config.name) == ("builtin", shapes.resolve(), "shapes_upernet_vit_tiny_cpu.py")
    roots = [f"{split}_dataloader.dataset.data_root={shapes.resolve()}" for split in ("train", "val", "test")]
    assert seg.cfg_options() == roots

    (tmp_path / "other" / "train").mkdir(parents=True)
    with pytest.raises(MaeTransferError) as err:
        demo.find_seg_data(tmp_path / "other")
    msg = str(err.value)
    assert str(tmp_path / "other") in msg and "ADEChallengeData2016" in msg and "labels/{train,val}" in msg
    assert "\n" not in msg

    for f in (shapes / "labels" / "val").iterdir():
        f.unlink()
    with pytest.raises(MaeTransferError, match="no label maps"):
        demo.find_seg_data(shapes)


# ------------------------------------------------------------------------------------------- up-front checks
def _bad_coco(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    js = tmp_path / "bad.json"
    js.write_text(json.dumps(dict(images=[dict(id=1, file_name="missing.jpg", width=8, height=8)], annotations=[],
                                  categories=[dict(id=1, name="a")])))
    return js


@pytest.mark.parametrize("case", ["seg_layout", "seg_missing", "images_empty", "det_image_missing", "det_val_only",
                                  "det_data_layout", "det_both"])
def test_bad_input_is_one_error_line_before_anything_runs(demo_tool, tmp_path: Path, capsys, case: str) -> None:
    (tmp_path / "empty").mkdir()
    args = {
        "seg_layout": ["--seg-data", str(tmp_path / "empty")],
        "seg_missing": ["--seg-root", str(tmp_path / "nope")],  # the old name still works
        "images_empty": ["--images", str(tmp_path / "empty")],
        "det_image_missing": ["--det-train-json", str(_bad_coco(tmp_path)),
                              "--det-train-images", str(tmp_path / "imgs")] if case == "det_image_missing" else [],
        "det_val_only": ["--det-val-json", "a.json", "--det-val-images", "imgs"],
        "det_data_layout": ["--det-data", str(tmp_path / "empty")],
        "det_both": ["--det-data", str(tmp_path), "--det-train-json", "a.json", "--det-train-images", "imgs"],
    }[case]
    expect = {"seg_layout": "not a known layout", "seg_missing": "folder not found",
              "images_empty": "--images: no images",
              "det_image_missing": "image file not found: ", "det_val_only": "needs --det-train-json",
              "det_data_layout": "not the COCO layout", "det_both": "not both"}[case]
    out = tmp_path / "out"
    assert run_cli(demo_tool.main, ["--output-dir", str(out), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists()  # nothing was run or written


def test_output_is_no_spelling_of_output_dir(demo_tool, tmp_path: Path, capsys) -> None:
    assert demo_tool.build_parser().parse_args(["--output-dir", str(tmp_path)]).output_dir == tmp_path
    with pytest.raises(SystemExit):
        demo_tool.build_parser().parse_args(["--output", str(tmp_path)])
    assert "unrecognized arguments: --output" in capsys.readouterr().err


def test_det_data_coco_root_with_one_split(coco_tiny: Path, capsys) -> None:
    det = demo.find_det_data(demo.DataSources(det_data=str(coco_tiny)))
    assert det.train_json == det.val_json == (coco_tiny / "annotations" / "instances_train2017.json").resolve()
    assert "only train2017" in capsys.readouterr().out
    pictures = demo.check_det_data(det)
    assert len(pictures) == demo.NUM_PICTURES and all(p.is_file() for p in pictures)


def test_output_folder_keeps_its_settings(tmp_path: Path) -> None:
    settings = dict(images="built-in", det_iters=200, seg_data="built-in")
    demo.check_settings(tmp_path, settings)
    demo.check_settings(tmp_path, dict(settings))  # same settings: continue
    with pytest.raises(MaeTransferError, match=r"det_iters: 200 -> 40.*another --output"):
        demo.check_settings(tmp_path, dict(settings, det_iters=40))


def test_det_metrics_from_eval_metrics_json(tmp_path: Path) -> None:
    from mae_transfer.metrics import write_eval_metrics
    from mae_transfer.study.run import last_det_evaluation, read_det_metrics

    assert last_det_evaluation(tmp_path) == {}  # no evaluation yet
    with pytest.raises(MaeTransferError, match="did not finish an evaluation"):
        read_det_metrics(tmp_path)
    write_eval_metrics(tmp_path, "det", {"AP_box": 7.0, "AP_mask": 3.0}, tool="tools/train_det.py", iteration=9,
                       details={"bbox": {"AP": 7.0, "AP50": 20.0}, "segm": {"AP": 3.0}})
    assert last_det_evaluation(tmp_path) == {"bbox/AP": 7.0, "bbox/AP50": 20.0, "segm/AP": 3.0}  # what the demo prints
    assert read_det_metrics(tmp_path) == {"AP_box": 7.0, "AP_mask": 3.0}  # what a study cell records


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_undefined_metrics_are_null_with_a_reason_and_readers_cope(tmp_path: Path) -> None:
    """eval_metrics.json is strict JSON: an undefined metric (NaN) is null with its reason, NaNs in details are
    null; the readers (study cells, the demo's table) show such a metric as missing."""
    import numpy as np

    from mae_transfer.metrics import read_eval_metrics, write_eval_metrics
    from mae_transfer.study.run import read_det_metrics

    write_eval_metrics(tmp_path, "det", {"AP_box": float("nan"), "AP_mask": np.float64(2.5)}, tool="t",
                       reasons={"AP_box": "no detections"},
                       details={"bbox": {"AP": np.float64("nan"), "APs": float("inf")}, "n": np.int64(3)})
    record = _strict((tmp_path / "eval_metrics.json").read_text())
    assert record["metrics"] == {"AP_box": None, "AP_mask": 2.5} and record["undefined"] == {"AP_box": "no detections"}
    assert record["details"] == {"bbox": {"AP": None, "APs": None}, "n": 3}
    write_eval_metrics(tmp_path / "seg", "seg", {"mIoU": float("nan")}, tool="t")  # no reason given: the value
    assert _strict((tmp_path / "seg" / "eval_metrics.json").read_text())["undefined"] == {
        "mIoU": "the evaluation gave nan"}

    assert math.isnan(read_eval_metrics(tmp_path, "det")["metrics"]["AP_box"])
    box, mask = read_det_metrics(tmp_path).values()
    assert math.isnan(box) and mask == 2.5
    det = demo.DetData(tmp_path / "a.json", tmp_path, tmp_path / "a.json", tmp_path, "built-in shapes")
    data = demo.StepData(tmp_path, 40, det, [], demo.SegData("builtin", tmp_path, "train"))
    text = demo.summary_table(demo.Schedule(det_iters=200), data, dict(epochs=1, first_loss=1.0, last_loss=0.5),
                              dict(record=read_eval_metrics(tmp_path, "det")),
                              dict(record=read_eval_metrics(tmp_path / "seg", "seg")))
    assert "AP box n/a, AP50 box n/a, AP mask 2.5 |" in text and "mIoU n/a" in text


def test_summary_table_says_what_the_detection_pictures_show(tmp_path: Path) -> None:
    det = demo.DetData(tmp_path / "a.json", tmp_path, tmp_path / "a.json", tmp_path, "built-in shapes")
    data = demo.StepData(tmp_path, 40, det, [], demo.SegData("builtin", tmp_path, "train"))
    mae = dict(epochs=30, first_loss=1.2, last_loss=0.8)
    det_run = dict(record={"metrics": {"AP_box": 12.34, "AP_mask": 5.0}, "details": {"bbox": {"AP50": 30.0}}})
    seg_run = dict(record={"metrics": {"mIoU": 40.0}, "details": {"aAcc": 80.0}})
    text = demo.summary_table(demo.Schedule(det_iters=200), data, mae, det_run, seg_run)
    assert "| Mask R-CNN (200 iters, built-in shapes) | AP box 12.3, AP50 box 30.0, AP mask 5.0 |" in text
    note = text.splitlines()[-1]
    assert note.startswith("Detection pictures: ground truth (left) beside the model's top 5 detections")
    assert "score >= 0.2" in note and "after only 200 CPU iterations" in note and "not a trained detector" in note
    long_run = demo.summary_table(demo.Schedule(det_iters=90000), data, mae, det_run, seg_run)
    assert "not a trained detector" not in long_run and "after 90000 iterations" in long_run


def test_summary_table_shows_each_class_iou_of_the_segmentation(tmp_path: Path) -> None:
    """The UperNet row lists the per-class IoU train_seg.py writes (tools/train_seg.py -> details.IoU; null: a
    class in neither prediction nor ground truth); none for a record without them or with too many classes."""
    from mae_transfer.metrics import read_eval_metrics, write_eval_metrics

    det = demo.DetData(tmp_path / "a.json", tmp_path, tmp_path / "a.json", tmp_path, "built-in shapes")
    data = demo.StepData(tmp_path, 40, det, [], demo.SegData("builtin", tmp_path, "train"))
    mae = dict(epochs=3, first_loss=1.2, last_loss=0.8)
    det_run = dict(record={"metrics": {"AP_box": 1.0, "AP_mask": 1.0}, "details": {}})
    write_eval_metrics(tmp_path, "seg", {"mIoU": 51.0, "aAcc": 90.0}, tool="t", details={
        "split": "test", "IoU": {"background": 95.04, "circle": 40.0, "square": 31.96, "triangle": float("nan")}})
    text = demo.summary_table(demo.Schedule(seg_iters=7), data, mae, det_run,
                              dict(record=read_eval_metrics(tmp_path, "seg")))
    assert ("| UperNet (7 iters, built-in shapes) | mIoU 51.0, aAcc 90.0; IoU background 95.0, circle 40.0, "
            "square 32.0, triangle n/a |") in text
    plain = demo.summary_table(demo.Schedule(seg_iters=7), data, mae, det_run,
                               dict(record={"metrics": {"mIoU": 51.0, "aAcc": 90.0}, "details": {"split": "test"}}))
    assert "| mIoU 51.0, aAcc 90.0 |" in plain
    many = {"metrics": {"mIoU": 1.0}, "details": {"IoU": {f"c{i}": 1.0 for i in range(150)}}}
    assert "c149" not in demo.summary_table(demo.Schedule(), data, mae, det_run, dict(record=many))


def test_mini_study_states_mae_minus_scratch_per_freeze_setting(tmp_path: Path) -> None:
    """The demo's own study spec (2 seeds); the summary line gives the paired difference with ± and n for each
    freeze setting, whatever its sign, and says so where a setting has no finished pair."""
    from mae_transfer.study.spec import load_study

    ckpt = tmp_path / "mae.pth"
    ckpt.write_bytes(b"")
    det = demo.DetData(tmp_path / "a.json", tmp_path, tmp_path / "a.json", tmp_path, "built-in shapes")
    data = demo.StepData(tmp_path, 320, det, [], demo.SegData("builtin", tmp_path, "train"), 32)
    study = load_study(demo.mini_study_spec(demo.Schedule(), data, ckpt), output_dir=tmp_path / "study")
    assert study.seeds == [0, 1] and len(study.cells()) == 8
    miou = {("MAE", 0): (50.0, 54.0), ("scratch", 0): (49.0, 51.0), ("MAE", -1): (30.0, 31.0)}  # (seed 0, seed 1)
    rows = [dict(backbone=b, task="seg", freeze_blocks=f, seed=s, mIoU=v[s]) for (b, f), v in miou.items()
            for s in (0, 1)]
    line = demo.difference_line(study, rows)
    # all blocks: differences 1 and 3 -> mean 2, sample std sqrt(2) = 1.4
    assert line == "MAE − scratch, mIoU: all 4 blocks +2.0±1.4 (n=2); frozen ViT no pair finished"
    rows += [dict(backbone="scratch", task="seg", freeze_blocks=-1, seed=s, mIoU=v) for s, v in ((0, 33.0), (1, 33.0))]
    assert demo.difference_line(study, rows).endswith("frozen ViT -2.5±0.7 (n=2)")
    assert "fine-tuned on 32 labelled" in demo.data_sentence(data) and "320 unlabelled" in demo.data_sentence(data)


# ------------------------------------------------------------------------------------------- interrupt + re-run
FAKE_TOOL = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    runs = Path(sys.argv[1]) / "runs"
    first = not runs.exists()
    try:
        with open(runs, "a") as f:
            f.write(f"{os.getpid()}\\n")
        print("tool started", flush=True)
        if first:  # the first run works until it is stopped
            time.sleep(120)
    except KeyboardInterrupt:
        print("tool stopped by SIGINT", flush=True)
        sys.exit(130)
    if len(sys.argv) > 2:
        sys.exit(int(sys.argv[2]))
""")
DRIVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from harnesses import demo
    from mae_transfer.cli import run_cli
    out = Path(sys.argv[2])

    def run():
        demo.run_step("fake step", out / "DONE", [sys.argv[3], str(out), *sys.argv[4:]], out / "fake.log")
        return 0

    sys.exit(run_cli(lambda argv: demo.stop_cleanly(out, run)))
""")


def _scripts(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "tool.py").write_text(FAKE_TOOL)
    (tmp_path / "driver.py").write_text(DRIVER)
    return tmp_path / "tool.py", tmp_path / "driver.py"


def _drive(tmp_path: Path, out: Path, *extra: str, stop: signal.Signals | None = None, group: bool = True):
    """Run the driver in its own session (a terminal's process group); optionally send `stop` once the tool runs."""
    tool, driver = _scripts(tmp_path)
    out.mkdir(exist_ok=True)
    runs = out / "runs"
    before = len(runs.read_text().split()) if runs.exists() else 0
    proc = subprocess.Popen([sys.executable, str(driver), str(REPO_ROOT), str(out), str(tool), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_sigint)
    if stop is not None:
        deadline = time.time() + 60
        while not (runs.exists() and len(runs.read_text().split()) > before):
            assert time.time() < deadline and proc.poll() is None, "the tool never started"
            time.sleep(0.05)
        (os.killpg if group else os.kill)(proc.pid, stop)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("group", [True, False], ids=["ctrl-c-process-group", "sigint-demo-only"])
def test_ctrl_c_stops_step_cleanly_and_rerun_finishes_then_skips(tmp_path: Path, group: bool) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = _drive(tmp_path, out, stop=signal.SIGINT, group=group)
    assert code == 130
    assert "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines() == [f"[demo] interrupted: finished steps are kept in {out}; run the same "
                                           "command again to continue"]
    assert not (out / "DONE").exists()
    tool_pid = int((out / "runs").read_text().split()[0])
    assert not _alive(tool_pid)  # the tool was stopped, not left running
    assert "tool stopped by SIGINT" in (out / "fake.log").read_text()  # it got SIGINT (forwarded if needed)
    if not group:
        return

    code, stdout, _ = _drive(tmp_path, out)  # re-run: the interrupted step runs again and finishes
    assert code == 0 and "done in" in stdout
    record = json.loads((out / "DONE").read_text())
    assert record["step"] == "fake step" and record["command"][1] == str(out)
    assert len((out / "runs").read_text().split()) == 2
    assert (out / "fake.log").read_text().count("$ ") == 2  # both attempts are in the log

    code, stdout, _ = _drive(tmp_path, out)  # finished: skipped, the tool does not run
    assert code == 0 and "fake step: skipped, finished in an earlier run" in stdout
    assert len((out / "runs").read_text().split()) == 2


def test_kill_leaves_no_marker_and_failures_name_the_log(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, _ = _drive(tmp_path, out, stop=signal.SIGKILL)  # kill -9 of the whole process group
    assert code == -signal.SIGKILL and not (out / "DONE").exists()
    assert not list(out.glob(".DONE.*"))  # no half-written marker either
    code, _, stderr = _drive(tmp_path, out, "3")  # re-run; this time the tool fails (exit 3)
    assert code == 2 and "error: step failed (exit 3)" in stderr and str(out / "fake.log") in stderr
    assert not (out / "DONE").exists()


def _demo_det_lrs(iters: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...] = ()
                  ) -> list[float]:
    """The lr multiplier of each iteration of the demo's detection command for --det-iters `iters` (the command
    as demo.detect builds it, parsed and configured as train_det does; `extra` overrides appended)."""
    from types import SimpleNamespace

    import torch
    from detectron2.config import instantiate
    from detectron2.solver import LRMultiplier

    from mae_transfer.detection import checks as det_checks

    class Captured(Exception):
        pass

    commands = []

    def capture(name, marker, args, log_file):
        commands.append([str(a) for a in args])
        raise Captured

    monkeypatch.setattr(demo, "run_step", capture)
    with pytest.raises(Captured):
        demo.detect(demo.Schedule(det_iters=iters), tmp_path, SimpleNamespace(det=SimpleNamespace(args=list),
                                                                              det_pictures=[]), tmp_path / "i.pth")
    spec = importlib.util.spec_from_file_location("train_det", REPO_ROOT / "tools" / "train_det.py")
    train_det = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_det)
    args = train_det.parse_args([*commands[0][1:], *extra])
    cfg = det_checks.load_config(args.config, det_checks.overrides_of(args))
    assert cfg.train.max_iter == iters
    det_checks.check_lr_schedule(cfg)  # what train_det checks before anything runs
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), max_iter=iters)
    lrs = []
    for _ in range(iters):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("iters", [1, 2, 3, 4, 5])
def test_short_detection_runs_keep_a_valid_schedule(iters, tmp_path, monkeypatch):
    """--det-iters 1..5: the demo used to pass num_updates=N, milestones=[int(0.8N), int(0.95N)] ([3, 3] for 4,
    which crashed train_det). It keeps the config's schedule, a fraction of train.max_iter: warm-up over the first
    10%, decays x0.1 at 80% and 95% of the run, for any length."""
    lrs = _demo_det_lrs(iters, tmp_path, monkeypatch)
    # the first iteration is in the warm-up (factor 0.001); then full lr until 80% of the run, x0.1 from 80%,
    # x0.01 from 95% (iteration i is at i / iters of the run)
    expected = [1.0 if i / iters < 0.8 else 0.1 if i / iters < 0.95 else 0.01 for i in range(1, iters)]
    assert lrs[0] == pytest.approx(0.001) and lrs[1:] == pytest.approx(expected)


def test_default_detection_schedule_is_the_one_of_the_old_overrides(tmp_path, monkeypatch):
    """At the default 160 iterations the config's schedule is the one the demo's own overrides gave."""
    old = ("lr_multiplier.scheduler.num_updates=160", "lr_multiplier.scheduler.milestones=[128,152]")
    assert _demo_det_lrs(160, tmp_path, monkeypatch) == _demo_det_lrs(160, tmp_path, monkeypatch, old)
