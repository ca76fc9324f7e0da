"""What a study may claim (issue 33): Holm-adjusted p-values and Bonferroni intervals against hand-computed values,
the power of a paired t-test against the noncentral t and published sample sizes, the nested variance split, the
declared contrasts in results.md, pretraining seeds (one pretraining run per seed), `--replicate` with fresh seeds
only, and each bad input as one error line."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mae_transfer import task_kinds
from mae_transfer.cli import run_cli
from mae_transfer.errors import MaeTransferError
from mae_transfer.study.claims import compare, exploratory_family, replication_study
from mae_transfer.study.report import results_markdown
from mae_transfer.study.run import run_study
from mae_transfer.study.spec import DONE, Cell, Contrast, load_study
from mae_transfer.study.stats import (
    bonferroni_interval,
    detectable_effect,
    holm,
    n_needed,
    paired_power,
    paired_test,
    variance_components,
)
from mae_transfer.study.tables import collect
from mae_transfer.task_kinds import TORCH_ENV, Metric, Overrides, TaskKind, Tool
from tests.conftest import REPO_ROOT
from tests.study.test_task_kinds import check_toy_task

SEG = dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=20)


def t2_two_sided_p(t: float) -> float:
    """Two-sided p of a t statistic with 2 degrees of freedom, from its closed-form cdf 1/2 + t / (2 sqrt(2 + t^2))."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


# ------------------------------------------------------------------------------------------- pure statistics
def test_holm_adjustment_matches_hand_computed_values() -> None:
    # Wikipedia's Holm-Bonferroni example: p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted: 0.005 x 4 = 0.02,
    # 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (never below an earlier step): H1 and H4 rejected.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # three p-values: 0.01 x 3 = 0.03, 0.02 x 2 = 0.04, 0.03 x 1 = 0.03 -> 0.04
    assert holm([0.03, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([0.2]) == [0.2] and holm([]) == []


def test_paired_test_and_bonferroni_interval_match_hand_computed_values() -> None:
    test = paired_test([10.0, 11.0, 12.0])  # mean 11, sd 1, n 3: t = 11 sqrt(3)
    assert (test.mean, test.n) == (11.0, 3) and test.sd == pytest.approx(1.0)
    assert test.p == pytest.approx(t2_two_sided_p(11 * math.sqrt(3)), rel=1e-9)
    # printed t tables, 2 degrees of freedom: t(0.975) = 4.303 (m = 1), t(1 - 0.025 / 2) = 6.205 (m = 2)
    for m, quantile in ((1, 4.303), (2, 6.205)):
        half = quantile / math.sqrt(3)
        assert bonferroni_interval(test, m) == pytest.approx((11 - half, 11 + half), abs=2e-3)
    assert paired_test([1.0]).p is None and bonferroni_interval(paired_test([1.0]), 1) is None
    assert paired_test([2.0, 2.0]).p == 0.0 and paired_test([0.0, 0.0]).p == 1.0  # zero spread: the t limit


def test_power_against_the_noncentral_t_and_published_sample_sizes() -> None:
    from scipy.stats import nct, t

    # power of a two-sided paired t-test, effect 1.5, sd 2, n 10, alpha 0.05, from scipy's noncentral t here
    crit = t.ppf(0.975, 9)
    ncp = 1.5 / (2 / math.sqrt(10))
    expected = 1 - nct.cdf(crit, 9, ncp) + nct.cdf(-crit, 9, ncp)
    assert paired_power(1.5, 2.0, 10, 0.05) == pytest.approx(expected, rel=1e-9) and 0.5 < expected < 0.7
    # the sample sizes G*Power and Cohen's tables give for 80% power, two-sided alpha 0.05: d = 0.5 -> 34, d = 0.8
    # -> 15 (one-sample / paired t-test, d = effect / sd of the differences)
    assert n_needed(0.5, 1.0, 0.05) == 34 and n_needed(1.6, 2.0, 0.05) == 15
    assert paired_power(0.5, 1.0, 33, 0.05) < 0.8 <= paired_power(0.5, 1.0, 34, 0.05)
    detectable = detectable_effect(2.0, 10, 0.05)
    assert paired_power(detectable, 2.0, 10, 0.05) == pytest.approx(0.8, abs=1e-6)
    assert 1.5 < detectable < 2.2  # above the effect with ~60% power, below d = 1.1 x sd
    assert detectable_effect(2.0, 10, 0.01) > detectable  # a stricter alpha detects less
    assert detectable_effect(1.0, 1, 0.05) is None and detectable_effect(0.0, 3, 0.05) == 0.0
    assert n_needed(1e-6, 1.0, 0.05) is None  # beyond MAX_N pairs


def test_nested_variance_components_match_hand_computed_values() -> None:
    # run means 2 and 6 (grand 4): MS_within = 4 x 1 / 2 = 2; MS_between = 2 x (4 + 4) / 1 = 16;
    # between-run variance (16 - 2) / 2 = 7
    parts = variance_components([[1.0, 3.0], [5.0, 7.0]])
    assert parts.sd_within == pytest.approx(math.sqrt(2)) and parts.sd_between == pytest.approx(math.sqrt(7))
    assert (parts.runs, parts.sizes, parts.layout) == (2, (2, 2), "2 x 2")
    # unequal runs (a paired design): means 2 and 5, grand mean 3, MS_within = 2 / 1 = 2,
    # MS_between = (2 x 1 + 1 x 4) / 1 = 6, n0 = (3 - 5/3) / 1 = 4/3: between-run variance (6 - 2) / (4/3) = 3
    parts = variance_components([[1.0, 3.0], [5.0]])
    assert parts.sd_within == pytest.approx(math.sqrt(2)) and parts.sd_between == pytest.approx(math.sqrt(3))
    assert parts.layout == "3 over 2 (2+1)"
    assert variance_components([[1.0, 3.0], [1.0, 3.0]]).sd_between == 0.0  # negative estimate -> 0
    assert variance_components([[1.0, 2.0]]) is None and variance_components([[1.0], [2.0]]) is None
    assert variance_components([[1.0, 2.0], []]) is None


# ------------------------------------------------------------------------------------------- results.md
def write_cells(study, values: dict[tuple[str, int], list[float]]) -> None:
    for (backbone, freeze), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            cell = study.cell_dir(Cell(backbone, "seg", freeze, seed))
            cell.mkdir(parents=True)
            (cell / DONE).write_text(json.dumps({"metrics": {"mIoU": value}, "seconds": 1.0}))


def test_results_report_the_contrasts_first_then_the_exploratory_family(tmp_path: Path) -> None:
    study = load_study(dict(name="c", depth=4, freeze_blocks=[0, 2], seeds=[0, 1, 2], reference="scratch",
                            backbones={"MAE": None, "sup": None, "scratch": None}, tasks={"seg": SEG},
                            contrasts=[dict(a="MAE", b="scratch", task="seg", freeze=[0, 2])]), tmp_path / "out")
    assert study.contrasts == [Contrast("MAE", "scratch", "seg", "mIoU", f) for f in (0, 2)]
    write_cells(study, {("MAE", 0): [50.0, 52.0, 57.0], ("scratch", 0): [40.0, 41.0, 45.0],  # diffs 10, 11, 12
                        ("MAE", 2): [31.0, 30.0, 33.0], ("scratch", 2): [30.0, 31.0, 30.0],  # diffs 1, -1, 3
                        ("sup", 0): [45.0, 40.0, 46.0]})
    rows = collect(study)
    p_big = t2_two_sided_p(11 * math.sqrt(3))
    p_small = t2_two_sided_p(1 / (2 / math.sqrt(3)))  # mean 1, sd 2
    first, second = compare(study, rows, study.contrasts)
    assert first.test.p == pytest.approx(p_big) and first.p_holm == pytest.approx(2 * p_big)
    assert second.p_holm == pytest.approx(max(2 * p_big, p_small))

    md = results_markdown(study, rows)
    assert md.index("## Primary contrasts (confirmatory, 2 declared") < md.index("## All cells") \
        < md.index("## Exploratory differences") < md.index("### Difference to `scratch`")
    half = 6.205 / math.sqrt(3)  # t(1 - 0.05 / 4, 2): Bonferroni over the 2 contrasts
    assert f"| MAE − scratch | seg mIoU | 4 (all) | +11.0±1.0 | 3 | [+{11 - half:.1f}, +{11 + half:.1f}] |" in md
    assert "| **MAE above scratch** |" in md
    detectable = detectable_effect(2.0, 3, 0.025)
    row = next(line for line in md.splitlines() if line.startswith("| MAE − scratch | seg mIoU | 2 |"))
    assert row.endswith(f"| >= {detectable:.1f} | within noise; detectable at 80% power: >= {detectable:.1f} |")
    assert f"| {p_small:.2f} | {max(2 * p_big, p_small):.2f} |" in row
    assert "Declared in the spec; recorded in contrasts.json when the study next runs." in md

    # exploratory: every other pair (sup − scratch, MAE − sup) per freeze setting; rows with data only, no bold
    assert [(c.a, c.b, c.freeze) for c in exploratory_family(study)] == [
        ("MAE", "sup", 0), ("MAE", "sup", 2), ("sup", "scratch", 0), ("sup", "scratch", 2)]
    exploratory = md[md.index("## Exploratory differences"):md.index("### Difference to")]
    assert "**" not in exploratory and "(2 with a finished pair)" in exploratory
    sup = paired_test([5.0, -1.0, 1.0])  # sup − scratch at freeze 0; MAE − sup: 5, 12, 11
    mae_sup = paired_test([5.0, 12.0, 11.0])
    adjusted = holm([mae_sup.p, 1.0, sup.p, 1.0])
    assert f"| sup − scratch | seg mIoU | 4 (all) | +1.7±3.1 | 3 | {sup.p:.2f} | {adjusted[2]:.2f} |" in exploratory

    # --target-effect: the pairs needed for 80% power per contrast
    study.target_effect = 2.0
    md = results_markdown(study, rows)
    assert "n for ±2.0 |" in md and f"| {n_needed(2.0, 2.0, 0.025)} | within noise" in md
    # no contrasts: everything is exploratory
    plain = load_study(dict(depth=4, freeze_blocks=[0], backbones={"a": None, "b": None}, tasks={"seg": SEG}))
    assert "every difference below is exploratory" in results_markdown(plain, [])


def test_the_declaration_is_recorded_when_the_study_runs(noisy_kind: TaskKind, tmp_path: Path) -> None:
    spec = dict(name="d", depth=4, freeze_blocks=[0], seeds=[0, 1], backbones={"a": None, "b": None},
                tasks={"t": noisy_task(tmp_path)}, contrasts=[dict(a="a", b="b", task="t")])
    study = load_study(spec, tmp_path / "out")
    run_study(study, runner=lambda st, cell, ckpt, resume: {"score": float(cell.seed + (cell.backbone == "a"))})
    record = json.loads((tmp_path / "out" / "contrasts.json").read_text())
    assert record["finished_cells"] == 0 and record["contrasts"] == [
        dict(a="a", b="b", task="t", metric="score", freeze=0)] and record["earlier"] == []
    assert "Declared before any cell had finished" in (tmp_path / "out" / "results.md").read_text()
    changed = load_study({**spec, "contrasts": [dict(a="b", b="a", task="t")]}, tmp_path / "out")
    run_study(changed, runner=lambda *a: {"score": 0.0})  # nothing left to run: the new declaration is recorded
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Declared when 4 cell(s) had already finished" in md and "changed 1 time(s)" in md


@pytest.mark.parametrize("contrast, message", [
    (dict(a="MAE", b="nope", task="seg"), r"contrasts\[0\]: b='nope' is not one of the backbones \('MAE', 'scratch'\)"),
    (dict(a="MAE", b="scratch", task="det"), r"contrasts\[0\]: task='det' is not one of the tasks \('seg'\)"),
    (dict(a="MAE", b="scratch", task="seg", freeze=[0, 3]), r"freeze \[3\] not among the spec's freeze_blocks"),
    (dict(a="MAE", b="scratch", task="seg", metric="AP"), r"metric 'AP': expected one or a list of \['mIoU'\]"),
    (dict(a="MAE", b="MAE", task="seg"), "a and b are the same backbone 'MAE'"),
    (dict(a="MAE", task="seg", freez=[0]), r"unknown key\(s\) \['freez'\]"),
])
def test_a_bad_contrast_is_one_error_before_anything_runs(tmp_path: Path, contrast: dict, message: str) -> None:
    with pytest.raises(MaeTransferError, match=message):
        load_study(dict(depth=4, freeze_blocks=[0, -1], backbones={"MAE": None, "scratch": None}, tasks={"seg": SEG},
                        contrasts=[contrast]))


@pytest.mark.parametrize("seeds, message", [
    ([], "must be a non-empty list"), ([0, 1, 0], r"\[0, 1, 0\] repeat \[0\]"),
    ([2 ** 32], "must be a non-empty list of integers in 0..4294967295"),
])
def test_bad_pretraining_seeds_are_one_error(tmp_path: Path, seeds: list, message: str) -> None:
    pre = dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=str(tmp_path), seeds=seeds)
    with pytest.raises(MaeTransferError, match=f"backbone 'MAE': pretrain seeds .*{message}"):
        load_study(dict(depth=4, freeze_blocks=[0], backbones={"MAE": dict(pretrain=pre)}, tasks={"seg": SEG}))
    with pytest.raises(MaeTransferError, match="give the pretraining seed in seeds="):
        load_study(dict(depth=4, freeze_blocks=[0], tasks={"seg": SEG}, backbones={
            "MAE": dict(pretrain={**pre, "seeds": [0, 1], "opts": ["seed=3"]})}))


# ------------------------------------------------------------------------------------------- toy-kind studies
NOISY_TOOL = '''
import argparse, json
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    for flag in ("--config", "--output-dir", "--data", "--blocks-frozen", "--weights"):
        p.add_argument(flag)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", nargs="+", default=[])
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    opts = dict(item.split("=", 1) for item in args.set)
    seed = int(opts["seed"])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # with weights: 5 + (7 seed mod 5) above scratch, so paired differences vary by seed; the weights file's
    # first byte (a digit) adds its pretraining run's share
    bonus = 5 + (7 * seed) % 5 + Path(args.weights).read_bytes()[0] - 48 if args.weights else 0
    (out / "toy_last.txt").write_text("x")
    (out / "eval_metrics.json").write_text(json.dumps({"task": "noisy", "metrics": {"score": 50 + seed + bonus},
                                                      "tool": "noisy.py", "details": {}}))
'''


@pytest.fixture
def noisy_kind(tmp_path: Path) -> Iterator[TaskKind]:
    script = tmp_path / "noisy.py"
    script.write_text(textwrap.dedent(NOISY_TOOL))
    kind = task_kinds.register(TaskKind(
        "noisy", Tool(str(script), TORCH_ENV, "toy_last.txt"), "train_noisy",
        metrics=(Metric("score", "score", "$s$"),), length_key="epochs",
        overrides=Overrides(length=("rounds={iters}",), checkpoint_period="keep={period}", seed="seed={seed}",
                            init_flag="--weights", freeze_flag="--blocks-frozen", overrides_flag="--set"),
        input_check=check_toy_task))
    (tmp_path / "noisy_config.py").write_text("width = 1\n")
    (tmp_path / "data").mkdir()
    try:
        yield kind
    finally:
        task_kinds.unregister("noisy")


def noisy_task(tmp_path: Path) -> dict:
    return dict(kind="noisy", config=str(tmp_path / "noisy_config.py"), epochs=1,
                args=["--data", str(tmp_path / "data")])


def fake_pretrainings(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The study's pretraining and export commands only write their files (the pretraining seed's digit as the
    weights' first byte); the cells' tool really runs. Returns the list the pretraining commands are added to."""
    from mae_transfer.study import run as study_run

    launched: list[list[str]] = []
    real = study_run.run_logged
    pretrain_tool = str(REPO_ROOT / task_kinds.TOOLS["pretrain"].script)

    def fake(cmd, *args, **kwargs):
        if cmd[1] != pretrain_tool:
            return real(cmd, *args, **kwargs)
        launched.append(cmd)
        if "--export-encoder" in cmd:
            seed = Path(cmd[-2]).parent.parent.name[-1]  # backbones/<owner>@pt<seed>/pretrain/checkpoint_*.pth
            Path(cmd[-1]).write_text(seed)
        else:
            run = Path(cmd[cmd.index("--output-dir") + 1])
            run.mkdir(parents=True)
            for name in ("checkpoint_0001.pth", "checkpoint_last.pth"):
                (run / name).write_bytes(b"")

    monkeypatch.setattr(study_run, "run_logged", fake)
    return launched


def test_pretraining_seeds_launch_one_pretraining_each(noisy_kind: TaskKind, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two backbones at two epochs of one MAE pretraining with seeds [0, 1, 2]: three pretraining runs (one per seed,
    each saving both epochs) and no more; the cells cross the runs with the fine-tuning seeds; the report
    averages the runs per fine-tuning seed and splits the variance."""
    from harnesses.synthetic import make_unlabeled_shapes

    pool = make_unlabeled_shapes(tmp_path / "pool", 2, size=32)
    mae = dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=str(pool), opts=["epochs=2"], seeds=[0, 1, 2])
    study = load_study(dict(name="pt", depth=4, freeze_blocks=[0], seeds=[0, 1],
                            backbones={"MAE-1": dict(pretrain=mae, epoch=1), "MAE": dict(pretrain=mae),
                                       "scratch": None},
                            tasks={"t": noisy_task(tmp_path)},
                            contrasts=[dict(a="MAE", b="scratch", task="t")]), tmp_path / "out")
    assert list(study.backbones) == ["MAE-1@pt0", "MAE-1@pt1", "MAE-1@pt2", "MAE@pt0", "MAE@pt1", "MAE@pt2",
                                     "scratch"]
    assert study.spec_backbones() == ["MAE-1", "MAE", "scratch"] and len(study.cells()) == 14
    launched = fake_pretrainings(monkeypatch)
    result = run_study(study)
    pretrainings = [cmd for cmd in launched if "--export-encoder" not in cmd]
    assert len(pretrainings) == 3 and len(result["ran"]) == 14
    assert sorted(cmd[-2] for cmd in pretrainings) == ["seed=0", "seed=1", "seed=2"]  # before save_epochs=[1]
    assert all(cmd[-1] == "save_epochs=[1]" for cmd in pretrainings)
    assert {Path(cmd[cmd.index("--output-dir") + 1]).parent.name for cmd in pretrainings} == {
        "MAE-1_pt0", "MAE-1_pt1", "MAE-1_pt2"}  # one run per seed, shared by the epoch-1 and the last backbone
    launched.clear()
    assert run_study(study)["ran"] == [] and launched == []

    rows = collect(study)
    # MAE@pt<p> seed s: 50 + s + 5 + (7 s mod 5) + p; scratch: 50 + s. Mean over runs p = 0, 1, 2: +1.
    # MAE − scratch per fine-tuning seed: 6 (s = 0), 8 (s = 1)
    md = results_markdown(study, rows)
    assert "| MAE − scratch | t score | 4 (all) | +7.0±1.4 | 2 |" in md
    assert "- `MAE`: 3 pretraining run(s) (pretraining seeds 0, 1, 2), each fine-tuned with every fine-tuning " \
           "seed (crossed: 3 x 2 cells" in md
    # runs differ by 1 (p), seeds within a run by 1 + 2 = 3: MS_within 4.5, MS_between 2 x 1 = 2 -> between 0
    assert "| MAE | score | 4 (all) | 0.00 | 2.12 | 3 x 2 |" in md
    assert "| MAE@pt2 | " in md  # each run has its row in the cells' table

    # a replication reuses the exported encoders of the same pretraining runs: no pretraining, fresh seed 2 only
    replication = replication_study(study, 1)
    assert replication.backbones == {**{f"MAE@pt{p}": str(tmp_path / "out" / "backbones" / f"MAE-1_pt{p}" /
                                                          "backbone.pth") for p in range(3)}, "scratch": None}
    assert run_study(replication)["ran"] == [f"{b}__t__freeze0__seed2" for b in ("MAE_pt0", "MAE_pt1", "MAE_pt2",
                                                                                  "scratch")] and launched == []
    assert "- `MAE`: 3 pretraining run(s) (pretraining seeds 0, 1, 2)" in (
        replication.output_dir / "results.md").read_text()


def test_paired_pretraining_seeds_give_each_fine_tuning_seed_one_run(noisy_kind: TaskKind, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """fine_tuning_seeds='paired': fine-tuning seeds 0..3 on runs 0, 1, 2, 0; three pretrainings, 4 MAE cells; the
    per-seed differences carry their run's share; the decomposition handles runs of unequal size."""
    from harnesses.synthetic import make_unlabeled_shapes

    pool = make_unlabeled_shapes(tmp_path / "pool", 2, size=32)
    mae = dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=str(pool), opts=["epochs=2"], seeds=[0, 1, 2],
               fine_tuning_seeds="paired")
    spec = dict(name="pp", depth=4, freeze_blocks=[0], seeds=[0, 1, 2, 3],
                backbones={"MAE": dict(pretrain=mae), "scratch": None}, tasks={"t": noisy_task(tmp_path)},
                contrasts=[dict(a="MAE", b="scratch", task="t")])
    study = load_study(spec, tmp_path / "out")
    assert [(c.backbone, c.seed) for c in study.cells() if c.backbone != "scratch"] == [
        ("MAE@pt0", 0), ("MAE@pt1", 1), ("MAE@pt2", 2), ("MAE@pt0", 3)]
    launched = fake_pretrainings(monkeypatch)
    assert len(run_study(study)["ran"]) == 8
    assert len([cmd for cmd in launched if "--export-encoder" not in cmd]) == 3
    md = results_markdown(study, collect(study))
    # MAE − scratch at seed s on run s mod 3: 5 + (7 s mod 5) + s mod 3 = 5, 8, 11, 6: mean 7.5, sd sqrt(7)
    assert "| MAE − scratch | t score | 4 (all) | +7.5±2.6 | 4 |" in md
    assert "paired with the fine-tuning seeds: the i-th fine-tuning seed fine-tunes run i mod 3" in md
    # MAE values by run: [55, 59], [59], [63]: MS_within 8, MS_between 12, n0 1.25 -> between sqrt(3.2)
    assert "| MAE | score | 4 (all) | 1.79 | 2.83 | 4 over 3 (2+1+1) |" in md
    # a replication pairs its fresh seeds with the same runs, in order
    replication = replication_study(study, 2)
    assert [(c.backbone, c.seed) for c in replication.cells() if c.backbone != "scratch"] == [
        ("MAE@pt0", 4), ("MAE@pt1", 5)]
    # more runs than fine-tuning seeds, or a design without seeds: refused when the spec is read
    with pytest.raises(MaeTransferError, match="3 pretraining runs paired with 2 fine-tuning seed"):
        load_study({**spec, "seeds": [0, 1]}, tmp_path / "x")
    for bad, message in ((dict(fine_tuning_seeds="mixed"), "fine_tuning_seeds must be one of 'crossed', 'paired'"),
                         (dict(seeds=None), "fine_tuning_seeds= needs seeds")):
        pre = {k: v for k, v in {**mae, **bad}.items() if v is not None}
        with pytest.raises(MaeTransferError, match=message):
            load_study({**spec, "backbones": {"MAE": dict(pretrain=pre), "scratch": None}}, tmp_path / "x")


def _tool():
    spec = importlib.util.spec_from_file_location("_study_tool", REPO_ROOT / "tools" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replicate_runs_only_fresh_seeds_and_writes_the_table(noisy_kind: TaskKind, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "init.pth").write_text("0")
    spec_file = tmp_path / "spec.py"
    spec_file.write_text(textwrap.dedent(f"""
        name = "rep"
        depth = 4
        freeze_blocks = [0, 2]
        seeds = [0, 1, 2]
        backbones = {{"init": "{tmp_path / 'init.pth'}", "other": None, "scratch": None}}
        tasks = {{"t": {noisy_task(tmp_path)!r}}}
        contrasts = [dict(a="init", b="scratch", task="t", freeze=0)]
    """))
    tool = _tool()
    out = tmp_path / "out"
    argv = ["--spec", str(spec_file), "--output-dir", str(out)]
    # before the study ran there is nothing to replicate: one error line, exit 2
    assert run_cli(tool.main, [*argv, "--replicate", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --replicate: contrast init − scratch (t score, 4 (all) blocks fine-tuned) has 0 finished pair(s) "
        f"in {out}; finish the study first"]
    assert run_cli(tool.main, argv) == 0 and len(list((out / "cells").iterdir())) == 18
    capsys.readouterr()

    for bad, message in (("0", "must be at least 1, got 0"), ("-3", "must be at least 1, got -3"),
                         (str(2 ** 32), f"fresh seeds 3..{2 ** 32 + 2} are outside the 32-bit seed space")):
        assert run_cli(tool.main, [*argv, "--replicate", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --replicate") and message in err[0], err
    assert run_cli(tool.main, [*argv, "--target-effect", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --target-effect must be a positive number, got -1.0"
    assert not (out / "replication").exists()

    assert run_cli(tool.main, [*argv, "--replicate", "2"]) == 0
    replicated = sorted(p.name for p in (out / "replication" / "cells").iterdir())
    assert replicated == ["init__t__freeze0__seed3", "init__t__freeze0__seed4",
                          "scratch__t__freeze0__seed3", "scratch__t__freeze0__seed4"]  # the contrast's cells only
    # init − scratch per seed: 5 + (7 s mod 5): original 5, 7, 9 (mean 7, sd 2); new (s = 3, 4) 6, 8 (mean 7,
    # sd sqrt 2, n 2: t(0.975, 1) = 12.706 -> +7 ± 12.7, contains 0); pooled 5..9 (sd sqrt 2.5, n 5: t = 2.776)
    with open(out / "replication" / "replication.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["contrast"], row["original_n"], row["new_n"], row["pooled_n"]) == ("init − scratch", "3", "2", "5")
    assert float(row["new_mean"]) == 7.0 and float(row["new_low"]) == pytest.approx(7 - 12.706, abs=1e-3)
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert float(row["pooled_low"]) == pytest.approx(7 - half, abs=1e-3)
    assert row["sign_agrees"] == "True" and row["replicated"] == "False"
    md = (out / "replication" / "replication.md").read_text()
    assert "fresh fine-tuning seeds 3, 4 (the original ran seeds 0, 1, 2)" in md
    assert ("| init − scratch | t score | 4 (all) | +7.0±2.0 [+2.0, +12.0] (n=3) | +7.0±1.4 [-5.7, +19.7] (n=2) "
            "| yes |") in md and md.rstrip().endswith("| no |")
    study = load_study(spec_file, out)
    with pytest.raises(MaeTransferError, match="declares no contrasts"):
        replication_study(load_study({**dict(depth=4, freeze_blocks=[0], backbones={"a": None}, tasks={
            "t": noisy_task(tmp_path)})}), 1)
    assert replication_study(study, 2).seeds == [3, 4]
    # a second replication starts after every seed used so far, in its own folder; the first one is left alone
    second = replication_study(study, 2, first_seed=5)
    assert second.seeds == [5, 6] and second.output_dir == out / "replication_from_seed5"
    with pytest.raises(MaeTransferError) as err:
        replication_study(study, 2, first_seed=2)
    assert str(err.value) == "--first-seed 2: a replication's seeds must be fresh, above the study's seeds (largest 2)"
    assert run_cli(tool.main, [*argv, "--first-seed", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --first-seed goes with --replicate N (where the fresh seeds start)")
    assert run_cli(tool.main, [*argv, "--replicate", "1", "--first-seed", "5"]) == 0
    assert sorted(p.name for p in (out / "replication_from_seed5" / "cells").iterdir()) == [
        "init__t__freeze0__seed5", "scratch__t__freeze0__seed5"]
    assert "fresh fine-tuning seeds 5 (the original ran seeds 0, 1, 2)" in (
        out / "replication_from_seed5" / "replication.md").read_text()
    assert sorted(p.name for p in (out / "replication" / "cells").iterdir()) == replicated
    for n, first, message in ((3, None, f"--replicate 3: fresh seeds 3..5 overlap seeds 5..5 of the replication in "
                                        f"{out / 'replication_from_seed5'}; start above them (--first-seed 6)"),
                              (2, 4, f"--replicate 2: fresh seeds 4..5 overlap seeds 3..4 of the replication in "
                                     f"{out / 'replication'}; start above them (--first-seed 5)")):
        with pytest.raises(MaeTransferError) as err:
            replication_study(study, n, first)
        assert str(err.value) == message


def test_a_holm_rejection_whose_simultaneous_interval_contains_0_is_not_claimed(tmp_path: Path) -> None:
    """Holm rejects the second contrast (p 0.035 <= 0.05 after the first), but its Bonferroni interval,
    3 ± t(1 - 0.05/4, 2) / sqrt(3) = [-0.58, +6.6], contains 0: the row says so and is not bold."""
    study = load_study(dict(name="h", depth=4, freeze_blocks=[0, 2], seeds=[0, 1, 2], reference="scratch",
                            backbones={"MAE": None, "scratch": None}, tasks={"seg": SEG},
                            contrasts=[dict(a="MAE", b="scratch", task="seg", freeze=[0, 2])]), tmp_path / "out")
    write_cells(study, {("MAE", 0): [50.0, 52.0, 57.0], ("scratch", 0): [40.0, 41.0, 45.0],  # diffs 10, 11, 12
                        ("MAE", 2): [32.0, 34.0, 36.0], ("scratch", 2): [30.0, 31.0, 32.0]})  # diffs 2, 3, 4
    md = results_markdown(study, collect(study))
    p_small = t2_two_sided_p(3 / (1 / math.sqrt(3)))
    assert p_small == pytest.approx(0.035, abs=0.001)
    row = next(line for line in md.splitlines() if line.startswith("| MAE − scratch | seg mIoU | 2 |"))
    assert "| [-0.58, +6.6] |" in row and f"| {p_small:.2f} | {p_small:.2f} |" in row
    assert row.endswith("| not claimed: Holm p <= 0.05, but the simultaneous interval contains 0 |")
    assert md.count("**MAE above scratch**") == 1  # the first contrast only


def test_the_freeze_axis_is_reported_per_backbone_against_the_frozen_vit(tmp_path: Path) -> None:
    study = load_study(dict(name="f", depth=4, freeze_blocks=[0, -1], seeds=[0, 1, 2], reference="scratch",
                            backbones={"MAE": None, "scratch": None}, tasks={"seg": SEG}), tmp_path / "out")
    write_cells(study, {("MAE", 0): [50.0, 52.0, 57.0], ("MAE", -1): [40.0, 41.0, 45.0],  # all - frozen 10, 11, 12
                        ("scratch", 0): [30.0, 31.0, 30.0], ("scratch", -1): [31.0, 30.0, 33.0]})  # -1, 1, -3
    md = results_markdown(study, collect(study))
    p_big, p_small = t2_two_sided_p(11 * math.sqrt(3)), t2_two_sided_p(1 / (2 / math.sqrt(3)))
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2)
    assert "## Blocks fine-tuned − frozen ViT (exploratory)" in md
    assert (f"| MAE | mIoU | 4 (all) | +11.0±1.0 | 3 | [+{11 - half:.1f}, +{11 + half:.1f}] | "
            f"{p_big:.2g} | {2 * p_big:.2g} |") in md
    assert f"| scratch | mIoU | 4 (all) | -1.0±2.0 | 3 | [-6.0, +4.0] | {p_small:.2f} | {p_small:.2f} |" in md

def test_the_demo_mini_study_says_what_its_n_can_establish(tmp_path: Path) -> None:
    from harnesses import demo

    study = load_study(dict(depth=4, freeze_blocks=[0, -1], seeds=[0, 1, 2], reference="scratch",
                            backbones={"MAE": None, "scratch": None}, tasks={"seg": SEG}))
    two = [dict(backbone=b, task="seg", freeze_blocks=f, seed=s, mIoU=50.0 + s * (b == "MAE"))
           for b in ("MAE", "scratch") for f in (0, -1) for s in (0, 1)]
    assert demo.evidence_note(study, two) == (
        "n = 2 fine-tuning seed(s) per setting: n = 2 cannot establish an effect (a 95% interval is the mean ± "
        "t(0.975, 1) = 12.7 x sd / sqrt(2)); the differences above show the study runner at work, not evidence "
        "about MAE.")
    three = two + [dict(backbone=b, task="seg", freeze_blocks=f, seed=2, mIoU=50.0 + 2 * (b == "MAE"))
                   for b in ("MAE", "scratch") for f in (0, -1)]
    assert demo.evidence_note(study, three).startswith("n = 3 pairs per setting; the brackets are 95% t-intervals")
    assert "[" in demo.difference_line(study, three)  # the interval itself, from 3 pairs
    assert demo.evidence_note(study, []) == "No paired difference finished: nothing to read."


def test_dry_run_refuses_a_bad_contrast_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec_file = tmp_path / "spec.py"
    spec_file.write_text("depth = 4\nfreeze_blocks = [0, -1]\nbackbones = {'MAE': None, 'scratch': None}\n"
                         f"tasks = {{'seg': {SEG!r}}}\n"
                         "contrasts = [dict(a='MAE', b='scratch', task='seg', freeze=[2])]\n")
    assert run_cli(_tool().main, ["--spec", str(spec_file), "--output-dir", str(tmp_path / "out"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {spec_file}: contrasts[0]: freeze [2] not among the spec's freeze_blocks [0, -1]"]
    assert not (tmp_path / "out").exists()
