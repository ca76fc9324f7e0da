"""The task-kind registry: a kind registered here (a tiny tool written in tmp_path) goes through the whole study
bookkeeping (spec, cell commands, input checks, subprocess runs, resume markers, results) with no other module
changed; the built-in kinds' records say what the tools do."""
from __future__ import annotations

import csv
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mae_transfer import task_kinds
from mae_transfer.errors import MaeTransferError
from mae_transfer.metrics import read_eval_metrics
from mae_transfer.study.cluster import CellJob
from mae_transfer.study.run import run_study
from mae_transfer.study.spec import Cell, cell_command, command_line, has_checkpoint, load_study
from mae_transfer.task_kinds import TORCH_ENV, Metric, Overrides, TaskKind, Tool

TOY_TOOL = '''
import argparse, json, sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--blocks-frozen", type=int, required=True)
    p.add_argument("--weights")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", nargs="+", default=[])
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    opts = dict(item.split("=", 1) for item in args.set)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rounds = int(opts["rounds"])
    score = 50 + 5 * args.blocks_frozen + int(opts["seed"]) + (5 if args.weights else 0) + rounds
    (out / f"state_{rounds}.txt").write_text("state")
    (out / "toy_last.txt").write_text(f"state_{rounds}.txt")
    (out / "eval_metrics.json").write_text(json.dumps({"task": "toy", "metrics": {"score": score},
                                                      "tool": "toy.py", "details": {}}))
'''


def toy_score(cell: Cell, rounds: int) -> float:
    """What the toy tool computes for a cell: every coordinate of the cell changes it."""
    return 50 + 5 * cell.freeze_blocks + cell.seed + (5 if cell.backbone == "init" else 0) + rounds


def check_toy_task(args: Any, check: Any) -> None:
    """The toy kind's input check (a callable on its record, as the built-in kinds' are)."""
    check(None, _folder, args.data)


def _folder(path: str) -> None:
    if not Path(path).is_dir():
        raise MaeTransferError(f"toy data not found: {path}")


@pytest.fixture
def toy_kind(tmp_path: Path) -> Iterator[TaskKind]:
    script = tmp_path / "toy.py"
    script.write_text(textwrap.dedent(TOY_TOOL))
    kind = task_kinds.register(TaskKind(
        "toy", Tool(str(script), TORCH_ENV, "toy_last.txt", marker_names_checkpoint=True), "train_toy",
        metrics=(Metric("score", "score", "$s$"),), length_key="epochs",
        overrides=Overrides(length=("rounds={iters}",), checkpoint_period="keep={period}", seed="seed={seed}",
                            init_flag="--weights", freeze_flag="--blocks-frozen", overrides_flag="--set"),
        input_check=check_toy_task))
    try:
        yield kind
    finally:
        task_kinds.unregister("toy")
    assert "toy" not in task_kinds.KINDS and "train_toy" not in task_kinds.TOOLS


def test_a_registered_kind_runs_through_the_study_bookkeeping(toy_kind: TaskKind, tmp_path: Path) -> None:
    (tmp_path / "toy_config.py").write_text("width = 1\n")
    (tmp_path / "init.pth").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    spec = dict(name="toy", depth=4, freeze_blocks=[0, 2], seeds=[0, 1], reference="scratch",
                backbones={"init": str(tmp_path / "init.pth"), "scratch": None},
                tasks={"t": dict(kind="toy", config=str(tmp_path / "toy_config.py"), epochs=3,
                                     args=["--data", str(tmp_path / "data")])})
    with pytest.raises(MaeTransferError, match="kind 'toy' takes epochs=, not iters="):
        load_study({**spec, "tasks": {"t": dict(kind="toy", config=str(tmp_path / "toy_config.py"), iters=3)}})
    study = load_study(spec, tmp_path / "out")
    cell = Cell("init", "t", 2, 1)
    tool, args = cell_command(study, cell, "/w.pth", resume=True)
    assert tool == "train_toy" and args == [
        "--config", str(tmp_path / "toy_config.py"), "--output-dir", str(study.cell_dir(cell)),
        "--data", str(tmp_path / "data"), "--blocks-frozen", "2", "--weights", "/w.pth",
        "--set", "rounds=3", "keep=1", "seed=1", "--resume"]
    assert command_line(study, cell, "/w.pth", True)[1:] == [str(tmp_path / "toy.py"), *args]
    assert CellJob(study, cell, None, 0).tool == "train_toy"  # the cluster path takes the same command

    summary = run_study(study)  # the real subprocess runner: the toy tool runs 8 times
    assert len(summary["ran"]) == 8 and not summary["failed"]
    assert has_checkpoint(study, cell) and task_kinds.last_checkpoint("toy", study.cell_dir(cell)) == str(
        study.cell_dir(cell) / "state_3.txt")
    assert read_eval_metrics(study.cell_dir(cell), "toy")["metrics"] == {"score": toy_score(cell, 3)}
    with (study.output_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["kind"] == "toy" for r in rows)
    for r in rows:
        row_cell = Cell(r["backbone"], r["task"], int(r["freeze_blocks"]), int(r["seed"]))
        assert float(r["score"]) == toy_score(row_cell, 3), r
    md = (study.output_dir / "results.md").read_text()
    # init, 2 blocks tuned (freeze 2): seeds 0, 1 -> 50 + 10 + 5 + 3 + {0, 1} = 68, 69; all blocks: 58, 59
    assert "| init | 58.5±0.7 | 68.5±0.7 | 2 |" in md, md
    assert "| init − scratch | score | +5.0±0.0 (n=2) | +5.0±0.0 (n=2) |" in md, md
    assert "`t` = toy with `toy_config.py`, 3 epochs" in md and (study.output_dir / "plot.png").is_file()
    assert run_study(study)["ran"] == []  # finished cells are skipped

    (tmp_path / "data").rmdir()  # the kind's own input check (its record names it) runs before any cell
    (study.cell_dir(cell) / "done.json").unlink()
    with pytest.raises(MaeTransferError, match=f"task 't': toy data not found: {tmp_path / 'data'}"):
        run_study(study)
    assert not (study.cell_dir(cell) / "done.json").exists()


def test_builtin_kinds_spell_the_tools_settings() -> None:
    det, seg, cls = (task_kinds.get(k) for k in ("det", "seg", "cls"))
    assert (det.tool_name, seg.tool_name, cls.tool_name) == ("train_det", "train_seg", "finetune_cls")
    assert task_kinds.TOOLS["train_det"].mode is task_kinds.DETECTRON2
    assert task_kinds.TOOLS["train_seg"].mode is task_kinds.MMENGINE
    assert det.overrides.cell(8, 4, 1) == ["train.max_iter=8", "train.eval_period=8", "train.checkpointer.period=4",
                                           "train.seed=1"]
    assert seg.overrides.init(None) == ([], []) and det.overrides.init(None) == ([], ["train.init_checkpoint="])
    assert cls.length_unit == "epochs" and cls.eval_metrics == ("top1", "top5") and cls.metric_keys == ("top1",)
    with pytest.raises(MaeTransferError, match=r"kind must be one of \('det', 'seg', 'cls'\), got 'pose'"):
        task_kinds.get("pose")
    with pytest.raises(MaeTransferError, match="already registered"):
        task_kinds.register(det)


def test_one_last_checkpoint_for_every_tool(tmp_path: Path) -> None:
    """detectron2 writes the checkpoint's name relative to the folder, mmengine an absolute path; our engine's
    marker is the checkpoint itself."""
    assert task_kinds.last_checkpoint("det", tmp_path) is None
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth\n")
    assert task_kinds.last_checkpoint("det", tmp_path) == str(tmp_path / "model_0000004.pth")
    (tmp_path / "last_checkpoint").write_text("/elsewhere/iter_8.pth")
    assert task_kinds.last_checkpoint("seg", tmp_path) == "/elsewhere/iter_8.pth"
    assert task_kinds.last_checkpoint("cls", tmp_path) is None
    (tmp_path / "checkpoint_last.pth").write_bytes(b"")
    assert task_kinds.last_checkpoint("cls", tmp_path) == str(tmp_path / "checkpoint_last.pth")
