"""The demo-pilot runs (benchmarks/demo_pilot/README.md): the demo's segmentation step (harnesses/demo.py `segment`:
tools/train_seg.py on the built-in shapes from the demo's MAE checkpoint) under one schedule per call; appends a row
to pilot.csv with the per-class IoU of mmseg's final validation (its per-class table in the log) and the seconds.

    python benchmarks/demo_pilot/run_pilot.py BASE NAME LR ITERS BATCH [extra --cfg-options ...]

PILOT_CONFIG (environment): the config to train with, if not the demo's.
BASE: a demo output folder whose data and MAE steps finished (BASE/data/shapes, BASE/mae/checkpoint_last.pth), or
a make_base.py folder; the row's `data` is BASE's folder name (the README lists what each one holds).
"""
import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CLASSES = ("background", "circle", "square", "triangle")
CSV = Path(__file__).with_name("pilot.csv")


def main(base: str, name: str, lr: str, iters: str, batch: str, *extra: str) -> None:
    base_dir, n = Path(base), int(iters)
    out = base_dir / "pilot" / name
    warmup = max(1, n // 10)
    opts = [*(f"{s}_dataloader.dataset.data_root={base_dir / 'data' / 'shapes'}" for s in ("train", "val", "test")),
            f"train_cfg.max_iters={n}", f"train_cfg.val_interval={n}", f"default_hooks.checkpoint.interval={n}",
            f"param_scheduler.0.end={warmup}", f"param_scheduler.1.begin={warmup}", f"param_scheduler.1.end={n}",
            f"optim_wrapper.optimizer.lr={lr}", f"train_dataloader.batch_size={batch}", *extra]
    config = os.environ.get("PILOT_CONFIG", "configs/shapes_upernet_vit_tiny_cpu.py")  # a variant config's rows
    cmd = [sys.executable, "tools/train_seg.py", "--config", config,
           "--output-dir", str(out), "--init-checkpoint", str(base_dir / "mae" / "checkpoint_last.pth"),
           "--cfg-options", *opts]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - start
    (out / "pilot.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        sys.exit(f"error: {name} failed (rc {proc.returncode}), see {out / 'pilot.log'}")
    text = proc.stdout + proc.stderr
    iou = {}
    for cls in CLASSES:  # mmseg's per-class table: | class | IoU | Acc |
        rows = re.findall(rf"\|\s*{cls}\s*\|\s*([\d.]+|nan)\s*\|", text)
        iou[cls] = float(rows[-1]) if rows else float("nan")
    miou = sum(iou.values()) / len(iou)
    row = dict(name=name, data=base_dir.name, lr=lr, iters=n, batch=int(batch), extra=" ".join(extra), **iou,
               mIoU=round(miou, 2), seconds=round(seconds, 1))
    new = not CSV.is_file()
    with CSV.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(row)


if __name__ == "__main__":
    main(*sys.argv[1:])
