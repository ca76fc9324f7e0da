#!/usr/bin/env python
"""The main demo job: MAE pretraining -> checkpoint conversion -> detectron2 + MMSeg fine-tuning, on CPU.

    bash scripts/run_demo.sh                    # set-up + this script with the built-in data
    .venv/bin/python tools/demo.py --output-dir demo_output --det-iters 60 --seg-iters 60
    .venv/bin/python tools/demo.py --images ../shared/data/coco_tiny/train2017 \\
        --det-data ../shared/data/coco_tiny --seg-data ../shared/data/ade20k_sample --output-dir demo_real

Steps (each one runs the real tool in a subprocess, exactly as a user would):
  1. data       generate the built-in set, for whatever the options below leave out: rendered shapes whose
                class shows in the outline only (COCO json + semantic labels), label-scarce (32 training
                pictures, 24 to evaluate on), and an unlabelled pool of 320 pictures of the same kind
  2. pretrain   tools/pretrain.py, tiny MAE (configs/mae_pretrain_vit_tiny_cpu.py) on the unlabelled pool
                -> reconstruction picture
  3. convert    tools/convert_checkpoint.py --to detectron2 (the seg run imports the MAE file directly)
  4. detect     tools/train_det.py, tiny Mask R-CNN, COCOEvaluator (bbox + segm), then --infer pictures
  5. segment    tools/train_seg.py, tiny UperNet (300 iterations at lr 1e-3: benchmarks/demo_pilot), IoU per
                class in the summary, then colourised prediction pictures
  6. mini-study mae_transfer.study: {MAE, scratch} x {all 4 blocks fine-tuned, frozen ViT} x seeds {0, 1}
                on the seg task; the summary states MAE - scratch (mIoU, mean ± std over the seed pairs, n)
                for each freeze setting, whatever its sign

Real data instead of the built-in set (checked before the first step runs: a bad path ends with one
`error: ...` line and exit status 2):
  --images DIR      unlabeled images for pretraining (.jpg/.png, searched recursively)
  --det-data ROOT   a COCO root: annotations/instances_{train,val}2017.json + {train,val}2017/
                    (one split only: trained and evaluated on it, with a warning)
  --det-train-json J --det-train-images DIR [--det-val-json J --det-val-images DIR]
                    any COCO instances json + image folder (no val pair: evaluated on the training set)
  --seg-data ROOT   ADE20K: ROOT or ROOT/ADEChallengeData2016 with {images,annotations}/validation
                    (+ .../training), run with configs/ade20k_upernet_vit_tiny_cpu.py (150 classes; without
                    a training split it trains on validation, with a warning); or the built-in layout
                    ROOT/{images,labels}/{train,val} with configs/shapes_upernet_vit_tiny_cpu.py.
                    --seg-root is the old name of --seg-data.
A full-size dataset makes each step as long as that dataset needs (CPU: minutes per thousand images).

Resumable: every finished step leaves a DONE marker and is skipped when the same command runs again; an
interrupted training resumes from its last checkpoint (Ctrl-C or `kill` prints one line and exits with 130).
An output folder keeps its settings (demo_settings.json): other settings need another --output-dir, or
delete it. The steps, data checks and summary live in harnesses/demo.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harnesses import demo  # noqa: E402
from mae_transfer.cli import run_cli  # noqa: E402
from mae_transfer.paths import REPO_ROOT  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output-dir", type=Path, default=REPO_ROOT / "demo_output", metavar="DIR",
                   help="output folder (default: demo_output)")
    p.add_argument("--images", metavar="DIR", help="unlabeled image folder for MAE pretraining (default: built-in)")
    p.add_argument("--det-data", metavar="ROOT", help="COCO root (annotations/instances_{train,val}2017.json + images)")
    p.add_argument("--det-train-json", metavar="JSON"), p.add_argument("--det-train-images", metavar="DIR")
    p.add_argument("--det-val-json", metavar="JSON"), p.add_argument("--det-val-images", metavar="DIR")
    p.add_argument("--seg-data", "--seg-root", dest="seg_data", metavar="ROOT",
                   help="segmentation data: an ADE20K root or the built-in layout (see above)")
    p.add_argument("--mae-epochs", type=int, default=demo.Schedule.mae_epochs)
    p.add_argument("--det-iters", type=int, default=demo.Schedule.det_iters)
    p.add_argument("--seg-iters", type=int, default=demo.Schedule.seg_iters)
    p.add_argument("--study-iters", type=int, default=demo.Schedule.study_iters)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    schedule = demo.Schedule(args.mae_epochs, args.det_iters, args.seg_iters, args.study_iters)
    sources = demo.DataSources(images=args.images, det_data=args.det_data, det_train_json=args.det_train_json,
                               det_train_images=args.det_train_images, det_val_json=args.det_val_json,
                               det_val_images=args.det_val_images, seg_data=args.seg_data)
    # the study runner (step 6) reports its cells through logging
    logging.basicConfig(level=logging.WARNING, format="[demo]   %(message)s")
    logging.getLogger("mae_transfer.study").setLevel(logging.INFO)
    return demo.run(args.output_dir, sources, schedule)


if __name__ == "__main__":
    sys.exit(run_cli(main))
