"""One flag vocabulary across the tools: `--output-dir` (run folder), `--pictures-dir` (picture folder); the earlier
spellings still parse to the same arguments and print one deprecation note naming the current flag."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mae_transfer.cli import run_cli

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool, common, old, current", [
    ("train_det", ["--config", "c.py", "--infer", "a.jpg"], ["--output", "pics"], ["--pictures-dir", "pics"]),
    ("train_seg", ["--config", "c.py", "--eval-only"], ["--save-pictures", "pics"], ["--pictures-dir", "pics"]),
    ("train_seg", ["--config", "c.py", "--resume"], ["--work-dir", "run"], ["--output-dir", "run"]),
    ("finetune_cls", ["--config", "c.py"], ["--eval", "ft.pth"], ["--eval-only", "ft.pth"]),
])
def test_earlier_spelling_parses_the_same_with_one_note(tool, common, old, current, capsys):
    parse_args = _tool(tool).parse_args
    now = parse_args([*common, *current])
    assert capsys.readouterr().err == ""
    before = parse_args([*common, *old])
    assert vars(before) == vars(now)
    assert capsys.readouterr().err.splitlines() == [f"note: {old[0]} is deprecated; use {current[0]}"]


def test_earlier_spelling_before_a_user_error(tmp_path, capsys):
    """coco_to_imagefolder's `--out`: the note, then the tool's own one error line (exit 2)."""
    missing = tmp_path / "missing.json"
    rc = run_cli(_tool("coco_to_imagefolder").main,
                 ["--json", str(missing), "--images", str(tmp_path), "--out", str(tmp_path / "crops")])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == ["note: --out is deprecated; use --output-dir",
                                                    f"error: annotation file not found: {missing}"]


def test_current_spellings_are_the_documented_ones(capsys):
    """--help shows the current flags and hides the earlier ones."""
    for tool, shown, hidden in (("train_det", "--pictures-dir", "--output "), ("train_seg", "--pictures-dir",
                                                                                "--save-pictures")):
        with pytest.raises(SystemExit):
            _tool(tool).parse_args(["--help"])
        out = capsys.readouterr().out
        assert shown in out and "--output-dir" in out and hidden not in out, out
