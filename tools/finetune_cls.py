#!/usr/bin/env python
"""Image classification: end-to-end / partial fine-tuning and linear probing of the plain ViT (MAE protocol).

  python tools/finetune_cls.py --config configs/cls_finetune_vit_b.py --data IMAGENET --finetune MAE_CKPT \
      --output-dir OUT [--freeze-blocks K] [--resume [CKPT]] [key=value ...] [--debug]
  python tools/finetune_cls.py --config configs/cls_linprobe_vit_b.py --data IMAGENET --finetune MAE_CKPT ...
  python tools/finetune_cls.py --config ... --data ROOT --eval-only FINETUNED_CKPT   # top-1/top-5 on ROOT/val
  torchrun --nproc_per_node 8 tools/finetune_cls.py ...                              # DDP (gloo on CPU)

ROOT holds train/<class>/* and val/<class>/*; `tools/coco_to_imagefolder.py` builds one from any COCO json.
--finetune takes any checkpoint format tools/convert_checkpoint.py reads (ours, official MAE, timm, DeiT, HF, ...).
User errors (missing/empty class folder, unreadable image, mismatched checkpoint, unknown key) print one
line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mae_transfer.cli import (  # noqa: E402
    default_argument_parser,
    finish_args,
    run_cli,
    setup_training_cli,
    take_backbone,
)
from mae_transfer.errors import MaeTransferError  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = default_argument_parser("ViT classification fine-tuning / linear probing", "plain-Python config "
                                     "(configs/cls_finetune_*.py, configs/cls_linprobe_*.py)", backbone="--finetune")
    parser.add_argument("--data", help="ImageFolder root with train/ and val/ class folders")
    parser.add_argument("--finetune", help="pretrained checkpoint to start from (any supported format)")
    parser.add_argument("--freeze-blocks", type=int,
                        help="partial fine-tuning: freeze the first K blocks (-1: all but the head)")
    parser.add_argument("--keep-patch-size", action="store_true",
                        help="build the ViT with the pretrained file's patch size (e.g. 14 for DINOv2 / EVA-02) "
                        "instead of the config's; det/seg resample to 16 px instead (README: Backbone families)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = finish_args(parser.parse_args(argv))
    take_backbone(args, "--finetune", "overrides", "finetune")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank = setup_training_cli(args)
    if not args.config:
        raise MaeTransferError("--config is required (e.g. configs/cls_finetune_vit_tiny_cpu.py)")
    from mae_transfer.classification import evaluate_checkpoint, finetune
    from mae_transfer.config import load_config

    cfg = load_config(args.config, args.overrides)
    for key, value in (("data_path", args.data), ("output_dir", args.output_dir), ("finetune", args.finetune),
                       ("freeze_blocks", args.freeze_blocks), ("resume", args.resume),
                       ("allow_pickle", args.allow_pickle or None)):
        if value is not None:
            cfg[key] = value
    if not cfg.get("output_dir"):
        cfg["output_dir"] = str(Path("work_dirs") / Path(args.config).stem)
    from mae_transfer.checkpoint.hub import is_hub_name, resolve_hub_name

    if is_hub_name(cfg.get("finetune")):  # timm:<model> / hf-hub:<repo>: huggingface_hub's cache
        cfg["finetune"] = str(resolve_hub_name(cfg["finetune"]))
    if args.keep_patch_size:
        if not cfg.get("finetune"):
            raise MaeTransferError("--keep-patch-size needs the pretrained file (--finetune or finetune=PATH)")
        from mae_transfer.checkpoint.fitting import checkpoint_patch_size

        cfg["encoder_overrides"] = {**cfg.get("encoder_overrides", {}),
                                    "patch_size": checkpoint_patch_size(cfg["finetune"], bool(cfg.get("allow_pickle")))}
    log = logging.getLogger("finetune_cls")
    if args.eval_only:
        m = evaluate_checkpoint(cfg, args.eval_only)
        if rank == 0:
            log.info("%s on %s/val (%d images): top-1 %.2f  top-%d %.2f  loss %.4f", m["checkpoint"], cfg["data_path"],
                     m["num_images"], m["acc1"], m["topk"], m["acc5"], m["loss"])
        return 0
    history = finetune(cfg)
    if history and rank == 0:
        last = history[-1]
        log.info("done: epoch %d, val top-1 %.2f, outputs in %s", last["epoch"], last.get("acc1", float("nan")),
                 cfg["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
