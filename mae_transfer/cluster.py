"""One launcher for every training tool and for whole studies, on submitit: a Slurm job (or a local process,
the same code path without a cluster) that sets up the tool's own distributed mode, requeues itself on
preemption / timeout and resumes from the tool's last checkpoint.

    python tools/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 72:00:00 \\
        pretrain --config configs/mae_pretrain_vit_l.py --data /datasets/imagenet/train --output-dir work_dirs/mae_l

Inside the job, per tool (`TOOLS`, mae_transfer/task_kinds.py):
- `pretrain`, `finetune_cls` (our engine) and `train_seg` (mmengine's `pytorch` launcher): one task per GPU, each
  with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) taken
  from `submitit.JobEnvironment`;
- `train_det` (detectron2's `launch`): one task per node, which spawns the node's GPU workers itself
  (`--num-gpus G --num-machines N --machine-rank NODE --dist-url tcp://MASTER:PORT`).
The tool runs as a child process of the submitit task (`python tools/<tool>.py ...`). Slurm sends USR2
`signal_delay_s` before the time limit (`#SBATCH --signal=USR2@90`) or on preemption; submitit then calls
`ToolJob.checkpoint`, requeues the job, and the requeued run adds the tool's `--resume` when its output folder
holds a checkpoint (every start checks, so a job Slurm requeues on its own resumes too).

submitit is imported inside the functions here, never when mae_transfer is imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text
from mae_transfer.paths import REPO_ROOT
from mae_transfer.subprocess_runner import STOP_GRACE_S, error_line, run_process
from mae_transfer.task_kinds import TOOLS

EXECUTORS = ("slurm", "local")


def tool_name(name: str) -> str:
    """`pretrain`, `tools/pretrain.py` or `pretrain.py` -> `pretrain`."""
    key = Path(name).name.removesuffix(".py")
    if key not in TOOLS:
        raise MaeTransferError(f"unknown tool {name!r}; expected one of {', '.join(TOOLS)}")
    return key


# ---------------------------------------------------------------------------------------------- resources
@dataclass
class Resources:
    """What one job asks for. The keys of a study spec's `slurm=dict(...)` are these field names."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # per task: per GPU, or per node for train_det (one task spawns the workers)
    mem: str | None = None  # per node, Slurm syntax ("64G"; "0": all of it)
    partition: str | None = None
    time: int = 24 * 60  # minutes
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None
    sbatch: dict[str, str] = field(default_factory=dict)  # further sbatch flags, e.g. {"constraint": "a100"}
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ..., source ...)
    signal_delay_s: int = 90  # USR2 this long before the time limit: time to stop and requeue
    max_requeues: int = 3  # requeues after a timeout (preemptions are not counted)


RESOURCE_KEYS = tuple(f.name for f in dataclasses.fields(Resources))


def parse_time(value: int | str) -> int:
    """A Slurm time limit -> minutes: 90 / "90" (minutes), "90:30" (minutes:seconds), "1:30:00", "2-12",
    "2-12:30", "2-12:30:00" (days-hours[:minutes[:seconds]])."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(value).strip())
    if not m:
        raise MaeTransferError(f"time: expected minutes or [D-]HH:MM:SS, got {value!r}")
    parts = [int(p) for p in m.group(2).split(":")]
    if m.group(1) is not None:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = ([0, 0] + parts)[-3:] if len(parts) == 3 else (0, parts[0], (parts + [0])[1])
    total = int(m.group(1) or 0) * 1440 + hours * 60 + minutes + seconds / 60
    if total <= 0:
        raise MaeTransferError(f"time: must be positive, got {value!r}")
    return math.ceil(total)


def make_resources(values: Mapping[str, Any], where: str) -> Resources:
    """`Resources` from a dict (a spec's slurm=dict(...), merged CLI values); unknown keys are an error."""
    unknown = sorted(set(values) - set(RESOURCE_KEYS))
    if unknown:
        raise MaeTransferError(f"{where}: unknown slurm key(s) {', '.join(map(repr, unknown))}; "
                               f"valid: {', '.join(RESOURCE_KEYS)}")
    res = Resources(**{k: v for k, v in values.items() if v is not None})
    for key in ("nodes", "gpus_per_node", "signal_delay_s", "max_requeues"):
        value = getattr(res, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "nodes" else 0):
            raise MaeTransferError(f"{where}: slurm {key} must be a {'positive' if key == 'nodes' else 'non-negative'}"
                                   f" integer, got {value!r}")
    res.time = parse_time(res.time)
    if res.mem is not None:
        res.mem = str(res.mem)
    if not isinstance(res.sbatch, Mapping) or not isinstance(res.setup, (list, tuple)):
        raise MaeTransferError(f"{where}: slurm sbatch must be a dict of sbatch flags and setup a list of shell lines")
    # a flag without a value (e.g. --exclusive) is True
    res.sbatch = {str(k): v if v is True else str(v) for k, v in res.sbatch.items()}
    res.setup = [str(s) for s in res.setup]
    return res


def tasks_per_node(tool: str, res: Resources) -> int:
    """detectron2's launch spawns one worker per GPU itself; the others get one task per GPU (at least one)."""
    return TOOLS[tool].mode.tasks_per_node(res.gpus_per_node)


def slurm_parameters(tool: str, res: Resources, job_name: str, dependency: str | None = None) -> dict[str, Any]:
    """The parameters of `submitit.SlurmExecutor.update_parameters` for one job."""
    params: dict[str, Any] = dict(job_name=res.job_name or job_name, nodes=res.nodes,
                                  ntasks_per_node=tasks_per_node(tool, res), time=res.time,
                                  signal_delay_s=res.signal_delay_s)
    for key in ("cpus_per_task", "mem", "partition", "account", "qos"):
        if getattr(res, key) is not None:
            params[key] = getattr(res, key)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if dependency:
        params["dependency"] = dependency
    if res.setup:
        params["setup"] = list(res.setup)
    if res.sbatch:
        params["additional_parameters"] = {k.replace("_", "-"): v for k, v in res.sbatch.items()}
    return params


def local_parameters(tool: str, res: Resources) -> dict[str, Any]:
    """The parameters of `submitit.LocalExecutor.update_parameters`: this machine, the same task layout."""
    if res.nodes != 1:
        raise MaeTransferError(f"the local executor runs on this machine only: nodes={res.nodes} needs slurm")
    params: dict[str, Any] = dict(timeout_min=res.time, tasks_per_node=tasks_per_node(tool, res),
                                  gpus_per_node=res.gpus_per_node, signal_delay_s=res.signal_delay_s)
    if res.setup:
        params["setup"] = list(res.setup)
    return params


# ---------------------------------------------------------------------------------------------- in the job
@dataclass(frozen=True)
class Placement:
    """Where one task of a job sits: what `submitit.JobEnvironment` says, plus the rendezvous address."""

    num_nodes: int
    node: int
    num_tasks: int
    global_rank: int
    local_rank: int
    master_addr: str
    master_port: int


def master_port(job_id: str) -> int:
    """A port every task of a job derives alike from the job id, so no task has to tell the others."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def task_command(tool: str, args: Sequence[str], python: str, place: Placement, gpus_per_node: int,
                 resume: bool) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) of the tool for one task of a job: the tool's own distributed mode."""
    spec = TOOLS[tool]
    cmd = [python, str(REPO_ROOT / spec.script), *args]
    launch_args, env = spec.mode.task(place, gpus_per_node)
    cmd += launch_args
    if resume and "--resume" not in args:
        cmd.append("--resume")
    return cmd, env


def output_dir_of(args: Sequence[str]) -> str | None:
    """The tool's `--output-dir` in an argument list."""
    for i, arg in enumerate(args):
        if arg == "--output-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--output-dir="):
            return arg.split("=", 1)[1]
    return None


def has_checkpoint(tool: str, output_dir: str | os.PathLike) -> bool:
    return TOOLS[tool].has_checkpoint(output_dir)


class ToolJob:
    """The callable submitit runs in every task of a job: one of the tools, then (rank 0) `then` commands.

    Picklable (submitit pickles it into the job folder); `checkpoint` makes submitit requeue it on USR2.
    A failure of the tool is written to `<job folder>/<job id>_status.json` (rank 0) before it is raised, so
    that a collector tells a failed run (exit status, log) from a killed one without unpickling anything.
    `resumable=False`: a command with nothing to resume (an export), which needs no --output-dir.
    """

    def __init__(self, tool: str, args: Sequence[str], python: str | None = None, gpus_per_node: int = 0,
                 then: Sequence[Sequence[str]] = (), what: str | None = None,
                 cwd: str | os.PathLike | None = None, resumable: bool = True) -> None:
        self.tool = tool_name(tool)
        self.cwd = str(cwd or os.getcwd())  # relative paths in the arguments mean what they meant when submitted
        self.args = [str(a) for a in args]
        self.python = python or sys.executable
        self.gpus_per_node = gpus_per_node
        self.then = [[str(c) for c in cmd] for cmd in then]
        self.what = what or self.tool
        self.output_dir = output_dir_of(self.args) if resumable else None  # None: nothing to resume from
        if resumable and not self.output_dir:
            raise MaeTransferError(f"{self.what}: the {self.tool} command needs --output-dir (the folder its "
                                   "checkpoints go to, from which a requeued job resumes)")

    def __call__(self) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        local = env.cluster == "local"
        place = Placement(env.num_nodes, env.node, env.num_tasks, env.global_rank, env.local_rank,
                          "127.0.0.1" if local else env.hostnames[0], master_port(env.job_id))
        status = Path(env.paths.folder) / f"{env.job_id}_status.json"
        log = Path(str(env.paths.stderr))
        resume = self.output_dir is not None and has_checkpoint(self.tool, Path(self.cwd) / self.output_dir)
        cmd, extra = task_command(self.tool, self.args, self.python, place, self.gpus_per_node, resume)
        start = time.time()
        print(f"[mae-transfer] {env}: {'resuming: ' if resume else ''}{shlex.join(cmd)}", flush=True)
        try:
            sys.stderr.flush()  # the tool appends to the same log: its error line is found after this point
            run_child(cmd, {**os.environ, **extra}, self.cwd, log=log)
            if place.global_rank == 0:
                for then in self.then:
                    print(f"[mae-transfer] $ {shlex.join(then)}", flush=True)
                    run_child(then, dict(os.environ), self.cwd, log=log)
                result = self.on_success(time.time() - start, resume)
                write_status(status, "done", job_id=env.job_id, log=str(log))
                return result
        except MaeTransferError as err:
            if place.global_rank == 0:
                write_status(status, "failed", job_id=env.job_id, error=f"{self.what}: {err}", log=str(log))
            raise
        return {}

    def on_success(self, seconds: float, resumed: bool) -> dict[str, Any]:
        """Rank 0, after the tool and the `then` commands succeeded; its value is the job's result."""
        return {"seconds": round(seconds, 1), "resumed": resumed}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on USR2 (timeout / preemption) before it requeues the job. The tool has written its
        own checkpoints: the requeued run only needs `--resume`, which `__call__` adds when it finds one."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def run_child(cmd: Sequence[str], env: Mapping[str, str], cwd: str, grace_s: float = STOP_GRACE_S,
              log: str | os.PathLike | None = None) -> None:
    """Run a tool; its output goes to the job's log (`log`: the file its stderr goes to, whose last `error: ...`
    line from this run a failure carries). If this task is stopped (submitit's requeue exits with SystemExit, the
    local executor sends SIGINT) the tool gets SIGINT, then SIGKILL after `grace_s`."""
    start = _size(log)
    # The tool ignores USR2: it is the submitit task's signal (checkpoint + requeue), not the tool's. Stopped
    # while waiting: the task was stopped, not the tool, so it is asked at once (self_stop_s=0).
    code = run_process(cmd, env=env, cwd=cwd, ignore_signals=(signal.SIGUSR2,), grace_s=grace_s, self_stop_s=0).code
    if code != 0:
        error = error_line(log, start) if log is not None else None
        raise MaeTransferError(f"{Path(cmd[1]).name if len(cmd) > 1 else cmd[0]} failed with exit status {code}"
                               + (f": {error}" if error else ""))


def _size(path: str | os.PathLike | None) -> int:
    try:
        return os.path.getsize(path) if path is not None else 0
    except OSError:
        return 0


def write_status(path: Path, state: str, **values: Any) -> None:
    atomic_write_text(json.dumps({"state": state, **values}, indent=1) + "\n", path)


def read_status(folder: str | os.PathLike, job_id: str) -> dict[str, Any] | None:
    path = Path(folder) / f"{job_id}_status.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------- submitting
def make_executor(executor: str, folder: str | os.PathLike, tool: str, res: Resources, job_name: str,
                  dependency: str | None = None) -> Any:
    """A configured `submitit.SlurmExecutor` or `submitit.LocalExecutor` for one job."""
    import submitit

    if executor == "slurm":
        try:
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.max_requeues)
        except RuntimeError as err:  # no srun here
            raise MaeTransferError(f"--executor slurm: {err} (submit from a Slurm login node; --dry-run shows the "
                                   "sbatch script here)") from None
        ex.update_parameters(**slurm_parameters(tool, res, job_name, dependency))
    elif executor == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_requeues)
        ex.update_parameters(**local_parameters(tool, res))
    else:
        raise MaeTransferError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    return ex


def submit(job: ToolJob, executor: str, folder: str | os.PathLike, res: Resources, job_name: str,
           dependency: str | None = None) -> dict[str, Any]:
    """Submit `job`; returns what a collector needs later: job id, executor, folder, log paths."""
    folder = Path(folder).resolve()
    ex = make_executor(executor, folder, job.tool, res, job_name, dependency)
    if executor == "local":
        with _stdio_to(folder / "controller.log"):
            handle = ex.submit(job)
    else:
        handle = ex.submit(job)
    return {"job_id": str(handle.job_id), "executor": executor, "folder": str(folder),
            "stdout": str(handle.paths.stdout), "stderr": str(handle.paths.stderr),
            "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}


@contextlib.contextmanager
def _stdio_to(log: Path) -> Iterator[None]:
    """The local executor's controller outlives this process and inherits its stdout / stderr: give it a log file
    instead, or whoever reads this process's output through a pipe would wait for the job to end."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    try:
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=False):
            os.dup2(copy, fd)
            os.close(copy)


def sbatch_script(job: ToolJob, folder: str | os.PathLike, res: Resources, job_name: str,
                  dependency: str | None = None, python: str | None = None) -> str:
    """The sbatch script `submit(..., executor="slurm")` would hand to sbatch, made here without a cluster:
    the text of submitit's own `SlurmExecutor._make_submission_file_text` (its `_make_sbatch_string`)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).resolve()
    command = " ".join([shlex.quote(python or sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(job.tool, res, job_name, dependency))


def parse_tool_args(tool: str, args: Sequence[str]) -> Any:
    """The tool's own parser on `args` (tools/<tool>.py's parse_args): a typo fails now, not in the queue."""
    import importlib.util

    path = REPO_ROOT / TOOLS[tool].script
    spec = importlib.util.spec_from_file_location(f"_mae_transfer_tool_{tool}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(list(args))


def submit_tool(tool: str, tool_args: Sequence[str], executor: str, resources: Mapping[str, Any],
                log_dir: str | None = None, dry_run: bool = False) -> str:
    """tools/submit.py: check the tool's arguments, then submit it (or, dry run, show the sbatch script)."""
    name = tool_name(tool)
    args = list(tool_args[1:] if tool_args[:1] == ["--"] else tool_args)
    parse_tool_args(name, args)
    res = make_resources(resources, "submit")
    job = ToolJob(name, args, gpus_per_node=res.gpus_per_node)
    out = Path(job.output_dir).resolve()
    folder = Path(log_dir).resolve() if log_dir else out / "jobs"
    job_name = f"{name}:{out.name}"
    if dry_run:
        ntasks = res.nodes * tasks_per_node(name, res)
        cmd, env = task_command(name, args, job.python, Placement(res.nodes, 0, ntasks, 0, 0, "<first node>",
                                                                   master_port("0")), res.gpus_per_node, False)
        env_text = " ".join(f"{k}={v}" for k, v in env.items())
        return (f"{sbatch_script(job, folder, res, job_name)}\n# task 0 of {ntasks} runs (in {job.cwd}; port from "
                f"the job id; --resume added when {TOOLS[name].checkpoint_marker} exists):\n# {env_text} "
                f"{shlex.join(cmd)}".rstrip())
    entry = submit(job, executor, folder, res, job_name)
    return (f"submitted {name} as {executor} job {entry['job_id']}\n  stdout: {entry['stdout']}\n"
            f"  stderr: {entry['stderr']}")


# ---------------------------------------------------------------------------------------------- collecting
ALIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
         "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED")


def job_states(executor: str, job_ids: Sequence[str]) -> dict[str, str]:
    """Scheduler state of each job: a Slurm state (sacct) or, for local jobs, RUNNING / ENDED (process alive)."""
    if not job_ids:
        return {}
    if executor == "local":
        return {j: "RUNNING" if _local_alive(int(j)) else "ENDED" for j in job_ids}
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise MaeTransferError(f"cannot ask Slurm for the state of the study's jobs (sacct): {err}") from None
    states = {j: "UNKNOWN" for j in job_ids}
    for line in out.splitlines():
        job_id, _, state = line.partition("|")
        if job_id in states:
            states[job_id] = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 123" -> CANCELLED
    return states


def _local_alive(pid: int) -> bool:
    """Whether a local job's controller (submitit.local._local) is still running (not a zombie, not another
    process that got its pid since)."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child that ended
    except ChildProcessError:
        pass
    proc = Path(f"/proc/{pid}")
    try:
        if "zombie" in (proc / "status").read_text():
            return False
        return b"submitit" in (proc / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
