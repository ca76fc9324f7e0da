#!/usr/bin/env python
r"""Train / evaluate UperNet with our ViT in MMSegmentation (mmengine Runner).

    python tools/train_seg.py --config configs/ade20k_upernet_vit_b.py --output-dir work_dirs/vit_b \
        --init-checkpoint mae_pretrain.pth [--freeze-blocks 4] [--cfg-options k=v ...]
    python tools/train_seg.py --config CONFIG --output-dir DIR --resume [CKPT]     # default: its last checkpoint
    python tools/train_seg.py --config CONFIG --output-dir DIR --eval-only [CKPT] --pictures-dir pics/
    python -m torch.distributed.run --nproc_per_node 8 tools/train_seg.py --config CONFIG --launcher pytorch
    python tools/train_seg.py --config configs/ade20k_upernet_vit_b.py --num-gpus 1 --plan   # the recipe, then exit

The recipe stays the config's on any GPU count: mmseg's 16 images per optimizer step are --images-per-gpu (default:
the reference's 2) x GPUs x gradient accumulation (optim_wrapper.accumulative_counts); --total-batch B scales lr and
schedule by the linear rule; fp16 AMP on GPUs (--cfg-options amp=bf16|none). It is printed before training and saved
as OUTPUT_DIR/recipe.json; --plan prints it alone (JSON on stdout). More than one GPU: under torchrun with --launcher
pytorch (--num-gpus, when given, must match its WORLD_SIZE).

The final validation (training) or the test (--eval-only) is written to OUTPUT_DIR/eval_metrics.json.
Bad input (missing data, labels outside the classes, a checkpoint that does not fit, an unknown
config key) ends with one `error: ...` line and exit status 2 (`--debug` shows the traceback).
The work is done by mae_transfer/segmentation/train.py.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mae_transfer.cli import default_argument_parser, finish_args, run_cli, take_backbone  # noqa: E402
from mae_transfer.recipe import add_recipe_arguments, check_counts  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = default_argument_parser(__doc__.split("\n")[0], "MMEngine config, e.g. configs/ade20k_upernet_vit_b.py",
                                backbone="--init-checkpoint")
    p.epilog = __doc__.split("\n", 2)[2]
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override existing config keys, e.g. train_cfg.max_iters=1000 (unknown keys are an error)")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none",
                   help="mmengine distributed launcher (multi-GPU / multi-node)")
    p.add_argument("--init-checkpoint", help="backbone weights, any format mae_transfer.checkpoint imports")
    p.add_argument("--freeze-blocks", type=int, help="freeze patch embedding + the first k blocks (-1: all)")
    p.add_argument("--pictures-dir", metavar="DIR",
                   help="write colourised ground truth | prediction pictures of the test set to DIR")
    p.add_argument("--num-pictures", type=int, default=8, help="pictures to write with --pictures-dir")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs (processes) per machine: for --plan; under a launcher checked against its WORLD_SIZE")
    p.add_argument("--num-machines", type=int, default=1, help="machines (for --plan and the check)")
    add_recipe_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = finish_args(parser.parse_args(argv), "cfg_options")
    take_backbone(args, "--init-checkpoint", "cfg_options", "model.backbone.init_checkpoint")
    if not args.config:
        parser.error("the following arguments are required: --config")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_counts(args)
    from mae_transfer.recipe import print_plan
    from mae_transfer.segmentation import recipe as segmentation_recipe
    from mae_transfer.segmentation import train as segmentation

    if args.plan:
        print_plan(segmentation_recipe.plan_from_args(args))
        return 0
    from mae_transfer.checkpoint.hub import is_hub_name, resolve_hub_name

    if is_hub_name(args.init_checkpoint):  # timm:<model> / hf-hub:<repo>: huggingface_hub's cache
        args.init_checkpoint = str(resolve_hub_name(args.init_checkpoint))
    segmentation.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
