#!/usr/bin/env python
"""Submit one of the training tools as a Slurm job (or a local process): the tool's distributed mode set up from
the job, requeued on preemption / timeout, resumed from its last checkpoint (see mae_transfer/cluster.py).

  python tools/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 72:00:00 \\
      pretrain --config configs/mae_pretrain_vit_l.py --data /datasets/imagenet/train --output-dir work_dirs/mae_l
  python tools/submit.py --gpus-per-node 8 --cpus-per-task 80 train_det --config ... --output-dir DIR
  python tools/submit.py --dry-run ... TOOL ...        # print the sbatch script, submit nothing

TOOL: pretrain, finetune_cls, train_det or train_seg, followed by the tool's own arguments (checked by its parser
now); --output-dir is required (the requeued job resumes from there). Logs: --log-dir (default OUTPUT_DIR/jobs).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mae_transfer.cli import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--executor", choices=["slurm", "local"], default="slurm",
                   help="slurm (sbatch), or local: a process on this machine, the same job code")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, help="per GPU task; for train_det per node (it spawns the workers)")
    p.add_argument("--mem", help="memory per node, Slurm syntax: 256G, 0 = all")
    p.add_argument("--partition")
    p.add_argument("--time", default="24:00:00", help="time limit: minutes or [D-]HH:MM:SS")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                   help="a further sbatch flag, e.g. constraint=a100 or exclusive (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the job before the tool, e.g. 'module load cuda/12.4' (repeatable)")
    p.add_argument("--job-name", help="default: TOOL:OUTPUT_DIR's name")
    p.add_argument("--log-dir", help="submitit folder: logs and job files (default OUTPUT_DIR/jobs)")
    p.add_argument("--signal-delay", type=int, default=90, metavar="SECONDS",
                   help="USR2 this long before the time limit: the job stops and requeues itself")
    p.add_argument("--max-requeues", type=int, default=3, help="requeues after a timeout (preemptions not counted)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the tool command only")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors (handled by run_cli)")
    from mae_transfer.task_kinds import TOOLS

    p.add_argument("tool", help=" | ".join(TOOLS))
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's arguments")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mae_transfer.cluster import submit_tool

    sbatch = dict(item.split("=", 1) if "=" in item else (item, True) for item in args.sbatch)
    resources = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                     mem=args.mem, partition=args.partition, time=args.time, account=args.account, qos=args.qos,
                     job_name=args.job_name, sbatch=sbatch, setup=args.setup, signal_delay_s=args.signal_delay,
                     max_requeues=args.max_requeues)
    print(submit_tool(args.tool, args.tool_args, args.executor, resources, args.log_dir, args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
