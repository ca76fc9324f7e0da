#!/usr/bin/env python
"""The main demo job: MAE pretraining -> checkpoint conversion -> detectron2 + MMSeg fine-tuning, on CPU.

    bash scripts/run_demo.sh                    # set-up + this script with the built-in data
    .venv/bin/python tools/demo.py --output demo_output --det-iters 60 --seg-iters 60
    .venv/bin/python tools/demo.py --images ../shared/data/coco_tiny/train2017 \\
        --det-data ../shared/data/coco_tiny --seg-data ../shared/data/ade20k_sample --output demo_real

Steps (each one runs the real tool in a subprocess, exactly as a user would):
  1. data       generate the built-in set (rendered shapes: COCO json + semantic labels) and an unlabeled
                folder (those images + scikit-image's sample photos), for whatever the options below leave out
  2. pretrain   tools/pretrain.py, tiny MAE (configs/mae_pretrain_vit_tiny_cpu.py) -> reconstruction picture
  3. convert    tools/convert_checkpoint.py --to detectron2 (the seg run imports the MAE file directly)
  4. detect     tools/train_det.py, tiny Mask R-CNN, COCOEvaluator (bbox + segm), then --infer pictures
  5. segment    tools/train_seg.py, tiny UperNet, IoUMetric, then colourised prediction pictures
  6. mini-study mae_transfer.study: {MAE, scratch} x {all 4 blocks fine-tuned, frozen ViT} on the seg task

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
interrupted training resumes from its last checkpoint (Ctrl-C prints one line and exits with 130). An
output folder keeps its settings (demo_settings.json): other settings need another --output, or delete it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mae_transfer.cli import run_cli  # noqa: E402
from mae_transfer.errors import MaeTransferError  # noqa: E402
from mae_transfer.io import atomic_write_text  # noqa: E402

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--depth", "4"]
PRETRAIN_CONFIG = "configs/mae_pretrain_vit_tiny_cpu.py"
DET_CONFIG = "configs/coco_mask_rcnn_vit_tiny_cpu.py"
SEG_CONFIGS = {"builtin": "configs/shapes_upernet_vit_tiny_cpu.py", "ade20k": "configs/ade20k_upernet_vit_tiny_cpu.py"}
SEG_NAMES = {"builtin": "built-in shapes", "ade20k": "ADE20K"}
DONE = "DONE"
SETTINGS = "demo_settings.json"
NUM_PICTURES = 4
STOP_GRACE_S = 20.0  # after Ctrl-C, how long a tool may take to stop by itself before it is killed


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"[demo] warning: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class SegData:
    """Where the segmentation steps read their data: layout ('builtin' | 'ade20k'), data_root, training split."""

    layout: str
    root: Path
    train_split: str  # builtin: "train"; ADE20K: "training", or "validation" when there is no training split

    @property
    def config(self) -> Path:
        return REPO / SEG_CONFIGS[self.layout]

    @property
    def name(self) -> str:
        return SEG_NAMES[self.layout] + (", trained on validation" if self.train_split == "validation" else "")

    def cfg_options(self) -> list[str]:
        """mmseg --cfg-options that point the config at this data (keys the config already has)."""
        opts = [f"{split}_dataloader.dataset.data_root={self.root}" for split in ("train", "val", "test")]
        if self.layout == "ade20k":
            opts += [f"train_dataloader.dataset.data_prefix.img_path=images/{self.train_split}",
                     f"train_dataloader.dataset.data_prefix.seg_map_path=annotations/{self.train_split}"]
        return opts


@dataclass(frozen=True)
class DetData:
    """COCO instances json + image folder for training and for evaluation."""

    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path
    name: str

    def args(self) -> list[str]:
        return ["--train-json", str(self.train_json), "--train-images", str(self.train_images),
                "--val-json", str(self.val_json), "--val-images", str(self.val_images)]


@dataclass(frozen=True)
class Inputs:
    """Every data source of a run; None = the built-in set, generated under OUTPUT/data."""

    images: Path | None
    num_images: int | None
    det: DetData | None
    det_pictures: list[Path]  # evaluation images drawn with predictions (user data; built-in: filled later)
    seg: SegData | None


def _has_files(folder: Path, suffixes: tuple[str, ...]) -> bool:
    return folder.is_dir() and any(f.suffix.lower() in suffixes for f in folder.iterdir())


def find_seg_data(path: str | os.PathLike) -> SegData:
    """The layout of a segmentation data root: ADE20K (ROOT or ROOT/ADEChallengeData2016 holding
    {images,annotations}/validation) or the built-in one (ROOT/{images,labels}/{train,val})."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MaeTransferError(f"--seg-data: folder not found: {root}")
    for cand in (root, root / "ADEChallengeData2016"):
        if (cand / "images" / "validation").is_dir() and (cand / "annotations" / "validation").is_dir():
            splits = [s for s in ("training", "validation")
                      if (cand / "images" / s).is_dir() and (cand / "annotations" / s).is_dir()]
            for split in splits:
                _check_seg_split(cand / "images" / split, cand / "annotations" / split)
            if "training" not in splits:
                warn(f"{cand} has no training split (images/training + annotations/training): the segmentation "
                     "steps train on the validation images, so their mIoU is not a held-out result")
            return SegData("ade20k", cand.resolve(), splits[0])
    if all((root / kind / split).is_dir() for kind in ("images", "labels") for split in ("train", "val")):
        for split in ("train", "val"):
            _check_seg_split(root / "images" / split, root / "labels" / split)
        return SegData("builtin", root.resolve(), "train")
    raise MaeTransferError(
        f"--seg-data {root}: not a known layout; expected ADE20K ({root}[/ADEChallengeData2016]/images/validation + "
        f"annotations/validation, optionally .../training) or the built-in layout ({root}/images/{{train,val}} + "
        f"{root}/labels/{{train,val}})")


def _check_seg_split(images: Path, labels: Path) -> None:
    if not _has_files(images, (".jpg", ".jpeg", ".png")):
        raise MaeTransferError(f"--seg-data: no images (.jpg/.png) in {images}")
    if not _has_files(labels, (".png",)):
        raise MaeTransferError(f"--seg-data: no label maps (.png) in {labels}")


def find_det_data(args: argparse.Namespace) -> DetData | None:
    """--det-data ROOT (COCO layout) or the explicit json/image pairs; None when neither is given (the
    built-in set). Not yet read: see check_det_data."""
    explicit = [args.det_train_json, args.det_train_images, args.det_val_json, args.det_val_images]
    if args.det_data and any(explicit):
        raise MaeTransferError("give either --det-data or --det-train-json/--det-train-images (+ val), not both")
    if args.det_data:
        root = Path(args.det_data).expanduser()
        if not root.is_dir():
            raise MaeTransferError(f"--det-data: folder not found: {root}")
        splits = [(root / "annotations" / f"instances_{s}2017.json", root / f"{s}2017") for s in ("train", "val")]
        found = [(j, i) for j, i in splits if j.is_file() and i.is_dir()]
        if not found:
            raise MaeTransferError(
                f"--det-data {root}: not the COCO layout; expected {root}/annotations/instances_train2017.json + "
                f"{root}/train2017/ (and/or the val2017 pair); other layouts: --det-train-json/--det-train-images")
        if len(found) == 1:
            warn(f"{root} has only {found[0][1].name}: the detection step trains and evaluates on it")
        (train_json, train_images), (val_json, val_images) = found[0], found[-1]
        name = f"COCO-format {root.name}"
    else:
        if not any(explicit):
            return None
        for split in ("train", "val"):
            if bool(getattr(args, f"det_{split}_json")) != bool(getattr(args, f"det_{split}_images")):
                raise MaeTransferError(f"--det-{split}-json and --det-{split}-images must be given together")
        if not args.det_train_json:
            raise MaeTransferError("--det-val-json needs --det-train-json and --det-train-images too")
        train_json, train_images = Path(args.det_train_json).expanduser(), Path(args.det_train_images).expanduser()
        if args.det_val_json:
            val_json, val_images = Path(args.det_val_json).expanduser(), Path(args.det_val_images).expanduser()
        else:
            warn("no --det-val-json: the detection step is evaluated on its training images")
            val_json, val_images = train_json, train_images
        name = f"COCO-format {train_json.name}"
    return DetData(train_json.resolve(), train_images.resolve(), val_json.resolve(), val_images.resolve(), name)


def check_det_data(det: DetData) -> list[Path]:
    """Both splits readable (mae_transfer.data.read_coco_instances), instances to train on, the same
    categories in both; returns the first NUM_PICTURES evaluation images (for the prediction pictures)."""
    from mae_transfer.data import read_coco_instances

    train = read_coco_instances(det.train_json, det.train_images)
    val = train if (det.val_json, det.val_images) == (det.train_json, det.train_images) else \
        read_coco_instances(det.val_json, det.val_images)
    if not any(not a.get("iscrowd", 0) for a in train["annotations"]):
        raise MaeTransferError(f"{det.train_json}: no (non-crowd) annotations to train on")
    if not val["images"]:
        raise MaeTransferError(f"{det.val_json}: no images to evaluate on")
    names = [sorted((c["id"], str(c["name"])) for c in d["categories"]) for d in (train, val)]
    if names[0] != names[1]:
        raise MaeTransferError(f"{det.train_json} and {det.val_json} have different categories")
    return [det.val_images / im["file_name"] for im in val["images"][:NUM_PICTURES]]


def check_inputs(args: argparse.Namespace) -> Inputs:
    """Every user-given path, checked before anything runs (a typo should not cost a pretraining)."""
    images = num_images = None
    if args.images:
        from mae_transfer.data import find_images

        images = Path(args.images).expanduser().resolve()
        try:
            num_images = len(find_images(images))
        except MaeTransferError as err:  # not found / not a folder / no images
            raise MaeTransferError(f"--images: {err}") from None
    det = find_det_data(args)
    det_pictures = check_det_data(det) if det else []
    seg = find_seg_data(args.seg_data) if args.seg_data else None
    return Inputs(images, num_images, det, det_pictures, seg)


def settings_of(args: argparse.Namespace, inputs: Inputs) -> dict[str, Any]:
    """What the outputs depend on; stored in OUTPUT/demo_settings.json."""
    det, seg = inputs.det, inputs.seg
    return dict(images=str(inputs.images or "built-in"), mae_epochs=args.mae_epochs,
                det_data=det.args() if det else "built-in", det_iters=args.det_iters,
                seg_data=[seg.layout, str(seg.root), seg.train_split] if seg else "built-in",
                seg_iters=args.seg_iters, study_iters=args.study_iters)


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A re-run continues only with the settings the folder was made with (finished steps are reused as they are)."""
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise MaeTransferError(f"{out} holds a demo run made with other settings ({'; '.join(changed)}); "
                                   f"use another --output, or delete {out} to start over")
        return
    atomic_write_text(json.dumps(settings, indent=1) + "\n", path)


# ---------------------------------------------------------------------------------------------- running
def run_tool(args: Sequence[str | os.PathLike], log_file: Path) -> None:
    """Run one of our tools with this interpreter; its output is appended to `log_file` (tail shown on failure).

    Ctrl-C: the tool gets SIGINT as well (same process group; forwarded if only this process got it), may
    stop by itself for STOP_GRACE_S, is killed after that, and KeyboardInterrupt goes on up.
    """
    cmd = [sys.executable, *map(str, args)]
    log("$ " + " ".join(map(str, args)))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_file, "a") as fh:
        fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            raise
    if code in (130, -signal.SIGINT):  # the tool alone was interrupted: stop here too
        raise KeyboardInterrupt
    if code < 0:
        raise MaeTransferError(f"step killed by signal {signal.Signals(-code).name} (log: {log_file}); "
                               "run the same command again to continue")
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise MaeTransferError(f"step failed (exit {code}), see {log_file}:\n{tail}")
    log(f"  done in {time.time() - start:.0f} s (log: {log_file})")


def _stop(proc: subprocess.Popen) -> None:
    try:
        try:
            proc.wait(timeout=2)  # Ctrl-C at the terminal reached the tool too: it is stopping
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=STOP_GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # stuck, or a second Ctrl-C
        proc.kill()
        proc.wait()


def run_step(name: str, marker: Path, args: Sequence[str | os.PathLike], log_file: Path) -> bool:
    """Run a tool unless `marker` says it finished in an earlier run; the marker is written (atomically) only
    after the tool succeeded. Returns whether the tool ran."""
    if marker.is_file():
        log(f"  {name}: skipped, finished in an earlier run ({marker})")
        return False
    start = time.time()
    run_tool(args, log_file)
    record = dict(step=name, seconds=round(time.time() - start, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                  command=[str(a) for a in args])
    atomic_write_text(json.dumps(record, indent=1) + "\n", marker)
    return True


def stop_cleanly(out: Path, run: Callable[[], int]) -> int:
    """Ctrl-C: one line (no traceback), exit status 130; what finished stays for the next run."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"[demo] interrupted: finished steps are kept in {out}; run the same command again to continue",
              file=sys.stderr, flush=True)
        return 130


# ---------------------------------------------------------------------------------------------- steps
def prepare_data(inputs: Inputs, out: Path) -> dict[str, Any]:
    """The data of every step: the user's, or the built-in set (generated once; deterministic)."""
    data: dict[str, Any] = {}
    shapes = None
    if inputs.images is None or inputs.det is None or inputs.seg is None:
        from mae_transfer.synthetic import make_shapes_dataset

        shapes = make_shapes_dataset(out / "data" / "shapes", num_train=32, num_val=8, size=192)
    if inputs.det is not None:
        data["det"], data["det_pictures"] = inputs.det, inputs.det_pictures
    else:
        ann = shapes / "annotations"
        data["det"] = DetData(ann / "instances_train.json", shapes / "images" / "train", ann / "instances_val.json",
                              shapes / "images" / "val", "built-in shapes")
        data["det_pictures"] = check_det_data(data["det"])
    data["seg"] = inputs.seg or SegData("builtin", shapes, "train")
    if inputs.images is not None:
        data["unlabeled"], data["num_images"] = inputs.images, inputs.num_images
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
            atomic_write_text("ok", unlabeled / ".complete")
        data["unlabeled"] = unlabeled
        data["num_images"] = sum(1 for f in unlabeled.iterdir() if f.suffix == ".png")
    return data


def pretrain(args: argparse.Namespace, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    from mae_transfer.config import load_config

    mae_dir = out / "mae"
    batch = load_config(REPO / PRETRAIN_CONFIG)["batch_size"]
    small = [f"batch_size={data['num_images']}"] if data["num_images"] < batch else []  # a few images: one step/epoch
    # --resume: an interrupted run continues from checkpoint_last.pth (written after every epoch)
    run_step("pretrain", mae_dir / DONE,
             ["tools/pretrain.py", "--config", PRETRAIN_CONFIG, "--data", str(data["unlabeled"]),
              "--output-dir", str(mae_dir), f"epochs={args.mae_epochs}", f"save_every={args.mae_epochs}",
              "progress=False", *small, "--resume"], out / "logs" / "pretrain.log")
    history = [json.loads(line) for line in (mae_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [h["loss"] for h in history if "loss" in h]
    pictures = sorted(mae_dir.glob("recon_epoch*.png"))
    return dict(checkpoint=mae_dir / "checkpoint_last.pth", first_loss=losses[0], last_loss=losses[-1],
                epochs=len(losses), picture=pictures[-1] if pictures else None)


def convert(out: Path, mae_ckpt: Path) -> Path:
    """To the layout of configs/coco_mask_rcnn_vit_tiny_cpu.py's backbone (224-px position table with the
    cls slot, as ViTDet keeps it; windows 8, global blocks 1 and 3, rel-pos for 256 px)."""
    dst = out / "mae" / "backbone_detectron2.pth"
    run_step("convert", out / "mae" / "CONVERT_DONE",
             ["tools/convert_checkpoint.py", str(mae_ckpt), str(dst), "--to", "detectron2", *TINY_VIT,
              "--img-size", "224", "--window-size", "8", "--global-blocks", "1", "3",
              "--use-rel-pos", "--rel-pos-input-size", "256"], out / "logs" / "convert.log")
    return dst


def detect(args: argparse.Namespace, out: Path, data: dict[str, Any], init: Path) -> dict[str, Any]:
    det_dir = out / "det"
    cfg = ["--config", DET_CONFIG, *data["det"].args()]
    resume = ["--resume"] if (det_dir / "last_checkpoint").is_file() else []
    if resume and not (det_dir / DONE).is_file():
        log(f"  resuming from {det_dir / (det_dir / 'last_checkpoint').read_text().strip()}")
    # checkpoints 4x per run (the newest kept, plus model_final.pth), so an interruption loses little
    run_step("detection training", det_dir / DONE,
             ["tools/train_det.py", *cfg, *resume,
              f"train.output_dir={det_dir}", f"train.init_checkpoint={init}", f"train.max_iter={args.det_iters}",
              f"train.eval_period={args.det_iters}", f"train.checkpointer.period={max(1, args.det_iters // 4)}",
              "train.checkpointer.max_to_keep=1",
              "train.seed=0",  # the recipe's -1 draws a seed per run: 200-iteration AP then ranged 3-20 between runs
              "optimizer.lr=5e-4",  # a few hundred CPU iterations instead of ViTDet's 184k
              f"lr_multiplier.scheduler.num_updates={args.det_iters}",
              f"lr_multiplier.scheduler.milestones=[{int(args.det_iters * 0.8)},{int(args.det_iters * 0.95)}]"],
             out / "logs" / "train_det.log")
    pics = det_dir / "pictures"
    run_step("detection pictures", pics / DONE,
             ["tools/train_det.py", *cfg, "--infer", *map(str, data["det_pictures"]), "--output", str(pics),
              "--score-thresh", "0.2",  # a short CPU run ranks well (AP) but scores low
              f"train.init_checkpoint={det_dir / 'model_final.pth'}", f"train.output_dir={det_dir}"],
             out / "logs" / "infer_det.log")
    from mae_transfer.study import last_det_evaluation

    return dict(metrics=last_det_evaluation(det_dir), pictures=sorted(pics.glob("*.png")))


def segment(args: argparse.Namespace, out: Path, data: dict[str, Any], init: Path) -> dict[str, Any]:
    seg_dir = out / "seg"
    seg: SegData = data["seg"]
    n = args.seg_iters
    cfg = ["tools/train_seg.py", str(seg.config), "--work-dir", str(seg_dir), "--cfg-options", *seg.cfg_options(),
           f"train_cfg.max_iters={n}", f"train_cfg.val_interval={n}",
           f"default_hooks.checkpoint.interval={max(1, n // 2)}",  # a checkpoint half-way, to resume from
           f"param_scheduler.0.end={max(1, n // 10)}", f"param_scheduler.1.begin={max(1, n // 10)}",
           f"param_scheduler.1.end={n}"]
    resume = ["--resume"] if (seg_dir / "last_checkpoint").is_file() else []
    if resume and not (seg_dir / DONE).is_file():
        log(f"  resuming from {(seg_dir / 'last_checkpoint').read_text().strip()}")
    run_step("segmentation training", seg_dir / DONE, [*cfg, "--init-checkpoint", str(init), *resume],
             out / "logs" / "train_seg.log")
    pics = seg_dir / "pictures"
    run_step("segmentation evaluation + pictures", pics / DONE,
             [*cfg, "--eval-only", str(seg_dir / f"iter_{n}.pth"), "--save-pictures", str(pics),
              "--num-pictures", str(NUM_PICTURES)], out / "logs" / "eval_seg.log")
    metrics_file = seg_dir / "eval_metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return dict(metrics=metrics, pictures=sorted(pics.glob("*.png")))


def mini_study(args: argparse.Namespace, out: Path, data: dict[str, Any], mae_ckpt: Path) -> dict[str, Any]:
    """2 backbones x 2 freeze settings on the segmentation task, through the study runner (resumable)."""
    from mae_transfer.study import load_study, run_study, write_results

    seg: SegData = data["seg"]
    spec = dict(
        name="demo_mini_study", depth=4, freeze_blocks=[0, -1], seeds=[0],
        backbones={"MAE": str(mae_ckpt), "scratch": None},
        tasks={"seg": dict(kind="seg", config=str(seg.config), iters=args.study_iters,
                           opts=[*seg.cfg_options(), "param_scheduler.0.end={warmup}",
                                 "param_scheduler.1.begin={warmup}", "param_scheduler.1.end={iters}"])},
    )
    study = load_study(spec, output_dir=out / "study")
    summary = run_study(study)
    log(f"  ran {len(summary['ran'])} cell(s), skipped {len(summary['skipped'])} finished in an earlier run")
    return write_results(study)


def run_demo(args: argparse.Namespace, out: Path, inputs: Inputs) -> int:
    start = time.time()
    log(f"1/6 data -> {out / 'data'}")
    data = prepare_data(inputs, out)
    log(f"2/6 MAE pretraining (tiny ViT, {data['num_images']} images from {data['unlabeled']})")
    mae = pretrain(args, out, data)
    log("3/6 checkpoint conversion (MAE -> detectron2 layout)")
    d2_init = convert(out, mae["checkpoint"])
    log(f"4/6 detectron2 Mask R-CNN fine-tuning + COCO evaluation ({data['det'].name})")
    det = detect(args, out, data, d2_init)
    log(f"5/6 MMSegmentation UperNet fine-tuning + mIoU ({data['seg'].name}, {data['seg'].root})")
    seg = segment(args, out, data, mae["checkpoint"])
    log("6/6 mini-study: MAE vs scratch x all blocks vs frozen ViT (segmentation)")
    study = mini_study(args, out, data, mae["checkpoint"])

    dm, sm = det["metrics"], seg["metrics"]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    print("\n" + "\n".join([
        "| step | result |", "|---|---|",
        f"| MAE pretraining ({mae['epochs']} epochs) | masked-patch loss {mae['first_loss']:.3f} -> {mae['last_loss']:.3f} |",
        f"| Mask R-CNN ({args.det_iters} iters, {data['det'].name}) | AP box {fmt(dm.get('bbox/AP'))}, "
        f"AP50 box {fmt(dm.get('bbox/AP50'))}, AP mask {fmt(dm.get('segm/AP'))} |",
        f"| UperNet ({args.seg_iters} iters, {data['seg'].name}) | mIoU {fmt(sm.get('mIoU'))}, aAcc {fmt(sm.get('aAcc'))} |",
    ]))
    print("\n" + study["md"].read_text())
    print("pictures:")
    for path in [mae["picture"], *det["pictures"], *seg["pictures"], study.get("plot")]:
        if path:
            print(f"  {path}")
    print(f"\n[demo] finished in {time.time() - start:.0f} s; everything is under {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=REPO / "demo_output", help="output folder (default: demo_output)")
    p.add_argument("--images", metavar="DIR", help="unlabeled image folder for MAE pretraining (default: built-in)")
    p.add_argument("--det-data", metavar="ROOT", help="COCO root (annotations/instances_{train,val}2017.json + images)")
    p.add_argument("--det-train-json", metavar="JSON"), p.add_argument("--det-train-images", metavar="DIR")
    p.add_argument("--det-val-json", metavar="JSON"), p.add_argument("--det-val-images", metavar="DIR")
    p.add_argument("--seg-data", "--seg-root", dest="seg_data", metavar="ROOT",
                   help="segmentation data: an ADE20K root or the built-in layout (see above)")
    p.add_argument("--mae-epochs", type=int, default=30)
    p.add_argument("--det-iters", type=int, default=200)
    p.add_argument("--seg-iters", type=int, default=60)
    p.add_argument("--study-iters", type=int, default=40)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key in ("mae_epochs", "det_iters", "seg_iters", "study_iters"):
        if getattr(args, key) < 1:
            raise MaeTransferError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    out = args.output.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise MaeTransferError(f"--output {out} is a file, not a folder")
    inputs = check_inputs(args)  # before anything runs or is written
    check_settings(out, settings_of(args, inputs))
    # the study runner reports its cells through logging
    logging.basicConfig(level=logging.WARNING, format="[demo]   %(message)s")
    logging.getLogger("mae_transfer.study").setLevel(logging.INFO)
    return stop_cleanly(out, lambda: run_demo(args, out, inputs))


if __name__ == "__main__":
    sys.exit(run_cli(main))
