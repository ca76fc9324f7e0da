"""The cluster launcher (mae_transfer/cluster.py, tools/submit.py) and studies as jobs (mae_transfer/study/cluster.py,
tools/study.py --executor): the sbatch script submitit would submit, each tool's distributed setup inside a job,
Slurm dependencies of a study (sbatch / sacct replaced by recording scripts), and a real 2-cell study through
submitit's local executor with one job killed mid-run and resumed by the re-run."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mae_transfer.cluster import (
    Placement,
    ToolJob,
    make_resources,
    parse_time,
    sbatch_script,
    task_command,
    tasks_per_node,
)
from mae_transfer.errors import MaeTransferError
from mae_transfer.study.cluster import CellJob, load_jobs, run_study_jobs
from mae_transfer.study.spec import DONE, Study, backbone_commands, load_study
from tests.conftest import REPO_ROOT
from tests.study.test_study import assert_same_backbones, seg_folder, shared_run, stop_after_epoch_1  # noqa: F401


# ------------------------------------------------------------------------------------------- sbatch script
def test_sbatch_script_has_the_resources_the_requeue_signal_and_the_job_command(tmp_path: Path) -> None:
    res = make_resources(dict(nodes=2, gpus_per_node=8, cpus_per_task=10, mem="0", partition="gpu",
                              time="72:00:00", account="proj", qos="high", sbatch={"constraint": "h100",
                                                                                    "exclusive": True},
                              setup=["module load cuda/12.4"]), "test")
    job = ToolJob("pretrain", ["--config", "configs/mae_pretrain_vit_l.py", "--output-dir", str(tmp_path / "mae")])
    text = sbatch_script(job, tmp_path / "logs", res, "pretrain:mae", python="/env/bin/python")
    lines = text.splitlines()
    for flag in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=10", "--mem=0",
                 "--partition=gpu", "--time=4320", "--account=proj", "--qos=high", "--constraint=h100",
                 "--exclusive", "--signal=USR2@90", "--job-name=pretrain:mae",
                 f"--output={tmp_path / 'logs'}/%j_0_log.out", f"--error={tmp_path / 'logs'}/%j_0_log.err"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "module load cuda/12.4" in lines
    assert lines[-1] == (f"srun --unbuffered --output {tmp_path / 'logs'}/%j_%t_log.out --error "
                         f"{tmp_path / 'logs'}/%j_%t_log.err /env/bin/python -u -m submitit.core._submit "
                         f"{tmp_path / 'logs'}")
    # detectron2 spawns its GPU workers itself: one task per node; a study cell waits for its pretraining
    det = make_resources(dict(gpus_per_node=8, time=90, signal_delay_s=300), "test")
    text = sbatch_script(ToolJob("train_det", ["--output-dir", str(tmp_path / "det")]), tmp_path / "d", det, "det",
                         dependency="afterok:41")
    assert {"#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --time=90", "#SBATCH --nodes=1",
            "#SBATCH --signal=USR2@300", "#SBATCH --dependency=afterok:41"} <= set(text.splitlines())
    assert tasks_per_node("train_seg", det) == 8 and tasks_per_node("finetune_cls", make_resources({}, "t")) == 1

    assert [parse_time(t) for t in (90, "90", "90:30", "1:30:00", "2-12", "2-00:30:00")] == [90, 90, 91, 90, 3600,
                                                                                             2910]
    with pytest.raises(MaeTransferError, match="time: expected minutes"):
        parse_time("soon")
    with pytest.raises(MaeTransferError, match="unknown slurm key.*'gpus'"):
        make_resources(dict(gpus=8), "spec.py")
    with pytest.raises(MaeTransferError, match="needs --output-dir"):
        ToolJob("finetune_cls", ["--config", "c.py"])


def test_each_tool_gets_its_own_distributed_mode_and_resume(tmp_path: Path) -> None:
    place = Placement(num_nodes=2, node=1, num_tasks=16, global_rank=11, local_rank=3, master_addr="gpu-001",
                      master_port=23456)
    cmd, env = task_command("pretrain", ["--output-dir", "o"], "py", place, 8, resume=True)
    assert cmd == ["py", str(REPO_ROOT / "tools/pretrain.py"), "--output-dir", "o", "--resume"]
    assert env == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu-001", "MASTER_PORT": "23456"}
    cmd, env = task_command("train_seg", ["--launcher", "slurm", "--cfg-options", "a=1"], "py", place, 8, False)
    assert cmd[-2:] == ["--launcher", "pytorch"] and env["RANK"] == "11"  # the last --launcher wins
    place_det = Placement(2, 1, 2, 1, 0, "gpu-001", 23456)
    cmd, env = task_command("train_det", ["--num-gpus", "4", "train.max_iter=9"], "py", place_det, 8, True)
    assert env == {} and cmd[-9:] == ["--num-gpus", "8", "--num-machines", "2", "--machine-rank", "1", "--dist-url",
                                      "tcp://gpu-001:23456", "--resume"]
    single = Placement(1, 0, 1, 0, 0, "127.0.0.1", 20001)
    assert task_command("train_seg", [], "py", single, 0, False)[0][-2:] == ["--launcher", "none"]
    # the tools' own parsers take what the launcher adds
    from mae_transfer.cluster import parse_tool_args

    args = parse_tool_args("train_det", task_command("train_det", ["--config", "c.py", "--output-dir", "o"], "py",
                                                     place_det, 8, True)[0][2:])
    assert (args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args.resume) == (
        8, 2, 1, "tcp://gpu-001:23456", "auto")
    args = parse_tool_args("train_seg", task_command("train_seg", ["--config", "c.py", "--cfg-options", "a=1"], "py",
                                                     place, 8, True)[0][2:])
    assert args.launcher == "pytorch" and args.cfg_options == ["a=1"] and args.resume == "auto"


# ------------------------------------------------------------------------------------------- slurm study
FAKE_SBATCH = """#!/bin/sh
n=$(ls "$FAKE_SLURM_DIR" | grep -c '^job_' )
id=$((n + 41))
cp "$1" "$FAKE_SLURM_DIR/job_$id.sh"
echo "Submitted batch job $id"
"""
FAKE_SACCT = """#!/bin/sh
# -j is the last argument: every job listed is reported as the state in $FAKE_SLURM_DIR/state
for id in $(echo "$@" | sed 's/.* -j //' | tr ',' ' '); do echo "$id|$(cat "$FAKE_SLURM_DIR/state")"; done
"""


def test_slurm_study_submits_pretraining_first_and_cells_after_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch, srun and sacct are replaced by scripts that record the submission: the jobs, their dependencies and
    jobs.json are real submitit / study output."""
    bin_dir, record = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (record / "state").write_text("PENDING")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(record))
    seg = seg_folder(tmp_path / "seg")
    mae = dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=str(tmp_path), slurm=dict(nodes=2, gpus_per_node=8))
    spec = dict(name="slurm_unit", depth=4, freeze_blocks=[0, -1], seeds=[0], slurm=dict(partition="gpu", time=60),
                backbones={"MAE": dict(pretrain=mae), "MAE-1": dict(pretrain=mae, epoch=1)},  # one run, two epochs
                tasks={"seg": dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=100,
                                   launcher=["torchrun", "--nproc_per_node", "8"], args=["--launcher", "pytorch"],
                                   opts=[f"{split}_dataloader.dataset.data_root={seg}"
                                         for split in ("train", "val", "test")],
                                   slurm=dict(gpus_per_node=8, time="2:00:00"))})
    study = load_study(spec, tmp_path / "out")
    result = run_study_jobs(study, "slurm", overrides={"account": "proj"})
    jobs = load_jobs(study)
    assert jobs["backbone MAE"]["job_id"] == "41" and jobs["backbone MAE"]["depends_on"] is None
    assert "backbone MAE-1" not in jobs  # the shared run is one job, which exports both backbones
    pretraining, *exports = backbone_commands(study, "MAE")[1]
    assert "save_epochs=[1]" in pretraining and [c[-1].rsplit("/", 1)[1] for c in exports] == [
        "backbone.pth", "backbone_epoch0001.pth"]
    cells = [f"cell {c.name}" for c in study.cells()]
    assert sorted(jobs[c]["job_id"] for c in cells) == ["42", "43", "44", "45"]
    assert all(jobs[c]["depends_on"] == "afterok:41" and jobs[c]["state"] == "pending" for c in cells)
    pre = (record / "job_41.sh").read_text().splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=60",
            "#SBATCH --account=proj"} <= set(pre)
    cell = (record / "job_42.sh").read_text().splitlines()
    assert {"#SBATCH --dependency=afterok:41", "#SBATCH --time=120", "#SBATCH --gpus-per-node=8",
            "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=1"} <= set(cell)
    assert len(result["submitted"]) == 5 and "0 finished" in result["status"]
    # the cell's job runs train_seg itself (no torchrun), with the study's arguments and the job's launcher
    job = CellJob(study, study.cells()[0], jobs["backbone MAE"].get("checkpoint"), 8)
    cmd, env = task_command(job.tool, job.args, "py", Placement(1, 0, 8, 5, 5, "n1", 20042), 8, False)
    assert cmd[1].endswith("tools/train_seg.py") and "torchrun" not in cmd and cmd[-2:] == ["--launcher", "pytorch"]
    assert env["RANK"] == "5" and cmd[cmd.index("--output-dir") + 1] == str(study.cell_dir(study.cells()[0]))

    # Collecting: still pending -> nothing new is submitted; gone without a result -> resubmitted (resumes)
    result = run_study_jobs(study, "slurm")
    assert result["submitted"] == [] and len(result["pending"]) == 5 and len(list(record.glob("job_*"))) == 5
    (record / "state").write_text("NODE_FAIL")
    result = run_study_jobs(study, "slurm")
    jobs = load_jobs(study)
    assert jobs["backbone MAE"]["job_id"] == "46" and jobs["backbone MAE"]["attempts"] == 2
    assert all(jobs[c]["depends_on"] == "afterok:46" for c in cells)


def test_slurm_study_continues_an_interrupted_shared_pretraining(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared run stopped after epoch 1 of 3 (checkpoint_0001 saved): the backbone job continues it (--resume)
    and then exports both backbones, and the cells wait for it; once the run has ended, a job only exports (one
    process, no --output-dir). `submit` is replaced by a recorder: the jobs are what would go to Slurm."""
    from mae_transfer.study import cluster as study_cluster

    for split in ("train", "val"):
        (tmp_path / "cls" / split / "a").mkdir(parents=True)
    mae = dict(config="configs/mae_pretrain_vit_tiny_cpu.py", data=str(tmp_path), opts=["epochs=3"],
               slurm=dict(gpus_per_node=8))
    study = load_study(dict(name="s3", depth=4, freeze_blocks=[-1], seeds=[0],
                            backbones={"MAE-1": dict(pretrain=mae, epoch=1), "MAE": dict(pretrain=mae)},
                            tasks={"cls": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py", epochs=1,
                                               args=["--data", str(tmp_path / "cls")])}), tmp_path / "out")
    run = study.output_dir / "backbones" / "MAE-1" / "pretrain"
    run.mkdir(parents=True)
    for name in ("checkpoint_0001.pth", "checkpoint_last.pth"):
        (run / name).write_bytes(b"after epoch 1")
    (run / "log.jsonl").write_text('{"epoch": 0}\n')
    submitted = []

    def record(job, executor, folder, res, job_name, dependency=None):
        submitted.append((job, res, dependency))
        return {"job_id": str(40 + len(submitted)), "executor": executor, "folder": str(folder), "stdout": "out",
                "stderr": "err", "submitted": "now"}

    monkeypatch.setattr(study_cluster, "submit", record)
    run_study_jobs(study, "slurm")
    (job, res, dependency), *cells = submitted
    assert job.tool == "pretrain" and "--resume" in job.args and "--export-encoder" not in job.args
    assert job.output_dir == str(run) and res.gpus_per_node == 8 and dependency is None
    assert [c[2:5] for c in job.then] == [["--epoch", "1", "--export-encoder"],
                                          ["--export-encoder", str(run / "checkpoint_last.pth"),
                                           str(run.parent / "backbone.pth")]]
    assert len(cells) == 2 and all(d == "afterok:41" for _, _, d in cells)

    (run / "log.jsonl").write_text('{"epoch": 0}\n' * 3)  # the run has ended; the exports are still missing
    (study.output_dir / "jobs.json").unlink()
    submitted.clear()
    run_study_jobs(study, "slurm")
    job, res, _ = submitted[0]
    assert job.args[:3] == ["--epoch", "1", "--export-encoder"] and len(job.then) == 1
    assert job.output_dir is None and res.gpus_per_node == 0 and res.nodes == 1


# ------------------------------------------------------------------------------------------- local study
def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def test_local_executor_study_with_a_killed_job_resumed_by_the_rerun(tmp_path: Path, camvid_small: Path) -> None:
    """2 real segmentation cells as submitit local jobs (processes): submitted in parallel, one killed (job,
    submitit task and tool: as a node failure) after its first checkpoint; the same command again resubmits it,
    it resumes from that checkpoint, and the table is written from both cells."""
    data = camvid_small
    spec_file = tmp_path / "spec.py"
    spec_file.write_text(
        "depth = 4\nfreeze_blocks = [-1, 2]\nseeds = [0]\nbackbones = {'scratch': None}\n"
        "tasks = {'seg': dict(kind='seg', config='configs/camvid_upernet_vit_tiny_cpu.py', iters=16,\n"
        "    checkpoint_period=4, slurm=dict(time=20), opts=[\n"
        f"    'train_dataloader.dataset.data_root={data}', 'val_dataloader.dataset.data_root={data}',\n"
        f"    'test_dataloader.dataset.data_root={data}', 'train_dataloader.batch_size=2',\n"
        "    'param_scheduler.0.end=1', 'param_scheduler.1.begin=1', 'param_scheduler.1.end={iters}'])}\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "study.py"), "--spec", str(spec_file), "--output-dir", str(out),
           "--executor", "local", "--max-parallel", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 finished" in first.stdout and "(2 submitted now)" in first.stdout
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    assert len(jobs) == 2 and all(e["executor"] == "local" and e["state"] == "pending" for e in jobs.values())

    cells = {f"cell {c}": out / "cells" / c for c in ("scratch__seg__freeze-1__seed0", "scratch__seg__freeze2__seed0")}
    deadline, victim = time.time() + 90, None
    while victim is None:
        assert time.time() < deadline, "no cell wrote a checkpoint"
        failed = [e["stderr"] for e in jobs.values() if (Path(e["folder"]) / f"{e['job_id']}_status.json").is_file()]
        assert not failed, Path(failed[0]).read_text()[-3000:]
        victim = next((k for k, d in cells.items() if (d / "last_checkpoint").is_file()), None)
        time.sleep(0.1)
    assert not (cells[victim] / DONE).is_file(), "the cell finished before it could be killed"
    for pid in _descendants(int(jobs[victim]["job_id"])):  # the job's controller, its task and the tool
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    second = subprocess.run([*cmd, "--wait", "--poll", "1"], capture_output=True, text=True, timeout=150,
                            cwd=tmp_path, env=env)
    logs = "".join(Path(e["stderr"]).read_text()[-2000:] for e in jobs.values() if Path(e["stderr"]).is_file())
    assert second.returncode == 0, second.stderr[-3000:] + logs
    assert "2 finished" in second.stdout and "| scratch | " in second.stdout
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    assert jobs[victim]["attempts"] == 2 and all(e["state"] == "done" for e in jobs.values())
    done = json.loads((cells[victim] / DONE).read_text())
    assert done["resumed"] is True and 0.0 <= done["metrics"]["mIoU"] <= 100.0
    assert "resuming: " in Path(jobs[victim]["stdout"]).read_text()  # the resubmitted job added --resume
    assert "Auto resumed from the latest checkpoint" in Path(jobs[victim]["stdout"]).read_text()  # mmengine's log
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and (out / "plot.png").stat().st_size > 0
    other = next(k for k in cells if k != victim)
    assert json.loads((cells[other] / DONE).read_text())["resumed"] is False
    # nothing left to do: the same command only collects
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert third.returncode == 0 and "2 finished" in third.stdout and "submitted now" not in third.stdout


# ------------------------------------------------------------------------------------------- local bookkeeping
# A stand-in for the interpreter that runs a cell's tool (the spec's `python`): it gets `tools/finetune_cls.py ARGS`,
# records how many cells run at once, and after a short sleep either fails or writes the eval_metrics.json a
# classification run writes. The job around it (submitit's local executor, CellJob, status files, jobs.json) is real.
FAKE_PYTHON = """#!/bin/sh
out=; prev=
for a in "$@"; do [ "$prev" = --output-dir ] && out=$a; prev=$a; done
mkdir -p "$out" {work}/running
touch {work}/running/$$; ls {work}/running | wc -l >> {work}/concurrency
sleep {sleep}
rm {work}/running/$$
if [ -e {work}/fail ]; then echo "error: fake tool: failing as asked" >&2; echo "a later line" >&2; exit 2; fi
echo '{{"task": "cls", "metrics": {{"top1": 42.0, "top5": 100.0}}, "iteration": null, "epoch": 1,' \
     '"checkpoint": null, "tool": "fake", "details": {{}}}}' > "$out/eval_metrics.json"
"""


def fake_cls_study(tmp_path: Path, freeze_blocks: list[int], sleep: float) -> Study:
    work = tmp_path / "fake"
    (work / "data" / "train").mkdir(parents=True)
    (work / "data" / "val").mkdir()
    python = work / "python"
    python.write_text(FAKE_PYTHON.format(work=work, sleep=sleep))
    python.chmod(0o755)
    spec = dict(name="fake", depth=4, freeze_blocks=freeze_blocks, seeds=[0], backbones={"scratch": None},
                python=str(python), tasks={"cls": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py",
                                                       epochs=1, args=["--data", str(work / "data")])})
    return load_study(spec, tmp_path / "out")


def test_local_wait_notices_a_finished_job_within_seconds(tmp_path: Path) -> None:
    """--executor local --wait: a cell's end is seen within seconds (local checks every 2 s), not a minute later."""
    study = fake_cls_study(tmp_path, [0], sleep=1)
    start = time.time()
    result = run_study_jobs(study, "local", wait=True)  # the default interval, as tools/study.py passes it
    total = time.time() - start
    entry = load_jobs(study)[f"cell {study.cells()[0].name}"]
    assert entry["state"] == "done" and result["done"] == [study.cells()[0].name]
    assert json.loads((study.cell_dir(study.cells()[0]) / DONE).read_text())["metrics"] == {"top1": 42.0}
    # the job's own end (its status file) -> the pass that saw it (jobs.json's last write)
    ended = (Path(entry["folder"]) / f"{entry['job_id']}_status.json").stat().st_mtime
    noticed = (study.output_dir / "jobs.json").stat().st_mtime - ended
    print(f"\njob ended -> noticed: {noticed:.2f} s; whole run {total:.1f} s")
    assert 0 <= noticed < 5.0, noticed


def test_retry_failed_resubmits_every_failed_job_once_as_capacity_frees(tmp_path: Path) -> None:
    """3 failed cells, then what `tools/study.py --executor local --retry-failed --wait --max-parallel 1` runs: each
    is resubmitted exactly once, one at a time; failing again, they are reported (not retried again) in one error."""
    study = fake_cls_study(tmp_path, [0, 2, -1], sleep=0.2)
    work = tmp_path / "fake"
    (work / "fail").touch()
    with pytest.raises(MaeTransferError, match="3 job.s. failed, first: cell .*: finetune_cls.py failed with exit "
                       "status 2: fake tool: failing as asked .log: .*; --retry-failed resubmits them"):
        run_study_jobs(study, "local", max_parallel=3, wait=True)
    first = load_jobs(study)
    assert sorted(e["attempts"] for e in first.values()) == [1, 1, 1] and all(e["state"] == "failed"
                                                                               for e in first.values())
    (work / "concurrency").unlink()

    with pytest.raises(MaeTransferError, match="3 job.s. failed.*3 of them failed again after --retry-failed"):
        run_study_jobs(study, "local", max_parallel=1, retry_failed=True, wait=True, poll_s=0.5)
    again = load_jobs(study)
    assert {k: e["attempts"] for k, e in again.items()} == {k: 2 for k in first}  # each resubmitted once
    assert all(again[k]["job_id"] != first[k]["job_id"] and again[k]["state"] == "failed" for k in first)
    assert (work / "concurrency").read_text().split() == ["1", "1", "1"]  # one at a time: --max-parallel 1


def test_local_executor_continues_an_interrupted_shared_pretraining(shared_run, tmp_path: Path) -> None:  # noqa: F811
    """--executor local on a study whose shared pretraining was stopped after epoch 1 (of 3): the backbone job
    continues the run (--resume) and exports what the uninterrupted run exports, bit for bit; with only an export
    missing, the job exports alone (no --output-dir needed, nothing trained). The cells' tool is the fake above;
    pretraining is real."""
    spec_dict, reference = shared_run
    work = tmp_path / "fake"
    work.mkdir()
    python = work / "python"
    python.write_text(f'#!/bin/sh\ncase "$1" in */pretrain.py) exec {sys.executable} "$@";; esac\n'
                      + FAKE_PYTHON.format(work=work, sleep=0).split("\n", 1)[1])
    python.chmod(0o755)
    study = load_study({**spec_dict, "python": str(python)}, tmp_path / "out")
    run = stop_after_epoch_1(reference["MAE"].parents[2], study.output_dir)

    def backbones_of_cells() -> dict[str, Path]:
        return {c.backbone: Path(json.loads((study.cell_dir(c) / DONE).read_text())["checkpoint"])
                for c in study.cells()}

    result = run_study_jobs(study, "local", max_parallel=2, wait=True, poll_s=0.5)
    entry = load_jobs(study)["backbone MAE-1"]
    assert len(result["done"]) == 2 and entry["state"] == "done" and entry["attempts"] == 1
    assert f"resumed from {run / 'checkpoint_last.pth'} (1 epoch(s) done)" in Path(entry["stderr"]).read_text()
    made = backbones_of_cells()
    assert_same_backbones(made, reference)

    cell = next(c for c in study.cells() if c.backbone == "MAE")
    (study.cell_dir(cell) / DONE).unlink()
    made["MAE"].unlink()
    run_study_jobs(study, "local", wait=True, poll_s=0.5)
    entry = load_jobs(study)["backbone MAE-1"]
    assert entry["state"] == "done" and entry["attempts"] == 2
    started = next(line for line in Path(entry["stdout"]).read_text().splitlines() if line.startswith("[mae-transfer]"))
    assert "--export-encoder" in started and "--config" not in started  # the job's own command: an export
    assert_same_backbones(backbones_of_cells(), reference)


# ------------------------------------------------------------------------------------------- README
def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_readme_tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_cluster_commands_use_only_existing_options() -> None:
    """Every command of the README's "Running on a cluster" section parses with the tools' own parsers (submit.py,
    then the tool it submits; study.py), and every option the prose names is one of submit.py's."""
    import shlex

    from mae_transfer.cluster import parse_tool_args

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith(".venv/bin/python tools/")]
    assert [c[1] for c in commands] == ["tools/submit.py", "tools/submit.py", "tools/study.py"]
    submit_parser = _load_tool("submit").build_parser()
    tools = []
    for cmd in commands[:2]:
        args = submit_parser.parse_args(cmd[2:])  # an unknown option exits here
        parse_tool_args(args.tool, args.tool_args)
        tools.append((args.tool, args.nodes, args.gpus_per_node))
    assert tools == [("pretrain", 2, 8), ("train_det", 1, 8)]
    study_args = _load_tool("study").parse_args(commands[2][2:])
    assert study_args.executor == "slurm" and (REPO_ROOT / study_args.spec).is_file()
    known = {s for a in submit_parser._actions for s in a.option_strings}
    named = set(re.findall(r"`(--[a-z-]+)", section)) - {"--executor", "--slurm", "--retry-failed", "--max-parallel",
                                                         "--wait", "--poll", "--resume", "--launcher", "--num-gpus",
                                                         "--num-machines", "--machine-rank", "--dist-url",
                                                         "--output-dir", "--signal", "--dependency"}
    assert named <= known, named - known
    # the study options the section names (left out above) exist too
    _load_tool("study").parse_args(["--spec", "s.py", "--executor", "local", "--retry-failed", "--max-parallel", "2",
                                    "--wait", "--poll", "1", "--slurm", "time=10"])


def test_submitit_is_imported_only_when_a_job_is_made() -> None:
    code = ("import sys, mae_transfer.cluster, mae_transfer.study.cluster, mae_transfer.study; "
            "assert 'submitit' not in sys.modules, 'submitit imported at import time'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
