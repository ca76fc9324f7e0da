"""A study's results: `results.csv` (one row per finished cell), `results.md` (mean ± std over seeds per backbone
and blocks fine-tuned, and the difference to a reference backbone) and `plot.png`, all from the cells' done markers
and written atomically. Metric labels and length units come from the task kinds (mae_transfer/task_kinds.py)."""
from __future__ import annotations

import csv
import io
import math
import textwrap
from pathlib import Path
from typing import Any

from mae_transfer.io import atomic_write, atomic_write_text
from mae_transfer.study.claims import (
    confirmatory_markdown,
    exploratory_markdown,
    fine_tuning_depth_markdown,
    pretraining_markdown,
)
from mae_transfer.study.spec import Study
from mae_transfer.study.tables import (
    collect,
    differences,
    fmt_spread,
    freeze_label,
    freeze_order,
    metric_columns,
    summarise,
)


def _n_label(counts: list[int]) -> str:
    return "-" if not counts else str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _task_summary(study: Study) -> str:
    return "; ".join(f"`{t}` = {s['kind']} with `{Path(s['config']).name}`, {s['iters']} "
                     f"{study.kind(t).length_unit}" for t, s in study.tasks.items())


def results_markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    stats = summarise(study, rows)
    cols = metric_columns(study)
    freezes = freeze_order(study)
    seeds = len(study.seeds)
    metrics = " / ".join(label for _, _, label in cols)
    header = "| backbone | " + " | ".join(freeze_label(study, f) for f in freezes) + " | n |"
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
                parts.append(fmt_spread(s[0], s[1], s[2] > 1))
                counts.append(s[2])
                if s[2] < seeds:
                    short.append(f"{backbone} {label} at {freeze_label(study, f)} (n={s[2]})")
            cells.append(" / ".join(parts))
        lines.append(f"| {backbone} | " + " | ".join(cells) + f" | {_n_label(counts)} |")
    if short:
        lines += ["", f"Fewer than {seeds} seeds: " + "; ".join(short) + "."]
    lines += pretraining_markdown(study, rows)
    lines += exploratory_markdown(study, rows)
    lines += fine_tuning_depth_markdown(study, rows)
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
        "| backbone | metric | " + " | ".join(freeze_label(study, f) for f in freezes) + " |",
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
    metrics = [m for _, m, _ in metric_columns(study)]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(study, rows)
    cols = metric_columns(study)
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
