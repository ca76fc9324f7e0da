"""A study's results: `results.csv` (one row per finished cell), `results.md` (mean ± std over seeds per backbone
and blocks fine-tuned, and the difference to a reference backbone) and `plot.png`, all from the cells' done markers
and written atomically. Metric labels and length units come from the task kinds (mae_transfer/task_kinds.py)."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae_transfer.io import atomic_write, atomic_write_text
from mae_transfer.study_spec import DONE, Study


def collect(study: Study) -> list[dict[str, Any]]:
    """One row per finished cell of this spec (read from the done markers)."""
    rows = []
    for cell in study.cells():
        path = study.cell_dir(cell) / DONE
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        rows.append({"backbone": cell.backbone, "task": cell.task, "kind": study.tasks[cell.task]["kind"],
                     "freeze_blocks": cell.freeze_blocks, "blocks_tuned": study.blocks_tuned(cell.freeze_blocks),
                     "seed": cell.seed, **record["metrics"], "seconds": record.get("seconds", ""),
                     "cell_dir": str(study.cell_dir(cell))})
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _mean(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the finite values."""
    values = [v for v in values if _finite(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _metric_columns(study: Study) -> list[tuple[str, str, str]]:
    """(task, metric key, label) in task order; the task name joins the label when a kind repeats."""
    kinds = [t["kind"] for t in study.tasks.values()]
    cols = []
    for task, spec in study.tasks.items():
        for metric in study.metrics_of(task):
            label = study.kind(task).metric(metric).label
            label = label if kinds.count(spec["kind"]) == 1 else f"{task} {label}"
            cols.append((task, metric, label))
    return cols


def per_seed(rows: list[dict[str, Any]], backbone: str, task: str, metric: str, freeze: int) -> dict[int, float]:
    """seed -> value of one (backbone, task, metric, freeze), finite values only."""
    return {r["seed"]: r[metric] for r in rows
            if (r["backbone"], r["task"], r["freeze_blocks"]) == (backbone, task, freeze) and _finite(r.get(metric))}


def backbone_per_seed(study: Study, rows: list[dict[str, Any]], backbone: str, task: str, metric: str,
                      freeze: int) -> dict[int, float]:
    """Fine-tuning seed -> value of a spec backbone. A backbone with pretraining seeds: the mean over its
    pretraining runs, for the fine-tuning seeds every run finished (claims about it use all its runs)."""
    runs = [per_seed(rows, member, task, metric, freeze) for member in study.members(backbone)]
    if len(runs) == 1:
        return runs[0]
    common = set.intersection(*(set(r) for r in runs))
    return {s: sum(r[s] for r in runs) / len(runs) for s in sorted(common)}


def summarise(study: Study, rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], tuple[float, float, int]]:
    """(backbone, task, metric, freeze) -> (mean over seeds, sample std, number of seeds with a value)."""
    out = {}
    for backbone in study.backbones:
        for task, metric, _ in _metric_columns(study):
            for freeze in study.freeze_blocks:
                values = per_seed(rows, backbone, task, metric, freeze)
                if values:
                    out[(backbone, task, metric, freeze)] = (*_mean(list(values.values())), len(values))
    return out


@dataclass(frozen=True)
class Difference:
    """a - b for one (task, metric, freeze). Paired (both finished the same seeds): mean and sample std of the
    per-seed differences, n pairs, and for n >= 3 the 95% t-interval of the mean difference. Unpaired: difference
    of the means, spread sqrt(std_a^2 + std_b^2) (the std of a difference of two independent runs, comparable to
    the paired spread), n = min(n_a, n_b), no interval."""

    mean: float
    std: float
    n: int
    paired: bool
    ci95: tuple[float, float] | None = None

    @property
    def within_noise(self) -> bool | None:
        """Whether the 95% interval contains 0 (None without an interval)."""
        return None if self.ci95 is None else self.ci95[0] <= 0 <= self.ci95[1]

    def text(self) -> str:
        """`+1.2±0.8 [-0.5, +2.9] within noise (n=3)`: mean ± std, the interval and what it says, n."""
        out = _fmt_spread(self.mean, self.std, self.n > 1 or not self.paired, "+") + ("" if self.paired else "†")
        if self.ci95 is not None:
            out += f" [{_fmt(self.ci95[0], '+')}, {_fmt(self.ci95[1], '+')}]" + (
                " within noise" if self.within_noise else "")
        return f"{out} (n={self.n})"


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Difference | None:
    """a - b from two seed -> value maps: paired over the seeds both have when they have the same seeds, else the
    difference of the means (see Difference); None when either is empty."""
    if not a or not b:
        return None
    if set(a) == set(b):
        diffs = [a[s] - b[s] for s in a]
        mean, std = _mean(diffs)
        ci = None
        if len(diffs) >= 3:
            from scipy.stats import t

            half = float(t.ppf(0.975, len(diffs) - 1)) * std / math.sqrt(len(diffs))
            ci = (mean - half, mean + half)
        return Difference(mean, std, len(diffs), True, ci)
    (mean_a, std_a), (mean_b, std_b) = _mean(list(a.values())), _mean(list(b.values()))
    return Difference(mean_a - mean_b, math.hypot(std_a, std_b), min(len(a), len(b)), False)


def differences(study: Study, rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], Difference]:
    """(backbone, task, metric, freeze) -> Difference against study.reference, for every other backbone whose
    cell and the reference's cell both have values; {} without a reference."""
    ref = study.reference
    if ref is None:
        return {}
    out = {}
    for backbone in study.spec_backbones():
        if backbone == ref:
            continue
        for task, metric, _ in _metric_columns(study):
            for freeze in study.freeze_blocks:
                d = paired_difference(*(backbone_per_seed(study, rows, name, task, metric, freeze)
                                        for name in (backbone, ref)))
                if d is not None:
                    out[(backbone, task, metric, freeze)] = d
    return out


def _freeze_order(study: Study) -> list[int]:
    """Columns from the most blocks fine-tuned to none (linear probe last), as in the MAE paper's table."""
    return sorted(study.freeze_blocks, key=lambda f: (study.blocks_tuned(f), f < 0), reverse=True)


def _freeze_label(study: Study, freeze: int) -> str:
    n = study.blocks_tuned(freeze)
    if freeze < 0:
        return "0 (frozen ViT)"
    return f"{n} (all)" if n == study.depth else str(n)


def _fmt(value: float, sign: str = "") -> str:
    """One decimal as in the MAE paper; two below 1 (short CPU runs) so small numbers stay comparable."""
    return f"{value:{sign}.1f}" if abs(value) >= 1 else f"{value:{sign}.2f}"


def _fmt_spread(mean: float, std: float, spread: bool, sign: str = "") -> str:
    """mean±std, the std with the mean's decimals; without the ± when there is no spread to show (one seed)."""
    if not spread:
        return _fmt(mean, sign)
    return _fmt(mean, sign) + (f"±{std:.1f}" if abs(mean) >= 1 else f"±{std:.2f}")


def _n_label(counts: list[int]) -> str:
    return "-" if not counts else str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _task_summary(study: Study) -> str:
    return "; ".join(f"`{t}` = {s['kind']} with `{Path(s['config']).name}`, {s['iters']} "
                     f"{study.kind(t).length_unit}" for t, s in study.tasks.items())


def results_markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    # the claims' sections build on this module's tables (study_claims imports it)
    from mae_transfer.study_claims import confirmatory_markdown, exploratory_markdown, pretraining_markdown

    stats = summarise(study, rows)
    cols = _metric_columns(study)
    freezes = _freeze_order(study)
    seeds = len(study.seeds)
    metrics = " / ".join(label for _, _, label in cols)
    header = "| backbone | " + " | ".join(_freeze_label(study, f) for f in freezes) + " | n |"
    rule = "|---|" + "---|" * (len(freezes) + 1)
    lines = [
        f"# Study `{study.name}`",
        "",
        f"Blocks fine-tuned (of {study.depth}; `freeze_blocks` = {study.depth} - n, "
        "0 (frozen ViT) = `freeze_blocks=-1`). "
        f"Each cell: {metrics}, mean ± std over the seeds that finished (sample std; no ± for one seed); "
        f"n = seeds per cell ({seeds} in the spec: {', '.join(map(str, study.seeds))}); `-` = not run / failed.",
        *confirmatory_markdown(study, rows),
        "",
        "## All cells",
        "",
        header,
        rule,
    ]
    short = []  # cells with fewer seeds than the spec, named below the table
    for backbone in study.backbones:
        cells, counts = [], []
        for f in freezes:
            parts = []
            for task, metric, label in cols:
                s = stats.get((backbone, task, metric, f))
                if s is None or math.isnan(s[0]):
                    parts.append("-")
                    continue
                parts.append(_fmt_spread(s[0], s[1], s[2] > 1))
                counts.append(s[2])
                if s[2] < seeds:
                    short.append(f"{backbone} {label} at {_freeze_label(study, f)} (n={s[2]})")
            cells.append(" / ".join(parts))
        lines.append(f"| {backbone} | " + " | ".join(cells) + f" | {_n_label(counts)} |")
    if short:
        lines += ["", f"Fewer than {seeds} seeds: " + "; ".join(short) + "."]
    lines += pretraining_markdown(study, rows)
    lines += exploratory_markdown(study, rows)
    lines += _difference_markdown(study, rows, cols, freezes)
    lines += ["", f"Tasks: {_task_summary(study)}",
              f"Finished cells: {len(rows)} of {len(study.cells())}. Per-cell numbers: results.csv; figure: plot.png.",
              ""]
    return "\n".join(lines)


def _difference_markdown(study: Study, rows: list[dict[str, Any]], cols: list[tuple[str, str, str]],
                         freezes: list[int]) -> list[str]:
    """The table of backbone - reference (spec key `reference`), one row per backbone and metric, with how its
    spread and interval are computed."""
    ref = study.reference
    if ref is None or len(study.spec_backbones()) < 2:
        return []
    diffs = differences(study, rows)
    lines = [
        "",
        f"### Difference to `{ref}`",
        "",
        f"Each cell: backbone − {ref} per task, metric and blocks fine-tuned. Paired by seed when both finished "
        "the same seeds: mean ± sample std of the per-seed differences, then for n >= 3 pairs the 95% t-interval "
        "of the mean difference in brackets, \"within noise\" when it contains 0; (n=...) pairs. † = the seeds "
        "differ: difference of the means ± sqrt(std_a² + std_b²), n = the smaller seed count, no interval. "
        "Descriptive, every backbone (declared contrasts included): these intervals are per comparison, not "
        "adjusted for the others (the adjusted readings are above).",
        "",
        "| backbone | metric | " + " | ".join(_freeze_label(study, f) for f in freezes) + " |",
        "|---|---|" + "---|" * len(freezes),
    ]
    for backbone in study.spec_backbones():
        if backbone == ref:
            continue
        for task, metric, label in cols:
            cells = [diffs[key].text() if (key := (backbone, task, metric, f)) in diffs
                     and not math.isnan(diffs[key].mean) else "-" for f in freezes]
            lines.append(f"| {backbone} − {ref} | {label} | " + " | ".join(cells) + " |")
    return lines


def write_csv(study: Study, rows: list[dict[str, Any]]) -> Path:
    metrics = [m for _, m, _ in _metric_columns(study)]
    fields = ["backbone", "task", "kind", "freeze_blocks", "blocks_tuned", "seed",
              *dict.fromkeys(metrics), "seconds", "cell_dir"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(buf.getvalue(), study.output_dir / "results.csv")


def plot_caption(study: Study, rows: list[dict[str, Any]]) -> str:
    """What the figure shows: every task's metrics, length and config, and the seeds behind each point."""
    tasks = "; ".join(
        f"{t}: {' / '.join(m.label for m in study.kind(t).metrics)} after {s['iters']} "
        f"{study.kind(t).length_unit} ({Path(s['config']).name})"
        for t, s in study.tasks.items())
    counts = [n for _, _, n in summarise(study, rows).values()]
    seeds = ", ".join(map(str, study.seeds))
    if len(study.seeds) == 1:
        points = f"one seed ({seeds}) per point, so no error bars"
    else:
        n = _n_label(counts)
        points = (f"mean over seeds {seeds} (n = {n} per point); error bars: sample std over seeds")
    return f"{tasks}. Points: {points}. x: ViT blocks fine-tuned (of {study.depth}); 0 = frozen ViT."


def write_plot(study: Study, rows: list[dict[str, Any]]) -> Path:
    """One panel per metric: mean metric vs blocks fine-tuned, one line per backbone (MAE paper, Fig. 9), error bars
    the std over seeds, and a caption under the panels (tasks, metrics, iterations, seeds).
    freeze_blocks=-1 sits at 0 blocks; when freeze_blocks=depth is also run it is drawn as an unjoined square."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(study, rows)
    cols = _metric_columns(study)
    width = 4.2 * len(cols)
    caption = textwrap.fill(plot_caption(study, rows), width=int(width * 14))
    caption_h = 0.15 * (caption.count("\n") + 1) + 0.1  # inches of 8-pt text lines
    fig, axes = plt.subplots(1, len(cols), figsize=(width, 3.6 + caption_h), squeeze=False)
    for ax, (task, metric, _label) in zip(axes[0], cols, strict=False):
        for i, backbone in enumerate(study.backbones):
            color = f"C{i}"
            pts = {f: stats[(backbone, task, metric, f)] for f in study.freeze_blocks
                   if (backbone, task, metric, f) in stats and not math.isnan(stats[(backbone, task, metric, f)][0])}
            # one seed has no spread: a zero-length bar would still draw its caps across the marker
            bars = any(n > 1 for _, _, n in pts.values())
            separate = -1 in pts and study.depth in pts  # both at 0 blocks fine-tuned
            line = sorted((study.blocks_tuned(f), m, s) for f, (m, s, _) in pts.items() if not (separate and f < 0))
            if line:
                xs, ys, es = zip(*line, strict=False)
                ax.errorbar(xs, ys, yerr=es if bars else None, marker="o", color=color, label=backbone, capsize=3)
            if separate:
                ax.errorbar([0], [pts[-1][0]], yerr=[pts[-1][1]] if bars else None, marker="s", color=color,
                            markerfacecolor="none", linestyle="none", capsize=3)
        tex = study.kind(task).metric(metric).tex
        ax.set_title(f"{task}: {tex}")
        ax.set_xlabel("blocks fine-tuned")
        ax.set_ylabel(tex)
        ax.set_xticks(sorted({study.blocks_tuned(f) for f in study.freeze_blocks}))
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{study.name}: partial fine-tuning", fontsize=10)
    fig.text(0.01, 0.02, caption, ha="left", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, caption_h / (3.6 + caption_h), 1, 1))
    try:
        return atomic_write(study.output_dir / "plot.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def write_results(study: Study, plot: bool = True) -> dict[str, Path]:
    """results.csv, results.md (and plot.png) from the finished cells, all written atomically."""
    rows = collect(study)
    out = {"csv": write_csv(study, rows),
           "md": atomic_write_text(results_markdown(study, rows), study.output_dir / "results.md")}
    if plot:
        out["plot"] = write_plot(study, rows)
    return out
