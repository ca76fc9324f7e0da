"""A study's finished cells as numbers and their formatting, shared by the results (`report`) and the claims
(`claims`): the rows of the cells' done markers (`collect`), per-seed values, mean ± std per cell (`summarise`),
paired differences to a reference backbone, the metric columns and the blocks-fine-tuned order and labels."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from mae_transfer.study.spec import DONE, Study


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


def metric_columns(study: Study) -> list[tuple[str, str, str]]:
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
    """Fine-tuning seed -> value of a spec backbone. A backbone with pretraining seeds: crossed, the mean over its
    pretraining runs, for the fine-tuning seeds every run finished; paired, the value of the one run each seed
    fine-tuned (claims about it use all its runs)."""
    runs = [per_seed(rows, member, task, metric, freeze) for member in study.members(backbone)]
    if len(runs) == 1:
        return runs[0]
    if backbone in study.paired:
        return {s: v for run in runs for s, v in sorted(run.items())}
    common = set.intersection(*(set(r) for r in runs))
    return {s: sum(r[s] for r in runs) / len(runs) for s in sorted(common)}


def summarise(study: Study, rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], tuple[float, float, int]]:
    """(backbone, task, metric, freeze) -> (mean over seeds, sample std, number of seeds with a value)."""
    out = {}
    for backbone in study.backbones:
        for task, metric, _ in metric_columns(study):
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
        out = fmt_spread(self.mean, self.std, self.n > 1 or not self.paired, "+") + ("" if self.paired else "†")
        if self.ci95 is not None:
            out += f" [{fmt_value(self.ci95[0], '+')}, {fmt_value(self.ci95[1], '+')}]" + (
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
        for task, metric, _ in metric_columns(study):
            for freeze in study.freeze_blocks:
                d = paired_difference(*(backbone_per_seed(study, rows, name, task, metric, freeze)
                                        for name in (backbone, ref)))
                if d is not None:
                    out[(backbone, task, metric, freeze)] = d
    return out


def freeze_order(study: Study) -> list[int]:
    """Columns from the most blocks fine-tuned to none (linear probe last), as in the MAE paper's table."""
    return sorted(study.freeze_blocks, key=lambda f: (study.blocks_tuned(f), f < 0), reverse=True)


def freeze_label(study: Study, freeze: int) -> str:
    n = study.blocks_tuned(freeze)
    if freeze < 0:
        return "0 (frozen ViT)"
    return f"{n} (all)" if n == study.depth else str(n)


def fmt_value(value: float, sign: str = "") -> str:
    """One decimal as in the MAE paper; two below 1 (short CPU runs) so small numbers stay comparable."""
    return f"{value:{sign}.1f}" if abs(value) >= 1 else f"{value:{sign}.2f}"


def fmt_spread(mean: float, std: float, spread: bool, sign: str = "") -> str:
    """mean±std, the std with the mean's decimals; without the ± when there is no spread to show (one seed)."""
    if not spread:
        return fmt_value(mean, sign)
    return fmt_value(mean, sign) + (f"±{std:.1f}" if abs(mean) >= 1 else f"±{std:.2f}")
