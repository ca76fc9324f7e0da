"""What a study's results may claim, in results.md and the replication table.

- The contrasts declared in the spec (`contrasts=[...]`) are the confirmatory family: paired t-tests over the
  fine-tuning seeds, Holm-adjusted p-values, simultaneous (Bonferroni) 95% intervals, and the power the design had
  (the smallest difference detectable at 80% power; the pairs needed for `--target-effect`). The declaration is
  recorded in `OUTPUT/contrasts.json` when the study first runs, with how many cells had finished by then.
- Every other difference between backbones is the exploratory family, Holm-adjusted across itself, never in bold.
- A backbone with pretraining seeds: its value per fine-tuning seed is the mean over its pretraining runs (claims
  about it use all of them), and a nested decomposition shows the sd between runs beside the sd between seeds.
- `--replicate N` (`replication_study`, `write_replication`): the contrasts' cells with N fresh fine-tuning seeds.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text
from mae_transfer.study.spec import (
    SEED_LIMIT,
    Contrast,
    Study,
    backbone_checkpoint,
    pretrain_run_seed,
    seed_of_cell_dir,
)
from mae_transfer.study.stats import (
    POWER,
    PairedTest,
    bonferroni_interval,
    detectable_effect,
    holm,
    n_needed,
    paired_test,
    variance_components,
)
from mae_transfer.study.tables import (
    backbone_per_seed,
    collect,
    fmt_spread,
    fmt_value,
    freeze_label,
    freeze_order,
    metric_columns,
    per_seed,
)

ALPHA = 0.05  # family-wise error rate of each family; intervals are simultaneous 95%
DECLARED = "contrasts.json"
REPLICATION = "replication"


@dataclass(frozen=True)
class Comparison:
    """One difference a - b with its paired test and its p-value adjusted within its family (None: no test)."""

    contrast: Contrast
    test: PairedTest
    p_holm: float | None


def paired_differences(study: Study, rows: list[dict[str, Any]], c: Contrast) -> list[float]:
    """a - b per fine-tuning seed both finished (a backbone with pretraining seeds: the mean over its runs)."""
    a, b = (backbone_per_seed(study, rows, name, c.task, c.metric, c.freeze) for name in (c.a, c.b))
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def compare(study: Study, rows: list[dict[str, Any]], family: list[Contrast]) -> list[Comparison]:
    """Paired tests of a family, Holm-adjusted over all of its members (one without a test counts as p = 1)."""
    tests = [paired_test(paired_differences(study, rows, c)) for c in family]
    adjusted = holm([1.0 if t.p is None else t.p for t in tests])
    return [Comparison(c, t, None if t.p is None else p) for c, t, p in zip(family, tests, adjusted, strict=True)]


def exploratory_family(study: Study) -> list[Contrast]:
    """Every difference between two of the spec's backbones (per task metric and freeze setting) that is not a
    declared contrast: `backbone - reference` where the pair holds the reference, else in spec order."""
    declared = {(c.a, c.b, c.task, c.metric, c.freeze) for c in study.contrasts}
    declared |= {(b, a, t, m, f) for a, b, t, m, f in declared}
    names = study.spec_backbones()
    out = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = (second, first) if first == study.reference else (first, second)
            out += [Contrast(a, b, task, metric, freeze) for task, metric, _ in metric_columns(study)
                    for freeze in freeze_order(study) if (a, b, task, metric, freeze) not in declared]
    return out


def _p(p: float | None) -> str:
    return "-" if p is None else "<0.0001" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def _interval(interval: tuple[float, float] | None) -> str:
    return "-" if interval is None else f"[{fmt_value(interval[0], '+')}, {fmt_value(interval[1], '+')}]"


def _estimate(test: PairedTest) -> str:
    return "-" if test.n == 0 else fmt_spread(test.mean, test.sd, test.n > 1, "+")


def _where(study: Study, c: Contrast) -> tuple[str, str]:
    """(metric label, blocks fine-tuned) of a contrast's cells."""
    return f"{c.task} {study.kind(c.task).metric(c.metric).label}", freeze_label(study, c.freeze)


def _reading(c: Contrast, comp: Comparison, detectable: float | None, interval: tuple[float, float] | None) -> str:
    """What a confirmatory row says: a claim (bold) only where its Holm-adjusted p is below ALPHA and its
    simultaneous interval excludes 0. Holm rejects more than Bonferroni's intervals exclude: such a row says so and
    claims nothing, since its corrected interval does not bound the difference away from 0."""
    if comp.p_holm is None:
        return f"no test (n={comp.test.n})"
    if comp.p_holm <= ALPHA:
        if interval is not None and (interval[0] > 0 or interval[1] < 0):
            return f"**{c.a} {'above' if comp.test.mean > 0 else 'below'} {c.b}**"
        return f"not claimed: Holm p <= {ALPHA}, but the simultaneous interval contains 0"
    return "within noise" + ("" if detectable is None else f"; detectable at 80% power: >= {fmt_value(detectable)}")


def confirmatory_markdown(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """The declared contrasts first: estimate, simultaneous interval, p, Holm p, the power the design had."""
    if not study.contrasts:
        return ["", "No contrasts declared in the spec (`contrasts=[...]`): every difference below is exploratory."]
    m = len(study.contrasts)
    alpha = ALPHA / m
    target = study.target_effect
    lines = [
        "", f"## Primary contrasts (confirmatory, {m} declared in the spec)", "", declaration_note(study), "",
        f"a − b paired by fine-tuning seed: mean ± sample sd of the differences, n pairs; interval: simultaneous "
        f"95% (Bonferroni: each a t-interval at 1 − {ALPHA}/{m}); p: two-sided paired t-test; Holm p: adjusted "
        f"across these {m} (a contrast without a test counts as p = 1). A row is a claim (bold) only where its Holm "
        f"p <= {ALPHA} and its simultaneous interval excludes 0. Detectable: the smallest difference a two-sided "
        f"paired t-test at alpha = {ALPHA}/{m} finds with {POWER:.0%} power at this n and the observed sd of the "
        f"differences (noncentral t)"
        + (f"; n for ±{fmt_value(target)}: the pairs that test needs to find a difference of {fmt_value(target)} with "
           f"{POWER:.0%} power at that sd." if target else "."),
        "",
        "| contrast | metric | blocks fine-tuned | mean ± sd | n | simultaneous 95% interval | p | Holm p | "
        f"detectable at {POWER:.0%} power |" + (f" n for ±{fmt_value(target)} |" if target else "") + " reading |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if target else "") + "---|",
    ]
    for comp in compare(study, rows, study.contrasts):
        c, test = comp.contrast, comp.test
        detectable = detectable_effect(test.sd, test.n, alpha)
        metric, blocks = _where(study, c)
        interval = bonferroni_interval(test, m)
        cells = [f"{c.a} − {c.b}", metric, blocks, _estimate(test), str(test.n), _interval(interval), _p(test.p),
                 _p(comp.p_holm), "-" if detectable is None else f">= {fmt_value(detectable)}"]
        if target:
            needed = n_needed(target, test.sd, alpha) if test.n >= 2 else None
            cells.append("-" if needed is None else str(needed))
        lines.append("| " + " | ".join([*cells, _reading(c, comp, detectable, interval)]) + " |")
    return lines


def exploratory_markdown(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """Every other difference between backbones, Holm-adjusted across its own family; no claims, no bold."""
    family = [comp for comp in compare(study, rows, exploratory_family(study)) if comp.test.n > 0]
    lines = ["", "## Exploratory differences", ""]
    if not family:
        return [*lines, "None finished (or a single backbone)."]
    lines += [
        f"Every other difference between backbones ({len(family)} with a finished pair), Holm-adjusted across "
        f"this family of its own (a difference without a test counts as p = 1). Exploratory: they suggest what a "
        f"later study could declare as a contrast, they establish nothing here.",
        "",
        "| difference | metric | blocks fine-tuned | mean ± sd | n | p | Holm p |",
        "|---|---|---|---|---|---|---|",
    ]
    for comp in family:
        metric, blocks = _where(study, comp.contrast)
        lines.append(f"| {comp.contrast.a} − {comp.contrast.b} | {metric} | {blocks} | {_estimate(comp.test)} | "
                     f"{comp.test.n} | {_p(comp.test.p)} | {_p(comp.p_holm)} |")
    return lines


def fine_tuning_depth_markdown(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """The freeze axis: each setting that fine-tunes blocks − the frozen ViT, per backbone, paired by fine-tuning
    seed; its own exploratory family, Holm-adjusted. Only when the spec runs a frozen ViT (freeze_blocks=-1)."""
    tuned = [f for f in freeze_order(study) if f >= 0 and study.blocks_tuned(f) > 0]
    if -1 not in study.freeze_blocks or not tuned:
        return []
    tests = []
    for b in study.spec_backbones():
        for task, metric, label in metric_columns(study):
            frozen = backbone_per_seed(study, rows, b, task, metric, -1)
            for f in tuned:
                values = backbone_per_seed(study, rows, b, task, metric, f)
                diffs = [values[s] - frozen[s] for s in sorted(set(values) & set(frozen))]
                if diffs:
                    tests.append((b, label, freeze_label(study, f), paired_test(diffs)))
    if not tests:
        return []
    adjusted = holm([1.0 if t.p is None else t.p for *_, t in tests])
    lines = ["", "## Blocks fine-tuned − frozen ViT (exploratory)", "",
             f"Per backbone, fine-tuning blocks − the frozen ViT, paired by fine-tuning seed ({len(tests)} "
             "differences, Holm-adjusted across these). They show whether the schedule trains the backbone at all: "
             "where these are within noise, the freeze axis has nothing to compare.", "",
             "| backbone | metric | blocks fine-tuned | − frozen: mean ± sd | n | 95% interval | p | Holm p |",
             "|---|---|---|---|---|---|---|---|"]
    for (b, label, blocks, test), p_holm in zip(tests, adjusted, strict=True):
        lines.append(f"| {b} | {label} | {blocks} | {_estimate(test)} | {test.n} | "
                     f"{_interval(test.interval(ALPHA))} | {_p(test.p)} | {_p(None if test.p is None else p_holm)} |")
    return lines


def pretraining_markdown(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """Backbones with pretraining seeds: how their cells cross, how claims use the runs, and the nested variance."""
    seeded = [b for b in study.spec_backbones() if any(m in study.pretrain_runs for m in study.members(b))]
    if not seeded:
        return []
    lines = ["", "## Pretraining runs", ""]
    for b in seeded:
        runs = [pretrain_run_seed(m) for m in study.members(b)]  # a replication's entries are checkpoint files
        if b in study.paired:
            lines.append(f"- `{b}`: {len(runs)} pretraining run(s) (pretraining seeds {', '.join(map(str, runs))}), "
                         f"paired with the fine-tuning seeds: the i-th fine-tuning seed fine-tunes run i mod "
                         f"{len(runs)} ({len(study.seeds)} cells per task and freeze setting; the table above has a "
                         "row per run).")
        else:
            lines.append(f"- `{b}`: {len(runs)} pretraining run(s) (pretraining seeds {', '.join(map(str, runs))}), "
                         f"each fine-tuned with every fine-tuning seed (crossed: {len(runs)} x {len(study.seeds)} "
                         "cells per task and freeze setting; the table above has a row per run).")
    if any(b not in study.paired for b in seeded):
        lines += ["", "Crossed: claims about such a backbone (contrasts, differences) use all its runs: its value for "
                  "a fine-tuning seed is the mean over its pretraining runs (seeds every run finished), then "
                  "differences are paired by fine-tuning seed. Those intervals hold these runs fixed: the sd between "
                  "pretraining runs below is not in them, so a difference no larger than it says little about the "
                  "pretraining method itself."]
    if any(b in study.paired for b in seeded):
        lines += ["", "Paired: each fine-tuning seed's value comes from its own pretraining run, so the differences "
                  "(paired by fine-tuning seed) vary with the pretraining run as well as with the fine-tuning seed, "
                  "and their intervals include the between-run sd below. With fewer runs than seeds, seeds sharing a "
                  "run are not independent: when the between-run sd is large, read the intervals as too narrow."]
    table = []
    for b in seeded:
        for task, metric, label in metric_columns(study):
            for freeze in freeze_order(study):
                values = [per_seed(rows, m, task, metric, freeze) for m in study.members(b)]
                if b in study.paired:
                    groups = [list(v.values()) for v in values]
                else:
                    common = sorted(set.intersection(*(set(v) for v in values)))
                    groups = [[v[s] for s in common] for v in values]
                parts = variance_components(groups)
                if parts is not None:
                    table.append(f"| {b} | {label} | {freeze_label(study, freeze)} | {parts.sd_between:.2f} | "
                                 f"{parts.sd_within:.2f} | {parts.layout} |")
    if not table:
        return [*lines, "", "No decomposition: it needs at least 2 runs and more values than runs."]
    return [
        *lines,
        "",
        "Decomposition (one-way random effects, fine-tuning seeds nested in pretraining runs; crossed: over the seeds "
        "every run finished): sd within = pooled sd between fine-tuning seeds of one run; sd between = "
        "sqrt(max(0, (MS_between − MS_within) / n0)), n0 the (average) seeds per run.",
        "",
        "| backbone | metric | blocks fine-tuned | sd between pretraining runs | sd between fine-tuning seeds | "
        "runs x seeds |",
        "|---|---|---|---|---|---|",
        *table,
    ]


# ---------------------------------------------------------------------------------------------- declaration
def record_contrasts(study: Study) -> dict[str, Any] | None:
    """`OUTPUT/contrasts.json`: the spec's contrasts when the study runs, with the time and how many cells had
    finished then (0: declared before any result was seen). A changed declaration is recorded anew, the earlier
    ones kept under `earlier`. Nothing is written for a spec without contrasts and no earlier record."""
    path = study.output_dir / DECLARED
    old = json.loads(path.read_text()) if path.is_file() else None
    now = [asdict(c) for c in study.contrasts]
    if (old is None and not now) or (old is not None and old["contrasts"] == now):
        return old
    record = {"contrasts": now, "declared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "finished_cells": len(collect(study)),
              "earlier": [] if old is None else [*old.get("earlier", []), {k: v for k, v in old.items()
                                                                           if k != "earlier"}]}
    atomic_write_text(json.dumps(record, indent=1) + "\n", path)
    return record


def declaration_note(study: Study) -> str:
    """When the contrasts were declared, from contrasts.json."""
    path = study.output_dir / DECLARED
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is None or old["contrasts"] != [asdict(c) for c in study.contrasts]:
        return "Declared in the spec; recorded in contrasts.json when the study next runs."
    when = f"(contrasts.json, {old['declared_at']})"
    note = (f"Declared before any cell had finished {when}." if old["finished_cells"] == 0 else
            f"Declared when {old['finished_cells']} cell(s) had already finished {when}: chosen with results in "
            "view, so this family is not confirmatory in the strict sense.")
    if old["earlier"]:
        note += f" The declaration was changed {len(old['earlier'])} time(s); earlier versions are in contrasts.json."
    return note


def check_target_effect(study: Study, effect: float | None) -> float | None:
    """`--target-effect X`: a positive finite difference, for a spec with contrasts."""
    if effect is None:
        return None
    if not math.isfinite(effect) or effect <= 0:
        raise MaeTransferError(f"--target-effect must be a positive number, got {effect!r}")
    if not study.contrasts:
        raise MaeTransferError("--target-effect: the spec declares no contrasts (contrasts=[...]) to state it for")
    return effect


# ---------------------------------------------------------------------------------------------- replication
def replication_folder(first_seed: int | None) -> str:
    """OUTPUT's sub-folder of a replication: `replication`, or `replication_from_seed<S>` for one that starts at
    `--first-seed S` (a second replication, whose seeds must not repeat the first one's)."""
    return REPLICATION if first_seed is None else f"{REPLICATION}_from_seed{first_seed}"


def check_first_seed(replicate: int | None, first_seed: int | None) -> None:
    """The tools' --first-seed: only with --replicate N, whose fresh seeds it places."""
    if first_seed is not None and replicate is None:
        raise MaeTransferError("--first-seed goes with --replicate N (where the fresh seeds start)")


def replication_study(study: Study, n: int, first_seed: int | None = None) -> Study:
    """The contrasts' cells with `n` fresh fine-tuning seeds (max(original) + 1, ..., or `first_seed`, ...: never an
    original one), in OUTPUT/`replication_folder(first_seed)`, on the same backbones (a pretrained one: the
    checkpoint the study exported, so its pretraining runs are the same). Refused before anything runs: n < 1,
    a first seed not above every original one, seeds past the 32-bit seed space or used by another replication
    folder in OUTPUT, no contrasts, or a contrast with fewer than 2 finished original pairs (nothing to
    replicate)."""
    if n < 1:
        raise MaeTransferError(f"--replicate: the number of fresh seeds must be at least 1, got {n}")
    if not study.contrasts:
        raise MaeTransferError("--replicate: the spec declares no contrasts (contrasts=[...]): replication re-runs "
                               "the declared contrasts")
    first = max(study.seeds) + 1 if first_seed is None else first_seed
    if first_seed is not None and first_seed <= max(study.seeds):
        raise MaeTransferError(f"--first-seed {first_seed}: a replication's seeds must be fresh, above the study's "
                               f"seeds (largest {max(study.seeds)})")
    if first < 0 or first + n > SEED_LIMIT:
        raise MaeTransferError(f"--replicate {n}: fresh seeds {first}..{first + n - 1} are outside the 32-bit seed "
                               f"space 0..{SEED_LIMIT - 1}")
    folder = study.output_dir / replication_folder(first_seed)
    for other in sorted(study.output_dir.glob(f"{REPLICATION}*/cells")):  # earlier replications' seeds stay unused
        seen = {s for p in other.iterdir() if (s := seed_of_cell_dir(p.name)) is not None}
        if other.parent != folder and seen & set(range(first, first + n)):
            raise MaeTransferError(f"--replicate {n}: fresh seeds {first}..{first + n - 1} overlap seeds "
                                   f"{min(seen)}..{max(seen)} of the replication in {other.parent}; start above them "
                                   f"(--first-seed {max(seen) + 1})")
    rows = collect(study)
    for c in study.contrasts:
        pairs = len(paired_differences(study, rows, c))
        if pairs < 2:
            metric, blocks = _where(study, c)
            raise MaeTransferError(f"--replicate: contrast {c.a} − {c.b} ({metric}, {blocks} blocks fine-tuned) has "
                                   f"{pairs} finished pair(s) in {study.output_dir}; finish the study first")
    cells = {(m, c.task, c.freeze) for c in study.contrasts for side in (c.a, c.b) for m in study.members(side)}
    backbones = {}
    for name, entry in study.backbones.items():
        if not any(name == cell[0] for cell in cells):
            continue
        if isinstance(entry, dict) and entry.get("pretrain"):
            ckpt = backbone_checkpoint(study, name)
            if not Path(ckpt).is_file():
                raise MaeTransferError(f"--replicate: backbone {name!r}: its pretrained checkpoint {ckpt} is missing; "
                                       "finish the study first")
            entry = ckpt
        backbones[name] = entry
    tasks = {t: s for t, s in study.tasks.items() if any(t == cell[1] for cell in cells)}
    runs = {k: v for k, v in study.pretrain_runs.items() if k in backbones}
    kept = {study.spec_backbone(b) for b in backbones}
    paired = {b: [r for r in members if r in backbones] for b, members in study.paired.items() if b in kept}
    return replace(study, output_dir=folder, seeds=list(range(first, first + n)),
                   backbones=backbones, tasks=tasks, only=frozenset(cells), pretrain_runs=runs, paired=paired,
                   reference=study.reference if study.reference in kept else None)


def replication_rows(original: Study, replication: Study) -> list[dict[str, Any]]:
    """Per contrast: the original and the new estimate with simultaneous 95% intervals (Bonferroni over the
    contrasts), sign agreement, the pooled estimate (all fine-tuning seeds), and `replicated`: the new interval
    alone excludes 0 on the original estimate's side."""
    old_rows, new_rows = collect(original), collect(replication)
    m = len(original.contrasts)
    out = []
    for c in original.contrasts:
        old_d, new_d = paired_differences(original, old_rows, c), paired_differences(replication, new_rows, c)
        old, new, pooled = paired_test(old_d), paired_test(new_d), paired_test(old_d + new_d)
        new_ci = bonferroni_interval(new, m)
        replicated = new_ci is not None and ((old.mean > 0 and new_ci[0] > 0) or (old.mean < 0 and new_ci[1] < 0))
        metric, blocks = _where(original, c)
        out.append({"contrast": f"{c.a} − {c.b}", "metric": metric, "blocks_tuned": blocks,
                    **{f"{what}_{key}": value for what, test in (("original", old), ("new", new), ("pooled", pooled))
                       for key, value in (("mean", test.mean), ("sd", test.sd), ("n", test.n),
                                          ("interval", bonferroni_interval(test, m)))},
                    "sign_agrees": None if new.n == 0 else (old.mean > 0) == (new.mean > 0),
                    "replicated": replicated})
    return out


def write_replication(original: Study, replication: Study) -> dict[str, Path]:
    """replication.md and replication.csv in the replication's folder (OUTPUT/replication...)."""
    rows = replication_rows(original, replication)
    m = len(original.contrasts)

    def est(row: dict[str, Any], what: str) -> str:
        test = PairedTest(row[f"{what}_mean"], row[f"{what}_sd"], row[f"{what}_n"], None)
        return f"{_estimate(test)} {_interval(row[f'{what}_interval'])} (n={test.n})"

    lines = [
        f"# Replication of `{original.name}`",
        "",
        f"The {m} declared contrast(s) re-run with fresh fine-tuning seeds {', '.join(map(str, replication.seeds))} "
        f"(the original ran seeds {', '.join(map(str, original.seeds))}), on the same backbones (pretrained ones: the "
        f"same pretraining runs). Estimates: a − b paired by fine-tuning seed, mean ± sd "
        f"[simultaneous 95% interval, Bonferroni over the {m}] (n pairs). Pooled: original and new seeds together. "
        "Replicated: the new interval alone excludes 0 on the side of the original estimate.",
        "",
        "| contrast | metric | blocks fine-tuned | original | new | sign agrees | pooled | replicated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        agrees = "-" if row["sign_agrees"] is None else "yes" if row["sign_agrees"] else "no"
        lines.append(f"| {row['contrast']} | {row['metric']} | {row['blocks_tuned']} | {est(row, 'original')} | "
                     f"{est(row, 'new')} | {agrees} | {est(row, 'pooled')} | {'yes' if row['replicated'] else 'no'} |")
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = [k for k in rows[0] if not k.endswith("_interval")] if rows else []
    lows = [k for k in (rows[0] if rows else {}) if k.endswith("_interval")]
    writer.writerow([*header, *(f"{k[:-len('interval')]}{side}" for k in lows for side in ("low", "high"))])
    for row in rows:
        writer.writerow([row[k] for k in header] + [v for k in lows for v in (row[k] or ("", ""))])
    out = replication.output_dir
    return {"md": atomic_write_text("\n".join(lines) + "\n", out / "replication.md"),
            "csv": atomic_write_text(buf.getvalue(), out / "replication.csv")}
