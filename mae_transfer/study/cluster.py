"""Transfer studies as cluster jobs (`tools/study.py --executor slurm|local`): every cell, and every backbone
pretraining, is one submitit job (`mae_transfer.cluster`), submitted in parallel (at most `max_parallel` in
flight); pretraining jobs first, the cells that use them after (Slurm: `--dependency=afterok:<job>`; local:
submitted once the backbone checkpoint exists).

Every input of every backbone and cell is checked before the first job is submitted (`study.check_inputs`).
Job ids and states are kept in `OUTPUT/jobs.json` (written atomically after every change). Running the same
command again at any time collects: finished cells are read (`done.json`, written by the cell's job from the
tool's `eval_metrics.json`), pending / running jobs are listed, failed ones are shown with their log and are
resubmitted with `retry_failed` (each once per call); a job that vanished without a result (killed, cancelled,
node failure) is resubmitted by itself (up to `MAX_AUTO_RESUBMIT` times) and resumes from the cell's last
checkpoint. The tables and the plot are rewritten from whatever has finished (`write_results`).

Job resources: the spec's `slurm=dict(...)`, then the task's (or the pretraining's) `slurm=dict(...)`, then the
command line's `--slurm KEY=VALUE` (keys: `mae_transfer.cluster.RESOURCE_KEYS`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mae_transfer.cluster import (
    ALIVE,
    EXECUTORS,
    Resources,
    ToolJob,
    job_states,
    local_parameters,
    make_resources,
    read_status,
    slurm_parameters,
    submit,
)
from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text
from mae_transfer.paths import REPO_ROOT
from mae_transfer.study.claims import record_contrasts
from mae_transfer.study.inputs import check_inputs
from mae_transfer.study.report import write_results
from mae_transfer.study.run import prepare_pretrain_data, read_metrics, write_done
from mae_transfer.study.spec import DONE, Cell, Study, backbone_commands, cell_command, pretrain_group, safe_name

logger = logging.getLogger(__name__)

JOBS_FILE = "jobs.json"
MAX_AUTO_RESUBMIT = 3  # a job that keeps vanishing (e.g. killed for memory) is then shown as failed
IN_FLIGHT = ("pending", "running")
# --wait: seconds between checks. A local job's end is seen in its status file at once; Slurm is asked through
# sacct, which a study should not call every few seconds.
POLL_S = {"local": 2.0, "slurm": 60.0}


class CellJob(ToolJob):
    """One cell as a job: the cell's tool command (the task's local `launcher` left out: the job sets up the
    tool's distributed mode); on success it writes the cell's `done.json` from the tool's eval_metrics.json."""

    def __init__(self, study: Study, cell: Cell, checkpoint: str | None, gpus_per_node: int) -> None:
        tool, args = cell_command(study, cell, checkpoint, resume=False)
        super().__init__(tool, args, study.python, gpus_per_node, what=f"cell {cell.name}",
                         cwd=REPO_ROOT)  # where the in-process study runs its tools too
        self.study, self.cell, self.checkpoint = study, cell, checkpoint

    def on_success(self, seconds: float, resumed: bool) -> dict[str, Any]:
        metrics = read_metrics(self.study.cell_dir(self.cell), self.study.tasks[self.cell.task]["kind"])
        return write_done(self.study, self.cell, self.checkpoint, metrics, seconds, resumed)


def resources(study: Study, own: Mapping[str, Any] | None, overrides: Mapping[str, Any], where: str) -> Resources:
    return make_resources({**study.slurm, **(own or {}), **overrides}, where)


def check_job_options(executor: str | None, max_parallel: int | None = None, poll_s: float | None = None,
                      retry_failed: bool = False, wait: bool = False, overrides: Mapping[str, Any] | None = None,
                      ) -> None:
    """The job options of `tools/study.py`, before anything is checked, run or submitted: --max-parallel a positive
    count, --poll a positive interval of --wait, and none of them without an executor (they would be ignored)."""
    given = [flag for flag, value in (("--max-parallel", max_parallel is not None), ("--poll", poll_s is not None),
                                      ("--retry-failed", retry_failed), ("--wait", wait), ("--slurm", bool(overrides)))
             if value]
    if executor is None and given:
        raise MaeTransferError(f"{', '.join(given)}: only with --executor local|slurm (without it the cells run one "
                               "after another in this process)")
    if executor is not None and executor not in EXECUTORS:
        raise MaeTransferError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
        raise MaeTransferError(f"--max-parallel must be a positive number of jobs, got {max_parallel}")
    if poll_s is not None:
        if not wait:
            raise MaeTransferError("--poll is the interval of --wait: give --wait too")
        if not math.isfinite(poll_s) or poll_s <= 0:
            raise MaeTransferError(f"--poll must be a positive number of seconds, got {poll_s:g}")


def check_job_resources(study: Study, executor: str, overrides: Mapping[str, Any] | None = None) -> None:
    """The resources of every job the study may submit (spec, task or pretraining, --slurm merged), as the executor
    takes them: a bad value fails before the first job is submitted, not at a later one."""
    overrides = dict(overrides or {})
    jobs = [(f"backbone {name!r}", "pretrain", entry["pretrain"].get("slurm"))
            for name, entry in study.backbones.items() if isinstance(entry, Mapping) and entry.get("pretrain")]
    jobs += [(f"task {name!r}", study.kind(name).tool_name, task.get("slurm")) for name, task in study.tasks.items()]
    for where, tool, own in jobs:
        res = resources(study, own, overrides, where)
        try:
            if executor == "local":
                local_parameters(tool, res)
            else:
                slurm_parameters(tool, res, study.name)
        except MaeTransferError as err:
            raise MaeTransferError(f"{where}: {err}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--slurm partition=gpu --slurm nodes=2` -> {"partition": "gpu", "nodes": 2} (integers where they look so)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MaeTransferError(f"--slurm: expected KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = int(value) if value.isdigit() and key != "mem" else value
    return out


# ---------------------------------------------------------------------------------------------- bookkeeping
def load_jobs(study: Study) -> dict[str, dict[str, Any]]:
    path = study.output_dir / JOBS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["jobs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise MaeTransferError(f"{path}: not a jobs file of a study ({err}); move it away to start afresh") from None


def save_jobs(study: Study, jobs: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(json.dumps({"study": study.name, "jobs": jobs}, indent=1, sort_keys=True) + "\n",
                      study.output_dir / JOBS_FILE)


def refresh(jobs: dict[str, dict[str, Any]]) -> None:
    """Update the state of every job in flight: our status file first (done / failed, with the error), then the
    scheduler (pending / running), else it vanished without a result: interrupted."""
    live = {k: e for k, e in jobs.items() if e["state"] in IN_FLIGHT}
    for executor in {e["executor"] for e in live.values()}:
        ids = [e["job_id"] for e in live.values() if e["executor"] == executor]
        states = job_states(executor, ids)
        for entry in (e for e in live.values() if e["executor"] == executor):
            status = read_status(entry["folder"], entry["job_id"])
            scheduler = states.get(entry["job_id"], "UNKNOWN")
            entry["scheduler_state"] = scheduler
            if status and status["state"] in ("done", "failed"):
                entry["state"] = status["state"]
                if status.get("error"):
                    entry["error"] = status["error"]
            elif scheduler in ALIVE:
                entry["state"] = "pending" if scheduler == "PENDING" else "running"
            else:
                entry["state"] = "interrupted"


# ---------------------------------------------------------------------------------------------- one pass
def gave_up(entry: Mapping[str, Any]) -> bool:
    """A job that is not resubmitted by itself: it failed, or vanished `MAX_AUTO_RESUBMIT` times."""
    return entry["state"] == "failed" or (entry["state"] == "interrupted" and entry["attempts"] >= MAX_AUTO_RESUBMIT)


def _pass(study: Study, executor: str, jobs: dict[str, dict[str, Any]], max_parallel: int, retry: set[str],
          overrides: Mapping[str, Any]) -> dict[str, list]:
    """Submit what may run now (within `max_parallel`); `retry`: the given-up jobs that may be resubmitted, each
    taken out of it when it is."""
    in_flight = sum(e["state"] in IN_FLIGHT for e in jobs.values())
    todo = [c for c in study.cells() if not (study.cell_dir(c) / DONE).is_file()]
    submitted: list[str] = []
    ready: dict[str, tuple[str | None, str | None]] = {}  # backbone -> (checkpoint, job id the cells wait for)

    def may_submit(key: str) -> bool:
        entry = jobs.get(key)
        if entry is None:
            return True
        if gave_up(entry):
            return key in retry
        return entry["state"] in ("interrupted", "done")  # done: only asked when its result is missing

    def do_submit(key: str, job: ToolJob, res: Resources, dependency: str | None = None) -> dict[str, Any]:
        nonlocal in_flight
        folder = study.output_dir / "jobs" / safe_name(key)
        entry = submit(job, executor, folder, res, f"{study.name}:{key.split(' ', 1)[1]}", dependency)
        attempts = jobs.get(key, {}).get("attempts", 0) + 1
        jobs[key] = {**entry, "state": "pending", "attempts": attempts, "depends_on": dependency}
        save_jobs(study, jobs)  # the job id is kept even if this process dies now
        in_flight += 1
        submitted.append(key)
        retry.discard(key)
        logger.info("submitted %s: job %s (%s)%s", key, entry["job_id"], executor,
                    f" after {dependency}" if dependency else "")
        return jobs[key]

    for name in dict.fromkeys(c.backbone for c in todo):
        ckpt, commands = backbone_commands(study, name)
        if not commands:
            ready[name] = (ckpt, None)
            continue
        owner = pretrain_group(study.backbones, name)[0]  # one job per pretraining run, shared by its group
        key = f"backbone {owner}"
        pre = study.backbones[owner]["pretrain"]
        if may_submit(key) and in_flight < max_parallel:
            # the owner's commands run the run and export the whole group; once its own file exists, this one's
            commands = (backbone_commands(study, owner)[1] if owner != name else []) or commands
            prepare_pretrain_data(study, owner)
            res = resources(study, pre.get("slurm"), overrides, f"backbone {owner!r}")
            # export only: the run's checkpoints are all there; one process, nothing to resume
            trains = "--export-encoder" not in commands[0]
            if not trains:
                res = dataclasses.replace(res, nodes=1, gpus_per_node=0)
            do_submit(key, ToolJob("pretrain", commands[0][2:], study.python, res.gpus_per_node, then=commands[1:],
                                   what=f"{'pretraining' if trains else 'export'} of backbone {owner!r}",
                                   cwd=REPO_ROOT, resumable=trains), res)
        entry = jobs.get(key)
        if entry and entry["state"] in IN_FLIGHT and executor == "slurm":
            ready[name] = (ckpt, f"afterok:{entry['job_id']}")  # Slurm starts the cells when it has succeeded

    for cell in todo:
        key = f"cell {cell.name}"
        if cell.backbone not in ready or not may_submit(key) or in_flight >= max_parallel:
            continue
        ckpt, dependency = ready[cell.backbone]
        task = study.tasks[cell.task]
        res = resources(study, task.get("slurm"), overrides, f"task {cell.task!r}")
        do_submit(key, CellJob(study, cell, ckpt, res.gpus_per_node), res, dependency)
    return summarise_jobs(study, jobs, submitted)


def summarise_jobs(study: Study, jobs: dict[str, dict[str, Any]], submitted: list[str]) -> dict[str, list]:
    cells = study.cells()
    done = [c.name for c in cells if (study.cell_dir(c) / DONE).is_file()]
    by_state: dict[str, list] = {s: [] for s in ("pending", "running", "failed", "interrupted")}
    for key, entry in jobs.items():
        if key.startswith("cell ") and key[5:] in done:
            continue
        if entry["state"] in by_state:
            by_state[entry["state"]].append(key)
    waiting = [c.name for c in cells if c.name not in done and f"cell {c.name}" not in jobs]
    return {"done": done, "waiting": waiting, "submitted": submitted, **by_state}


def status_text(study: Study, jobs: dict[str, dict[str, Any]], summary: dict[str, list]) -> str:
    """What a re-run prints: counts, then the jobs in flight and the failed ones with their logs."""
    now = f" ({len(summary['submitted'])} submitted now)" if summary["submitted"] else ""
    lines = [f"study {study.name}: {len(study.cells())} cells: {len(summary['done'])} finished, "
             f"{len(summary['running'])} running, {len(summary['pending'])} pending, "
             f"{len(summary['failed'])} failed, {len(summary['waiting'])} not submitted yet{now}"]
    for state in ("running", "pending", "interrupted"):
        lines += [f"  {state}: {key} (job {jobs[key]['job_id']}, log {jobs[key]['stderr']})" for key in summary[state]]
    for key in summary["failed"]:
        entry = jobs[key]
        lines.append(f"  failed: {key} (job {entry['job_id']}): {entry.get('error') or 'ended without a result'}; "
                     f"log: {entry['stderr']}")
    if summary["failed"]:
        lines.append("  (rerun with --retry-failed to resubmit the failed jobs; they resume from their checkpoints)")
    return "\n".join(lines)


def run_study_jobs(study: Study, executor: str, max_parallel: int | None = None, retry_failed: bool = False,
                   wait: bool = False, poll_s: float | None = None, overrides: Mapping[str, Any] | None = None,
                   ) -> dict[str, Any]:
    """Submit / collect the study's jobs once (or, with `wait`, until none is in flight, checking every `poll_s`
    seconds, default `POLL_S`); returns the summary, the status text and the path of results.md. Every input is
    checked before anything is submitted (`check_inputs`). `retry_failed`: every job that had failed when this
    call started is resubmitted once, as `max_parallel` allows (with `wait`, all of them); a job failing again in
    the same call is reported, not resubmitted. Raises when nothing is in flight any more and some job failed."""
    overrides = dict(overrides or {})
    check_job_options(executor, max_parallel, poll_s if wait else None, retry_failed, wait, overrides)
    check_job_resources(study, executor, overrides)
    max_parallel = max_parallel or (1 if executor == "local" else 10 ** 6)
    poll_s = POLL_S.get(executor, 60.0) if poll_s is None else poll_s
    study.output_dir.mkdir(parents=True, exist_ok=True)
    check_inputs(study, [c for c in study.cells() if not (study.cell_dir(c) / DONE).is_file()], executor)
    record_contrasts(study)  # the declaration, before this run's results
    jobs = load_jobs(study)
    retry: set[str] | None = None
    failed_at_start: set[str] = set()
    shown, finished = "", None
    try:
        while True:
            refresh(jobs)
            save_jobs(study, jobs)
            if retry is None:  # what had failed when this command started (after its first look)
                retry = {k for k, e in jobs.items() if gave_up(e)} if retry_failed else set()
                failed_at_start = set(retry)
            summary = _pass(study, executor, jobs, max_parallel, retry, overrides)
            text = status_text(study, jobs, summary)
            if not wait or not (summary["pending"] or summary["running"] or summary["submitted"]):
                break
            if text.splitlines()[0] != shown:  # polled every few seconds locally: log changes only
                shown = text.splitlines()[0]
                logger.info("%s", shown)
            if summary["done"] != finished:
                finished = summary["done"]
                write_results(study, plot=False)
            time.sleep(poll_s)
    finally:
        results = write_results(study)
    if summary["failed"] and not (summary["pending"] or summary["running"]):
        logger.info("%s", text)
        first = jobs[summary["failed"][0]]
        again = [k for k in summary["failed"] if k in failed_at_start and k not in retry]
        hint = (f"{len(again)} of them failed again after --retry-failed resubmitted them; fix the cause, then "
                "--retry-failed resubmits them once more" if again else "--retry-failed resubmits them")
        raise MaeTransferError(f"{len(summary['failed'])} job(s) failed, first: {first.get('error') or 'no result'} "
                               f"(log: {first['stderr']}); {hint}")
    return {**summary, "status": text, "results": Path(results["md"])}
