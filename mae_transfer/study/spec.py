"""A study spec: reading and checking it (`load_study`), its cells, and the tool command of each cell.

The spec format: mae_transfer/study/__init__.py. A task's `kind` is a `mae_transfer.task_kinds` record: its
tool, the key of the run's length (`iters` or `epochs`) and how a cell's settings are spelled for the tool.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_transfer import task_kinds
from mae_transfer.cluster import make_resources
from mae_transfer.config import load_config
from mae_transfer.errors import MaeTransferError
from mae_transfer.paths import REPO_ROOT, resolve_path
from mae_transfer.task_kinds import TaskKind

DONE = "done.json"
SPEC_KEYS = {"name", "depth", "freeze_blocks", "seeds", "backbones", "tasks", "output_dir", "python", "slurm",
             "reference", "contrasts"}
CONTRAST_KEYS = {"a", "b", "task", "freeze", "metric"}
SEED_LIMIT = 2 ** 32  # seeds are 32-bit (numpy's and the tools' seeding)
# How the fine-tuning seeds meet a backbone's pretraining runs (pretrain=dict(seeds=[...], fine_tuning_seeds=...)):
# crossed: every run with every fine-tuning seed; paired: the i-th fine-tuning seed with run i mod runs.
SEED_DESIGNS = ("crossed", "paired")
TASK_KEYS = {"kind", "config", "iters", "epochs", "args", "opts", "checkpoint_period", "launcher", "slurm"}
BACKBONE_FORMS = ("a path, None/'random', or dict(checkpoint=PATH, pretrain=dict(config=..., data=... | crops=..., "
                  "opts=[...]), epoch=N)")


@dataclass(frozen=True)
class Cell:
    """One fine-tune + evaluation: a backbone, a task, a number of frozen blocks and a seed."""

    backbone: str
    task: str
    freeze_blocks: int
    seed: int

    @property
    def name(self) -> str:
        return safe_name(f"{self.backbone}__{self.task}__freeze{self.freeze_blocks}__seed{self.seed}")


def seed_of_cell_dir(name: str) -> int | None:
    """The fine-tuning seed in a cell folder's name (`Cell.name`), or None for a name of another form."""
    m = re.search(r"__seed(\d+)$", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Contrast:
    """One declared (confirmatory) comparison: backbone a - backbone b on one task metric at one freeze setting.
    a and b are backbone names of the spec (a backbone with pretraining seeds stands for all its runs)."""

    a: str
    b: str
    task: str
    metric: str
    freeze: int


@dataclass
class Study:
    """A resolved spec: paths made absolute, values checked."""

    name: str
    depth: int
    freeze_blocks: list[int]
    seeds: list[int]
    backbones: dict[str, Any]  # name -> None | absolute path str | dict(checkpoint=..., pretrain=...)
    tasks: dict[str, dict[str, Any]]
    output_dir: Path
    spec_path: Path | None = None
    python: str = field(default_factory=lambda: sys.executable)
    allow_pickle: bool = False  # backbone files may hold pickled objects (passed to every cell as --allow-pickle)
    slurm: dict[str, Any] = field(default_factory=dict)  # job resources of every job (--executor; tasks add theirs)
    reference: str | None = None  # backbone the results compare the others against (difference table)
    contrasts: list[Contrast] = field(default_factory=list)  # the declared (confirmatory) family, spec order
    # A backbone with pretrain=dict(seeds=[...]) is one entry per pretraining run in `backbones` (`pretrain_run_name`);
    # this maps each such run's name to the spec's backbone name (absent: the name is the spec's own).
    pretrain_runs: dict[str, str] = field(default_factory=dict)
    # Backbones whose runs are paired with the fine-tuning seeds: spec name -> its run entries, in seed order.
    paired: dict[str, list[str]] = field(default_factory=dict)
    only: frozenset[tuple[str, str, int]] | None = None  # (backbone, task, freeze) cells to run (None: all)
    target_effect: float | None = None  # results.md: the n needed to detect this difference (--target-effect)

    def cells(self) -> list[Cell]:
        """All cells, seed-major (a first full table before extra seeds), then backbone, task, freeze."""
        return [Cell(b, t, f, s) for i, s in enumerate(self.seeds) for b in self.backbones for t in self.tasks
                for f in self.freeze_blocks
                if (self.only is None or (b, t, f) in self.only) and self.fine_tunes(b, i)]

    def fine_tunes(self, backbone: str, seed_index: int) -> bool:
        """Whether the fine-tuning seed at this position of `seeds` runs on this backbone entry: always, except
        for a paired backbone's runs, each of which takes every len(runs)-th seed."""
        runs = self.paired.get(self.spec_backbone(backbone))
        return runs is None or runs[seed_index % len(runs)] == backbone

    def spec_backbone(self, name: str) -> str:
        """The spec's backbone name of a backbone entry (a pretraining run's entry -> its backbone)."""
        return self.pretrain_runs.get(name, name)

    def members(self, spec_name: str) -> list[str]:
        """The backbone entries of a spec backbone: its pretraining runs, or itself."""
        return [n for n in self.backbones if self.spec_backbone(n) == spec_name]

    def spec_backbones(self) -> list[str]:
        """The spec's backbone names, in spec order."""
        return list(dict.fromkeys(self.spec_backbone(n) for n in self.backbones))

    def blocks_tuned(self, freeze: int) -> int:
        return 0 if freeze < 0 else self.depth - freeze

    def cell_dir(self, cell: Cell) -> Path:
        return self.output_dir / "cells" / cell.name

    def kind(self, task: str) -> TaskKind:
        return task_kinds.get(self.tasks[task]["kind"], f"task {task!r}")

    def metrics_of(self, task: str) -> list[str]:
        return list(self.kind(task).metric_keys)


def safe_name(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text)


def _int_list(value: Any, key: str, where: str) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise MaeTransferError(f"{where}: {key} must be a non-empty list of integers, got {value!r}")
    return list(dict.fromkeys(items))


def load_study(spec: str | os.PathLike | Mapping[str, Any], output_dir: str | os.PathLike | None = None,
               allow_pickle: bool = False) -> Study:
    """Read and check a study spec (file or dict); `output_dir` overrides the spec's."""
    raw, where, spec_path = _read_spec(spec)
    _check_keys(raw, where)
    depth, freezes = _check_depth(raw, where)
    backbones, pretrain_runs, paired = _check_backbones(raw["backbones"], where)
    seeds = _int_list(raw.get("seeds", [0]), "seeds", where)
    for name, runs in paired.items():
        if len(runs) > len(seeds):
            raise MaeTransferError(f"{where}: backbone {name!r}: {len(runs)} pretraining runs paired with "
                                   f"{len(seeds)} fine-tuning seed(s): each run needs at least one seed "
                                   "(give more seeds, or fine_tuning_seeds='crossed')")
    names = list(dict.fromkeys(pretrain_runs.get(n, n) for n in backbones))
    reference = raw.get("reference")
    if reference is not None and reference not in names:
        raise MaeTransferError(f"{where}: reference {reference!r} is not one of the backbones "
                               f"({', '.join(map(repr, names))})")
    tasks = _check_tasks(raw["tasks"], where)
    contrasts = _check_contrasts(raw.get("contrasts"), names, tasks, freezes, where)
    name = str(raw.get("name") or (spec_path.stem if spec_path else "study"))
    out = output_dir or raw.get("output_dir") or Path("work_dirs") / "studies" / name
    return Study(name=name, depth=depth, freeze_blocks=freezes, seeds=seeds,
                 backbones=backbones, tasks=tasks, output_dir=Path(out).resolve(), spec_path=spec_path,
                 python=raw.get("python") or sys.executable, allow_pickle=allow_pickle,
                 slurm=_check_slurm(raw.get("slurm"), where), reference=reference, contrasts=contrasts,
                 pretrain_runs=pretrain_runs, paired=paired)


def _read_spec(spec: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str, Path | None]:
    """(the spec's keys, how errors name it, its file)"""
    if isinstance(spec, Mapping):
        return dict(spec), "study spec", None
    return load_config(Path(spec)), str(spec), Path(spec)


def _check_keys(raw: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise MaeTransferError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                               f"valid: {', '.join(sorted(SPEC_KEYS))}")
    for key in ("depth", "backbones", "tasks", "freeze_blocks"):
        if key not in raw:
            raise MaeTransferError(f"{where}: missing {key!r}")


def _check_depth(raw: Mapping[str, Any], where: str) -> tuple[int, list[int]]:
    """(depth, freeze_blocks), each freeze_blocks value within -1..depth."""
    depth = raw["depth"]
    if not isinstance(depth, int) or depth < 1:
        raise MaeTransferError(f"{where}: depth must be a positive integer, got {depth!r}")
    freezes = _int_list(raw["freeze_blocks"], "freeze_blocks", where)
    bad = [f for f in freezes if not -1 <= f <= depth]
    if bad:
        raise MaeTransferError(f"{where}: freeze_blocks {bad} outside -1..{depth} (depth={depth})")
    return depth, freezes


def _check_backbones(entries: Any, where: str) -> tuple[dict[str, Any], dict[str, str], dict[str, list[str]]]:
    """(backbone entries, pretraining run entry -> spec name, paired backbone -> its run entries): a backbone whose
    pretraining has `seeds=[...]` is one entry per seed (`pretrain_run_name`), its pretraining with `seed=S`;
    entries of several backbones with the same pretraining and seed share that run, as without seeds."""
    if not isinstance(entries, Mapping) or not entries:
        raise MaeTransferError(f"{where}: backbones must be a non-empty dict name -> checkpoint / None / dict(...)")
    backbones: dict[str, Any] = {}
    runs: dict[str, str] = {}
    paired: dict[str, list[str]] = {}
    for name, entry in entries.items():
        checked = _check_backbone_entry(name, entry, where)
        seeds = (checked.get("pretrain") or {}).get("seeds") if isinstance(checked, Mapping) else None
        if seeds is None:
            backbones[name] = checked
            continue
        for seed in seeds:
            run = pretrain_run_name(name, seed)
            if run in entries:
                raise MaeTransferError(f"{where}: backbone name {run!r} is also the name of a pretraining run of "
                                       f"backbone {name!r}; rename it")
            pre = {k: v for k, v in checked["pretrain"].items() if k not in ("seeds", "fine_tuning_seeds")}
            backbones[run] = {**checked, "pretrain": {**pre, "seed": seed, "opts": [*pre["opts"], f"seed={seed}"]}}
            runs[run] = name
        if checked["pretrain"].get("fine_tuning_seeds") == "paired":
            paired[name] = [pretrain_run_name(name, seed) for seed in seeds]
    _check_epochs(backbones, where)
    return backbones, runs, paired


def pretrain_run_name(backbone: str, seed: int) -> str:
    """The entry of one pretraining run of a backbone with pretraining seeds."""
    return f"{backbone}@pt{seed}"


def pretrain_run_seed(run: str) -> int:
    """The pretraining seed of a run's entry (`pretrain_run_name`)."""
    return int(run.rsplit("@pt", 1)[1])


def _check_pretrain_seeds(name: str, pre: Mapping[str, Any], where: str) -> list[int] | None:
    """`seeds=[...]` of a pretraining: distinct 32-bit integers, and no `seed=` in its opts besides."""
    design = pre.get("fine_tuning_seeds", SEED_DESIGNS[0])
    if "seeds" not in pre:
        if "fine_tuning_seeds" in pre:
            raise MaeTransferError(f"{where}: backbone {name!r}: pretrain fine_tuning_seeds= needs seeds=[...]")
        return None
    if design not in SEED_DESIGNS:
        raise MaeTransferError(f"{where}: backbone {name!r}: pretrain fine_tuning_seeds must be one of "
                               f"{', '.join(map(repr, SEED_DESIGNS))}, got {design!r}")
    seeds = pre["seeds"]
    what = f"{where}: backbone {name!r}: pretrain seeds"
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SEED_LIMIT for s in seeds):
        raise MaeTransferError(f"{what} must be a non-empty list of integers in 0..{SEED_LIMIT - 1}, got {seeds!r}")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise MaeTransferError(f"{what} {list(seeds)} repeat {repeated}: each seed is one pretraining run")
    if any(str(o).split("=", 1)[0].strip() == "seed" for o in pre.get("opts", [])):
        raise MaeTransferError(f"{what}: give the pretraining seed in seeds=[...], not as seed= in its opts")
    return list(seeds)


def _check_contrasts(value: Any, backbones: list[str], tasks: Mapping[str, Mapping[str, Any]], freezes: list[int],
                     where: str) -> list[Contrast]:
    """`contrasts=[dict(a=BACKBONE, b=BACKBONE, task=TASK, freeze=[...], metric=...), ...]`: each names backbones,
    a task and freeze settings of the spec; freeze (default: every setting) and metric (default: every metric of
    the task) may be one value or a list. One Contrast per (a, b, task, metric, freeze), duplicates dropped."""
    if value is None:
        return []
    form = "contrasts must be a list of dict(a=BACKBONE, b=BACKBONE, task=TASK, freeze=[...])"
    if not isinstance(value, (list, tuple)):
        raise MaeTransferError(f"{where}: {form}, got {value!r}")
    out: list[Contrast] = []
    for i, item in enumerate(value):
        at = f"{where}: contrasts[{i}]"
        if not isinstance(item, Mapping):
            raise MaeTransferError(f"{at}: {form}, got {item!r}")
        unknown = sorted(set(item) - CONTRAST_KEYS)
        missing = [k for k in ("a", "b", "task") if k not in item]
        if unknown or missing:
            raise MaeTransferError(f"{at}: " + (f"unknown key(s) {unknown}" if unknown else f"missing {missing}")
                                   + f"; valid: {sorted(CONTRAST_KEYS)}")
        for key in ("a", "b"):
            if item[key] not in backbones:
                raise MaeTransferError(f"{at}: {key}={item[key]!r} is not one of the backbones "
                                       f"({', '.join(map(repr, backbones))})")
        if item["a"] == item["b"]:
            raise MaeTransferError(f"{at}: a and b are the same backbone {item['a']!r}")
        task = item["task"]
        if task not in tasks:
            raise MaeTransferError(f"{at}: task={task!r} is not one of the tasks ({', '.join(map(repr, tasks))})")
        freeze = _int_list(item.get("freeze", freezes), "freeze", at)
        bad = [f for f in freeze if f not in freezes]
        if bad:
            raise MaeTransferError(f"{at}: freeze {bad} not among the spec's freeze_blocks {freezes}")
        metrics = list(task_kinds.get(tasks[task]["kind"]).metric_keys)
        chosen = item.get("metric", metrics)
        chosen = [chosen] if isinstance(chosen, str) else chosen
        if not isinstance(chosen, (list, tuple)) or not chosen or any(m not in metrics for m in chosen):
            raise MaeTransferError(f"{at}: metric {item.get('metric')!r}: expected one or a list of {metrics}")
        out += [Contrast(item["a"], item["b"], task, m, f) for m in chosen for f in freeze]
    return list(dict.fromkeys(out))


def _pretrain_key(entry: Any) -> str | None:
    """Backbones with equal `pretrain=dict(...)` share one pretraining run (each may take another epoch of it)."""
    if not isinstance(entry, Mapping) or not entry.get("pretrain"):
        return None
    return json.dumps(entry["pretrain"], sort_keys=True)


def pretrain_group(backbones: Mapping[str, Any], name: str) -> list[str]:
    """The backbones that share `name`'s pretraining run, in spec order; the first owns the run's folder."""
    key = _pretrain_key(backbones[name])
    return [n for n, e in backbones.items() if key is not None and _pretrain_key(e) == key] or [name]


def _run_epochs(pre: Mapping[str, Any]) -> int | None:
    """The pretraining run's length: its config's `epochs` with the run's overrides (None if they do not load:
    the pretraining input check reports that)."""
    try:
        return int(load_config(pre["config"], pre["opts"])["epochs"])
    except (MaeTransferError, KeyError, TypeError, ValueError):
        return None


def _check_epochs(backbones: Mapping[str, Any], where: str) -> None:
    """`epoch=N` takes the checkpoint after epoch N of the (shared) pretraining run, so N must be within it."""
    for name, entry in backbones.items():
        epoch = entry.get("epoch") if isinstance(entry, Mapping) else None
        if epoch is None:
            continue
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1 or not entry.get("pretrain") \
                or entry.get("checkpoint"):
            raise MaeTransferError(f"{where}: backbone {name!r}: epoch must be a positive integer, given with "
                                   f"pretrain=dict(...) and without checkpoint=, got epoch={epoch!r}")
        run = _run_epochs(entry["pretrain"])
        if run is not None and epoch > run:
            raise MaeTransferError(f"{where}: backbone {name!r}: epoch={epoch} is after the end of its pretraining "
                                   f"run ({run} epochs)")


def _is_hub_name(entry: Any) -> bool:
    """timm:<model> / hf-hub:<repo>: resolved by the tools through huggingface_hub's cache (checkpoint.hub)."""
    return str(entry).startswith(("timm:", "hf-hub:"))


def _check_backbone_entry(name: str, entry: Any, where: str) -> Any:
    """None (random init), an absolute checkpoint path, or dict(checkpoint=..., pretrain=...) with paths resolved."""
    if entry is None or entry == "random":
        return None
    if isinstance(entry, (str, os.PathLike)):
        return str(entry) if _is_hub_name(entry) else str(resolve_path(entry))
    if not isinstance(entry, Mapping):
        raise MaeTransferError(f"{where}: backbone {name!r}: expected a path, None or a dict, got {entry!r}")
    extra = sorted(set(entry) - {"checkpoint", "pretrain", "epoch", "opts"})
    if extra or not (entry.get("checkpoint") or entry.get("pretrain")):
        raise MaeTransferError(f"{where}: backbone {name!r} must be {BACKBONE_FORMS}")
    entry = dict(entry)
    # opts=dict(det=[...], seg=[...], cls=[...]): the backbone's architecture options in each task kind's override
    # spelling (a backbone family's ViT options, e.g. configs/studies/backbone_families.py)
    opts = entry.get("opts", {})
    if not isinstance(opts, Mapping) or not all(k in task_kinds.KINDS and isinstance(v, (list, tuple))
                                                 for k, v in opts.items()):
        raise MaeTransferError(f"{where}: backbone {name!r}: opts must be dict(<task kind>=[overrides...]) with kinds "
                               f"from {tuple(task_kinds.KINDS)}, got {opts!r}")
    entry["opts"] = {k: [str(o) for o in v] for k, v in opts.items()}
    return _check_pretrain(name, entry, where)


def _check_tasks(entries: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(entries, Mapping) or not entries:
        raise MaeTransferError(f"{where}: tasks must be a non-empty dict name -> "
                               f"dict(kind={'|'.join(map(repr, task_kinds.KINDS))}, config=..., iters=...)")
    return {name: _check_task(name, task, where) for name, task in entries.items()}


def _check_task(name: str, task: Any, where: str) -> dict[str, Any]:
    """One task, normalised: its length under `iters` whatever the kind counts it in, config path resolved."""
    if not isinstance(task, Mapping):
        raise MaeTransferError(f"{where}: task {name!r} must be a dict, got {task!r}")
    extra = sorted(set(task) - TASK_KEYS)
    if extra:
        raise MaeTransferError(f"{where}: task {name!r}: unknown key(s) {extra}; valid: {sorted(TASK_KEYS)}")
    kind = task_kinds.get(task.get("kind"), f"{where}: task {name!r}")
    iters = _check_length(kind, task, f"{where}: task {name!r}")
    if not task.get("config"):
        raise MaeTransferError(f"{where}: task {name!r}: missing config")
    config = resolve_path(task["config"])
    if not config.is_file():
        raise MaeTransferError(f"{where}: task {name!r}: config file not found: {task['config']}")
    return dict(kind=kind.name, config=str(config), iters=iters,
                args=[str(a) for a in task.get("args", [])], opts=[str(o) for o in task.get("opts", [])],
                checkpoint_period=int(task.get("checkpoint_period") or max(1, iters // 2)),
                launcher=[str(a) for a in task.get("launcher") or []],
                slurm=_check_slurm(task.get("slurm"), f"{where}: task {name!r}"))


def _check_length(kind: TaskKind, task: Mapping[str, Any], where: str) -> int:
    """The run's length, given under the key of the kind's unit (`iters`, or `epochs` for classification)."""
    length, other = kind.length_key, "iters" if kind.length_key == "epochs" else "epochs"
    if task.get(other) is not None:
        raise MaeTransferError(f"{where}: kind {kind.name!r} takes {length}=, not {other}=")
    value = task.get(length)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MaeTransferError(f"{where}: {length} must be a positive integer, got {value!r}")
    return value


def _check_slurm(value: Any, where: str) -> dict[str, Any]:
    """A spec's / task's / pretraining's `slurm=dict(...)`: job resources for `tools/study.py --executor`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MaeTransferError(f"{where}: slurm must be a dict of job resources, got {value!r}")
    make_resources(value, where)  # unknown keys and bad values fail when the spec is read
    return dict(value)


def _check_pretrain(name: str, entry: dict[str, Any], where: str) -> dict[str, Any]:
    if entry.get("checkpoint") and not _is_hub_name(entry["checkpoint"]):  # timm:/hf-hub: names stay names
        entry["checkpoint"] = str(resolve_path(entry["checkpoint"]))
    pre = entry.get("pretrain")
    if pre is None:
        return entry
    if not isinstance(pre, Mapping) or not pre.get("config") or bool(pre.get("data")) == bool(pre.get("crops")):
        raise MaeTransferError(f"{where}: backbone {name!r}: pretrain must be dict(config=..., data=FOLDER or "
                               "crops=dict(json=..., images=..., min_size=...), opts=[...])")
    pre = dict(pre)
    pre["config"] = str(resolve_path(pre["config"]))
    if pre.get("data"):
        pre["data"] = str(resolve_path(pre["data"]))
    else:
        crops = dict(pre["crops"])
        if not crops.get("json") or not crops.get("images"):
            raise MaeTransferError(f"{where}: backbone {name!r}: crops needs json= and images=")
        crops["json"], crops["images"] = str(resolve_path(crops["json"])), str(resolve_path(crops["images"]))
        pre["crops"] = crops
    pre["opts"] = [str(o) for o in pre.get("opts", [])]
    pre["slurm"] = _check_slurm(pre.get("slurm"), f"{where}: backbone {name!r}")
    seeds = _check_pretrain_seeds(name, pre, where)
    if seeds is not None:
        pre["seeds"] = seeds
    entry["pretrain"] = pre
    return entry


# ---------------------------------------------------------------------------------------------- commands
def _fill(items: Iterable[str], iters: int, seed: int) -> list[str]:
    values = {"iters": iters, "warmup": max(1, iters // 10), "seed": seed}
    return [re.sub(r"\{(iters|warmup|seed)\}", lambda m: str(values[m.group(1)]), s) for s in items]


def cell_command(study: Study, cell: Cell, checkpoint: str | None, resume: bool) -> tuple[str, list[str]]:
    """(tool, arguments) of one cell: the tool's name in `task_kinds.TOOLS` and its command-line arguments, the
    cell's length, checkpoint period, seed, initial weights and frozen blocks spelled as its task kind says."""
    task = study.tasks[cell.task]
    kind = study.kind(cell.task)
    spelling = kind.overrides
    iters = task["iters"]
    args, opts = _fill(task["args"], iters, cell.seed), _fill(task["opts"], iters, cell.seed)
    if study.allow_pickle:
        args = ["--allow-pickle", *args]
    init_flags, init_overrides = spelling.init(checkpoint)
    entry = study.backbones.get(cell.backbone)
    arch = entry.get("opts", {}).get(kind.name, []) if isinstance(entry, Mapping) else []
    overrides = [*init_overrides, *spelling.cell(iters, min(task["checkpoint_period"], iters), cell.seed), *arch,
                 *opts]
    return kind.tool_name, [
        "--config", task["config"], "--output-dir", str(study.cell_dir(cell)), *args,
        spelling.freeze_flag, str(cell.freeze_blocks), *init_flags,
        *([spelling.overrides_flag] if spelling.overrides_flag else []), *overrides,
        *(["--resume"] if resume else [])]


def command_line(study: Study, cell: Cell, checkpoint: str | None, resume: bool) -> list[str]:
    """The cell's whole command line: the task's launcher (default: the spec's python), the tool, its arguments."""
    tool, args = cell_command(study, cell, checkpoint, resume)
    launcher = study.tasks[cell.task]["launcher"] or [study.python]
    return [*launcher, str(REPO_ROOT / task_kinds.TOOLS[tool].script), *args]


def has_checkpoint(study: Study, cell: Cell) -> bool:
    """Whether an unfinished cell is resumed: its tool left the file it resumes from (its checkpoint marker)."""
    return study.kind(cell.task).tool.has_checkpoint(study.cell_dir(cell))


def backbone_work(study: Study, name: str) -> Path:
    return study.output_dir / "backbones" / safe_name(name)


def pretrain_data(study: Study, pre: Mapping[str, Any]) -> str:
    return pre.get("data") or str(study.output_dir / "data" / f"crops_{safe_name(Path(pre['crops']['json']).stem)}")


def backbone_commands(study: Study, name: str) -> tuple[str | None, list[list[str]]]:
    """(checkpoint path, commands that produce it) for one backbone; no commands if nothing is to be done.

    Backbones with equal `pretrain=dict(...)` share one run, in the folder of the first of them: it saves a numbered
    checkpoint at every `epoch=` they ask for, and each backbone exports its epoch's checkpoint, or the run's last
    once the run has finished. The owner's commands also export the group's others. Only exports are left when
    every backbone still to export has its checkpoint saved; otherwise the run is continued first (`--resume`: an
    interrupted run goes on from its last checkpoint, a finished one does nothing), so a backbone never comes from
    an unfinished run (the export refuses one too)."""
    entry = study.backbones[name]
    if entry is None:
        return None, []
    if isinstance(entry, str):
        return entry, []
    pre = entry.get("pretrain")
    ckpt = backbone_checkpoint(study, name)
    if Path(ckpt).is_file() or not pre:
        return ckpt, []
    group = pretrain_group(study.backbones, name)
    run = pretrain_run(study, name)
    tool = str(REPO_ROOT / task_kinds.TOOLS["pretrain"].script)
    missing = [n for n in group
               if (n == name or name == group[0]) and not Path(backbone_checkpoint(study, n)).is_file()]
    exports = [[study.python, tool, *_epoch_flag(study.backbones[n].get("epoch")), "--export-encoder",
                str(_run_checkpoint(run, study.backbones[n].get("epoch"))), backbone_checkpoint(study, n)]
               for n in missing]
    if all(_saved(run, study.backbones[n].get("epoch"), pre) for n in missing):
        return ckpt, exports
    epochs = sorted({study.backbones[n]["epoch"] for n in group if study.backbones[n].get("epoch")})
    keep = [f"save_epochs=[{','.join(map(str, epochs))}]"] if epochs else []
    return ckpt, [[study.python, tool, "--config", pre["config"], "--data", pretrain_data(study, pre),
                   "--output-dir", str(run), "--resume", *pre["opts"], *keep], *exports]


def pretrain_run(study: Study, name: str) -> Path:
    """The folder of the pretraining run a backbone comes from (shared by its group)."""
    return backbone_work(study, pretrain_group(study.backbones, name)[0]) / "pretrain"


def _epoch_flag(epoch: int | None) -> list[str]:
    return ["--epoch", str(epoch)] if epoch else []


def _saved(run: Path, epoch: int | None, pre: Mapping[str, Any]) -> bool:
    """Whether the run has saved the checkpoint a backbone exports: the one after `epoch`, or (None) its last after
    the run's final epoch. log.jsonl holds one line per completed epoch and is written after the checkpoint."""
    if epoch:
        return _run_checkpoint(run, epoch).is_file()
    total = _run_epochs(pre)
    try:
        done = len((run / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return False
    return total is not None and done >= total and _run_checkpoint(run, None).is_file()


def backbone_checkpoint(study: Study, name: str) -> str:
    """Where a pretrained backbone's encoder is exported: its group's folder, one file per epoch taken."""
    entry = study.backbones[name]
    if entry.get("checkpoint"):
        return entry["checkpoint"]
    epoch = entry.get("epoch")
    work = backbone_work(study, pretrain_group(study.backbones, name)[0])
    return str(work / (f"backbone_epoch{epoch:04d}.pth" if epoch else "backbone.pth"))


def _run_checkpoint(run: Path, epoch: int | None) -> Path:
    return run / (f"checkpoint_{epoch:04d}.pth" if epoch else "checkpoint_last.pth")
