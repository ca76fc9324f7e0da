#!/usr/bin/env python
"""Convert any supported ViT checkpoint to our backbone / detectron2 / mmseg layout.

    python tools/convert_checkpoint.py mae_pretrain_vit_base.pth out/vitb_d2.pth --to detectron2 \
        --model vit_base_patch16_224 --window-size 14 --global-blocks 2 5 8 11 --use-rel-pos \
        --rel-pos-input-size 1024

Prints the load report (format, loaded / resized tensors, tensors kept at init, unused keys by what they are).
The output is written atomically: on any error nothing is left at DST. Training tools accept the SRC file
directly as well.
A detectron2 file holds what detectron2's ViTDet `ViT` loads: the pretraining position table with its cls row
(keep the default --img-size 224, no --no-cls-token: detectron2 resizes it at run time), no cls token or final norm.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_transfer.cli import run_cli  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint file or Hugging Face model folder")
    p.add_argument("dst", help="output file")
    p.add_argument("--to", required=True, choices=("backbone", "detectron2", "mmseg"))
    p.add_argument("--model", default="vit_base_patch16_224", help="target ViT name (backbones.vit.VIT_SIZES)")
    p.add_argument("--depth", type=int, default=None, help="number of blocks, if not the named model's")
    p.add_argument("--img-size", type=int, default=224,
                   help="size the absolute pos-embed table is built for (other sizes: resized, bicubic)")
    p.add_argument("--no-cls-token", action="store_true", help="target without cls token (ViTDet style)")
    p.add_argument("--window-size", type=int, default=0)
    p.add_argument("--global-blocks", type=int, nargs="*", default=[])
    p.add_argument("--use-rel-pos", action="store_true", help="target has decomposed rel-pos tables (created fresh)")
    p.add_argument("--rel-pos-input-size", type=int, default=None)
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoints that contain pickled Python objects (only for files you trust)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from backbones.vit import create_vit
    from mae_transfer.checkpoint import convert_checkpoint

    overrides = {} if args.depth is None else {"depth": args.depth}
    model = create_vit(args.model, img_size=args.img_size, class_token=not args.no_cls_token, **overrides,
                       window_size=args.window_size, global_block_indexes=args.global_blocks,
                       use_rel_pos=args.use_rel_pos, rel_pos_input_size=args.rel_pos_input_size)
    report = convert_checkpoint(args.src, args.dst, args.to, model, allow_pickle=args.allow_pickle)
    print(report)
    print(f"wrote {args.dst} ({args.to} layout)")
    if args.to == "detectron2":
        print(f"detectron2 ViT settings for it: pretrain_img_size={args.img_size}, "
              f"pretrain_use_cls_token={not args.no_cls_token}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
