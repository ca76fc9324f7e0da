#!/usr/bin/env python
r"""Train / evaluate / run Mask R-CNN with our plain ViT in detectron2 (LazyConfig, ViTDet recipe).

  python tools/train_det.py --config configs/coco_mask_rcnn_vit_b.py train.init_checkpoint=mae.pth
  python tools/train_det.py --config configs/coco_mask_rcnn_vit_tiny_cpu.py --output-dir out/det \
      --train-json D/trainval.json --train-images D/images --val-json ... --val-images ...
  python tools/train_det.py --config ... --output-dir out/det --eval-only [CKPT]  # default: its last checkpoint
  python tools/train_det.py --config ... --output-dir out/det --resume [CKPT]     # default: its last checkpoint
  python tools/train_det.py --config ... --infer a.jpg b.jpg --pictures-dir vis/  # ground truth | prediction
  python tools/train_det.py --config ... --num-gpus 8 [--num-machines 2 --machine-rank 0 --dist-url tcp://...]
  python tools/train_det.py --config configs/coco_mask_rcnn_vit_l.py --num-gpus 8 --plan   # the recipe, then exit

The recipe stays the config's on any GPU count: ViTDet's 64 images per optimizer step are --images-per-gpu
(default: the reference's 1) x GPUs x gradient accumulation; --total-batch B scales lr and schedule by the linear
rule. It is printed before training and saved as OUTPUT_DIR/recipe.json; --plan prints it alone (JSON on stdout).

`key=value` config overrides go anywhere on the line; unknown keys are an error. The final evaluation
(training with evaluation, or --eval-only) is written to OUTPUT_DIR/eval_metrics.json. The work is done by
mae_transfer/detection/train.py (as detectron2's tools/lazyconfig_train_net.py, plus checks and checkpoint import).
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
    p = default_argument_parser(__doc__.split("\n")[0], "LazyConfig file, e.g. configs/coco_mask_rcnn_vit_b.py",
                                backbone="train.init_checkpoint=NAME")
    p.epilog = __doc__.split("\n", 2)[2]
    p.add_argument("--freeze-blocks", type=int, default=None,
                   help="freeze patch embed + the first k ViT blocks (-1: the whole ViT)")
    p.add_argument("--train-json", help="COCO-format annotation json for training (instead of coco_2017_train)")
    p.add_argument("--train-images", help="image folder for --train-json")
    p.add_argument("--val-json", help="COCO-format annotation json for evaluation (instead of coco_2017_val)")
    p.add_argument("--val-images", help="image folder for --val-json")
    p.add_argument("--infer", nargs="+", metavar="IMAGE", help="run the model on these images (or folders)")
    p.add_argument("--pictures-dir", metavar="DIR", help="folder for --infer pictures (default: OUTPUT_DIR/vis)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="--infer: minimum score drawn")
    p.add_argument("--top-k", type=int, default=10,
                   help="--infer: draw at most the K best detections after class-agnostic NMS (0: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs (processes) per machine (default 1)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="e.g. tcp://host:port for multi-machine runs")
    add_recipe_arguments(p)
    p.add_argument("opts", nargs="*", default=[], help="config overrides key=value, e.g. train.max_iter=100")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = finish_args(parser.parse_intermixed_args(argv), "opts")  # overrides and flags in any order
    take_backbone(args, None, "opts", "train.init_checkpoint")
    if not args.config:
        parser.error("the following arguments are required: --config")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_counts(args)
    from detectron2.engine import launch

    from mae_transfer import recipe
    from mae_transfer.detection import recipe as detection_recipe
    from mae_transfer.detection import train as detection

    if args.plan:
        recipe.print_plan(detection_recipe.plan_from_args(args))
        return 0
    detection_recipe.check_launcher()
    args.num_gpus = args.num_gpus or 1
    if args.num_gpus * args.num_machines > 1:
        launch(detection.run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    else:
        detection.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
