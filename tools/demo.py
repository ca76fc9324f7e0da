#!/usr/bin/env python
"""The main demo job: MAE pretraining -> checkpoint conversion -> detectron2 + MMSeg fine-tuning, on CPU.

    bash scripts/run_demo.sh                    # set-up + this script with the built-in data
    .venv/bin/python tools/demo.py --output demo_output --det-iters 60 --seg-iters 60

Steps (each one runs the real tool in a subprocess, exactly as a user would):
  1. data       generate the built-in set (rendered shapes: COCO json + semantic labels) and an unlabeled
                folder (those images + scikit-image's sample photos), or use --images / --det-* / --seg-root
  2. pretrain   tools/pretrain.py, tiny MAE (configs/mae_pretrain_vit_tiny_cpu.py) -> reconstruction picture
  3. convert    tools/convert_checkpoint.py --to detectron2 (the seg run imports the MAE file directly)
  4. detect     tools/train_det.py, tiny Mask R-CNN, COCOEvaluator (bbox + segm), then --infer pictures
  5. segment    tools/train_seg.py, tiny UperNet, IoUMetric, then colourised prediction pictures
  6. mini-study mae_transfer.study: {MAE, scratch} x {all 4 blocks fine-tuned, frozen ViT} on the seg task
Finished steps are skipped when the demo is run again (delete --output to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mae_transfer.cli import run_cli  # noqa: E402
from mae_transfer.errors import MaeTransferError  # noqa: E402

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--depth", "4"]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_tool(args: list[str], log_file: Path) -> None:
    """Run one of our tools with this interpreter; its output goes to `log_file` (tail shown on failure)."""
    cmd = [sys.executable, *args]
    log("$ " + " ".join(str(a) for a in args))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_file, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise MaeTransferError(f"step failed (exit {proc.returncode}), see {log_file}:\n{tail}")
    log(f"  done in {time.time() - start:.0f} s (log: {log_file})")


def prepare_data(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    from mae_transfer.synthetic import make_shapes_dataset

    shapes = make_shapes_dataset(out / "data" / "shapes", num_train=32, num_val=8, size=192)
    paths = dict(
        det_train_json=args.det_train_json or shapes / "annotations" / "instances_train.json",
        det_train_images=args.det_train_images or shapes / "images" / "train",
        det_val_json=args.det_val_json or shapes / "annotations" / "instances_val.json",
        det_val_images=args.det_val_images or shapes / "images" / "val",
        seg_root=args.seg_root or shapes,
    )
    if args.images:
        paths["unlabeled"] = Path(args.images)
    else:  # the generated pictures plus real photos that ship with scikit-image
        unlabeled = out / "data" / "unlabeled"
        if not (unlabeled / ".complete").is_file():
            unlabeled.mkdir(parents=True, exist_ok=True)
            for img in sorted((shapes / "images" / "train").glob("*.png")):
                shutil.copy(img, unlabeled / f"shapes_{img.name}")
            from PIL import Image
            from skimage import data as skdata

            for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                         "motorcycle_left", "retina"):
                try:
                    arr = getattr(skdata, name)()
                except Exception:  # some sample images need an optional download: skip those
                    continue
                Image.fromarray(arr).convert("RGB").save(unlabeled / f"skimage_{name}.png")
            (unlabeled / ".complete").write_text("ok")
        paths["unlabeled"] = unlabeled
    return paths


def pretrain(args: argparse.Namespace, out: Path, data: dict[str, Path]) -> dict[str, Any]:
    mae_dir = out / "mae"
    ckpt = mae_dir / "checkpoint_last.pth"
    if not (mae_dir / "DONE").is_file():
        run_tool(["tools/pretrain.py", "--config", "configs/mae_pretrain_vit_tiny_cpu.py", "--data", str(data["unlabeled"]),
                  "--output-dir", str(mae_dir), f"epochs={args.mae_epochs}", f"save_every={args.mae_epochs}",
                  "progress=False"], out / "logs" / "pretrain.log")
        (mae_dir / "DONE").write_text("ok")
    history = [json.loads(line) for line in (mae_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [h["loss"] for h in history if "loss" in h]
    pictures = sorted(mae_dir.glob("recon_epoch*.png"))
    return dict(checkpoint=ckpt, first_loss=losses[0], last_loss=losses[-1], epochs=len(losses),
                picture=pictures[-1] if pictures else None)


def convert(out: Path, mae_ckpt: Path) -> Path:
    """To the layout of configs/coco_mask_rcnn_vit_tiny_cpu.py's backbone (224-px position table with the
    cls slot, as ViTDet keeps it; windows 8, global blocks 1 and 3, rel-pos for 256 px)."""
    dst = out / "mae" / "backbone_detectron2.pth"
    if not dst.is_file():
        run_tool(["tools/convert_checkpoint.py", str(mae_ckpt), str(dst), "--to", "detectron2", *TINY_VIT,
                  "--img-size", "224", "--window-size", "8", "--global-blocks", "1", "3",
                  "--use-rel-pos", "--rel-pos-input-size", "256"], out / "logs" / "convert.log")
    return dst


def detect(args: argparse.Namespace, out: Path, data: dict[str, Path], init: Path) -> dict[str, Any]:
    det_dir = out / "det"
    data_args = ["--train-json", str(data["det_train_json"]), "--train-images", str(data["det_train_images"]),
                 "--val-json", str(data["det_val_json"]), "--val-images", str(data["det_val_images"])]
    cfg = ["--config", "configs/coco_mask_rcnn_vit_tiny_cpu.py"]
    if not (det_dir / "DONE").is_file():
        run_tool(["tools/train_det.py", *cfg, *data_args, *(["--resume"] if (det_dir / "last_checkpoint").is_file() else []),
                  f"train.output_dir={det_dir}", f"train.init_checkpoint={init}", f"train.max_iter={args.det_iters}",
                  f"train.eval_period={args.det_iters}", f"train.checkpointer.period={args.det_iters}",
                  "optimizer.lr=5e-4",  # a few hundred CPU iterations instead of ViTDet's 184k
                  f"lr_multiplier.scheduler.num_updates={args.det_iters}",
                  f"lr_multiplier.scheduler.milestones=[{int(args.det_iters * 0.8)},{int(args.det_iters * 0.95)}]"],
                 out / "logs" / "train_det.log")
        (det_dir / "DONE").write_text("ok")
    pics = det_dir / "pictures"
    if not any(pics.glob("*")):
        images = sorted(Path(data["det_val_images"]).glob("*"))[:4]
        run_tool(["tools/train_det.py", *cfg, *data_args, "--infer", *map(str, images), "--output", str(pics),
                  "--score-thresh", "0.2",  # a short CPU run ranks well (AP) but scores low
                  f"train.init_checkpoint={det_dir / 'model_final.pth'}", f"train.output_dir={det_dir}"],
                 out / "logs" / "infer_det.log")
    metrics = {}
    for line in (det_dir / "metrics.json").read_text().splitlines():
        row = json.loads(line)
        metrics.update({k: v for k, v in row.items() if k.startswith(("bbox/", "segm/"))})
    return dict(metrics=metrics, pictures=sorted(pics.glob("*")))


def segment(args: argparse.Namespace, out: Path, data: dict[str, Path], init: Path) -> dict[str, Any]:
    seg_dir = out / "seg"
    root = str(data["seg_root"])
    cfg = ["tools/train_seg.py", "configs/shapes_upernet_vit_tiny_cpu.py", "--work-dir", str(seg_dir),
           "--cfg-options", f"train_dataloader.dataset.data_root={root}", f"val_dataloader.dataset.data_root={root}",
           f"test_dataloader.dataset.data_root={root}", f"train_cfg.max_iters={args.seg_iters}",
           f"train_cfg.val_interval={args.seg_iters}", f"default_hooks.checkpoint.interval={args.seg_iters}",
           f"param_scheduler.0.end={max(1, args.seg_iters // 10)}", f"param_scheduler.1.begin={max(1, args.seg_iters // 10)}",
           f"param_scheduler.1.end={args.seg_iters}"]
    if not (seg_dir / "DONE").is_file():
        resume = ["--resume"] if (seg_dir / "last_checkpoint").is_file() else []
        run_tool([*cfg, "--init-checkpoint", str(init), *resume], out / "logs" / "train_seg.log")
        (seg_dir / "DONE").write_text("ok")
    pics = seg_dir / "pictures"
    metrics_file = seg_dir / "eval_metrics.json"
    if not metrics_file.is_file():
        final = seg_dir / f"iter_{args.seg_iters}.pth"
        run_tool([*cfg, "--eval-only", str(final), "--save-pictures", str(pics), "--num-pictures", "4"],
                 out / "logs" / "eval_seg.log")
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return dict(metrics=metrics, pictures=sorted(pics.glob("*.png")))


def mini_study(args: argparse.Namespace, out: Path, data: dict[str, Path], mae_ckpt: Path) -> dict[str, Any]:
    """2 backbones x 2 freeze settings on the segmentation task, through the study runner (resumable)."""
    from mae_transfer.study import load_study, run_study, write_results

    root = str(data["seg_root"])
    spec = dict(
        name="demo_mini_study", depth=4, freeze_blocks=[0, -1], seeds=[0],
        backbones={"MAE": str(mae_ckpt), "scratch": None},
        tasks={"seg": dict(kind="seg", config=str(REPO / "configs" / "shapes_upernet_vit_tiny_cpu.py"),
                           iters=args.study_iters,
                           opts=[f"train_dataloader.dataset.data_root={root}", f"val_dataloader.dataset.data_root={root}",
                                 f"test_dataloader.dataset.data_root={root}", "param_scheduler.0.end={warmup}",
                                 "param_scheduler.1.begin={warmup}", "param_scheduler.1.end={iters}"])},
    )
    study = load_study(spec, output_dir=out / "study")
    summary = run_study(study)
    log(f"  ran {len(summary['ran'])} cell(s), skipped {len(summary['skipped'])} finished")
    return write_results(study)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "demo_output")
    p.add_argument("--images", help="unlabeled image folder for MAE pretraining (default: built-in)")
    p.add_argument("--det-train-json"), p.add_argument("--det-train-images")
    p.add_argument("--det-val-json"), p.add_argument("--det-val-images")
    p.add_argument("--seg-root", help="segmentation data root in the built-in layout (images/{train,val}, labels/{train,val})")
    p.add_argument("--mae-epochs", type=int, default=30)
    p.add_argument("--det-iters", type=int, default=200)
    p.add_argument("--seg-iters", type=int, default=60)
    p.add_argument("--study-iters", type=int, default=40)
    args = p.parse_args(argv)
    out = args.output.resolve()
    start = time.time()

    log(f"1/6 data -> {out / 'data'}")
    data = prepare_data(args, out)
    log("2/6 MAE pretraining (tiny ViT)")
    mae = pretrain(args, out, data)
    log("3/6 checkpoint conversion (MAE -> detectron2 layout)")
    d2_init = convert(out, mae["checkpoint"])
    log("4/6 detectron2 Mask R-CNN fine-tuning + COCO evaluation")
    det = detect(args, out, data, d2_init)
    log("5/6 MMSegmentation UperNet fine-tuning + mIoU")
    seg = segment(args, out, data, mae["checkpoint"])
    log("6/6 mini-study: MAE vs scratch x all blocks vs frozen ViT (segmentation)")
    study = mini_study(args, out, data, mae["checkpoint"])

    dm, sm = det["metrics"], seg["metrics"]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    print("\n" + "\n".join([
        "| step | result |", "|---|---|",
        f"| MAE pretraining ({mae['epochs']} epochs) | masked-patch loss {mae['first_loss']:.3f} -> {mae['last_loss']:.3f} |",
        f"| Mask R-CNN ({args.det_iters} iters) | AP box {fmt(dm.get('bbox/AP'))}, AP50 box {fmt(dm.get('bbox/AP50'))}, "
        f"AP mask {fmt(dm.get('segm/AP'))} |",
        f"| UperNet ({args.seg_iters} iters) | mIoU {fmt(sm.get('mIoU'))}, aAcc {fmt(sm.get('aAcc'))} |",
    ]))
    print("\n" + study["md"].read_text())
    print("pictures:")
    for path in [mae["picture"], *det["pictures"], *seg["pictures"], study.get("plot")]:
        if path:
            print(f"  {path}")
    print(f"\n[demo] finished in {time.time() - start:.0f} s; everything is under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
