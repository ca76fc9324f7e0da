#!/usr/bin/env python
r"""Build a labelled ImageFolder of object crops from any COCO instances json (a small real classification set).

  python tools/coco_to_imagefolder.py --json ANN.json --images IMAGE_DIR --output-dir OUT \
      [--val-fraction 0.25] [--min-size 16]

With --val-fraction, photos are split (crops of one photo stay on one side): OUT/train/<category>/*.jpg and
OUT/val/<category>/*.jpg, the layout tools/finetune_cls.py reads. Without it: OUT/<category>/*.jpg.
Re-running keeps existing crops. Bad input (missing/malformed json, missing image) prints one line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_transfer.cli import run_cli  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--json", required=True, help="COCO instances json")
    p.add_argument("--images", required=True, help="folder the json's file_name entries are relative to")
    p.add_argument("--output-dir", help="output ImageFolder root (required)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of photos for OUTPUT_DIR/val (0: no split)")
    p.add_argument("--min-size", type=int, default=16, help="smallest box side in pixels to keep")
    p.add_argument("--context", type=float, default=0.1, help="margin around each box, as a fraction of its size")
    args = p.parse_args(argv)
    if not args.output_dir:
        p.error("the following arguments are required: --output-dir")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    from mae_transfer.coco import coco_crops_to_imagefolder
    from mae_transfer.io import check_output_dir

    check_output_dir(args.output_dir)
    counts = coco_crops_to_imagefolder(args.json, args.images, args.output_dir, args.min_size, args.context,
                                       args.val_fraction)
    for name, n in sorted(counts.items()):
        print(f"{name}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
