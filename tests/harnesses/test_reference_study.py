"""The first committed reference study re-read by the current report (`tools/reference_study.py --reread`)."""
from __future__ import annotations

import shutil

from mae_transfer.study.stats import holm, paired_test
from tests.conftest import REPO_ROOT

COMMITTED = REPO_ROOT / "benchmarks" / "study_reference" / "v1"


def test_reread_adjusts_the_committed_differences_with_holm(tmp_path):
    """reread.md from results.csv alone: 80 exploratory differences (10 backbone pairs x 2 tasks x 4 depths), and the
    MAE-80 − scratch seg difference at full fine-tuning has the p and Holm p computed here from the csv's seeds."""
    import csv

    from harnesses.reference_study import reread

    shutil.copyfile(COMMITTED / "results.csv", tmp_path / "results.csv")
    text = reread(tmp_path).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and " − " in line and line.count("|") == 8]
    assert len(rows) == 80

    scores: dict[tuple[str, str, int], dict[int, float]] = {}
    for r in csv.DictReader(open(COMMITTED / "results.csv")):
        metric = r["mIoU"] or r["top1"]
        scores.setdefault((r["backbone"], r["task"], int(r["freeze_blocks"])), {})[int(r["seed"])] = float(metric)
    backbones = list(dict.fromkeys(b for b, _, _ in scores))
    tests = {(a, b, task, f): paired_test([scores[(a, task, f)][s] - scores[(b, task, f)][s] for s in (0, 1, 2)])
             for task in ("seg", "cls") for f in (0, 2, 3, -1)
             for i, a in enumerate(backbones) for b in backbones[i + 1:]}
    adjusted = dict(zip(tests, holm([t.p for t in tests.values()]), strict=True))
    key = next(k for k in tests if {k[0], k[1]} == {"MAE-80", "scratch"} and k[2:] == ("seg", 0))
    test = tests[key]
    assert round(test.p, 2) == 0.02 and adjusted[key] == 1.0  # significant alone, not in its family
    line = next(r for r in rows if r.startswith("| MAE-80 − scratch | seg mIoU | 4 (all) |"))
    assert line.endswith(f"| {test.p:.2f} | {adjusted[key]:.2f} |")
