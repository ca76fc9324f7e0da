#!/usr/bin/env python
"""MAE pretraining CLI (single process, or `torchrun --nproc_per_node N tools/pretrain.py ...`).

  python tools/pretrain.py --config configs/mae_pretrain_vit_tiny_cpu.py --data IMAGES --output-dir OUT \
      [--resume [CKPT]] [key=value ...] [--opts key=value ...] [--debug]
  python tools/pretrain.py --export-encoder MAE_CKPT OUT_BACKBONE   # encoder alone, as a backbone checkpoint
  python tools/pretrain.py --epoch 20 --export-encoder OUT/checkpoint_0020.pth OUT_BACKBONE   # a mid-run epoch
  python tools/pretrain.py --config configs/supervised_pretrain_vit_tiny_cpu.py --data IMAGEFOLDER ...
      # the supervised baseline (objective="supervised"): same training loop, class = first-level subfolder

User errors (missing/empty image folder, unknown model or config key, ...) print one line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mae_transfer.cli import default_argument_parser, finish_args, run_cli, setup_training_cli  # noqa: E402
from mae_transfer.errors import MaeTransferError  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # Pretraining evaluates no checkpoint and reads only its own (never pickled): no --eval-only, --allow-pickle.
    parser = default_argument_parser("MAE pretraining of a plain ViT", "plain-Python pretraining config "
                                     "(configs/mae_pretrain_*.py)", eval_only=False, allow_pickle=False)
    parser.add_argument("--data", help="image folder (ImageFolder-style or flat, searched recursively)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if the config says resume")
    parser.add_argument("--export-encoder", nargs=2, metavar=("MAE_CKPT", "OUT"),
                        help="write the encoder of a pretraining checkpoint as a backbone checkpoint and exit "
                        "(the checkpoint of a finished run, or of the --epoch given)")
    parser.add_argument("--epoch", type=int, metavar="N", help="with --export-encoder: the checkpoint holds exactly "
                        "N completed epochs (an unfinished run's checkpoint is exported only so)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return finish_args(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank = setup_training_cli(args)
    from mae_transfer.pretraining import export_encoder, pretrain

    if args.epoch is not None and not args.export_encoder:
        raise MaeTransferError("--epoch is for --export-encoder (which epoch the exported checkpoint holds)")
    if args.export_encoder:
        export_encoder(*args.export_encoder, epoch=args.epoch)
        return 0
    if not args.config:
        raise MaeTransferError("--config is required (e.g. configs/mae_pretrain_vit_tiny_cpu.py)")
    from mae_transfer.config import load_config

    cfg = load_config(args.config, [*args.overrides, *args.opts])
    if args.data:
        cfg["data_path"] = args.data
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
    elif not cfg.get("output_dir"):
        cfg["output_dir"] = str(Path("work_dirs") / Path(args.config).stem)
    if args.resume is not None:
        cfg["resume"] = args.resume
    if args.no_resume:
        cfg["resume"] = ""
    history = pretrain(cfg)
    if history and rank == 0:
        logging.getLogger("pretrain").info("done: epoch %d loss %.4f, outputs in %s",
                                           history[-1]["epoch"], history[-1]["loss"], cfg["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
