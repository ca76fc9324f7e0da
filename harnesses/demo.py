"""The main demo job behind tools/demo.py: MAE pretraining -> checkpoint conversion -> detectron2 + MMSeg
fine-tuning -> a 2x2 mini-study over 2 seeds (MAE − scratch per freeze setting, with ± and n), on CPU, with the real
tools in subprocesses (`mae_transfer.subprocess_runner`). The built-in data is label-scarce: an unlabelled pool 10x the
labelled training set for pretraining (`harnesses.synthetic`: shapes whose class shows in the outline only).

Here: where the data comes from (the user's, checked before anything runs, or the built-in set), the steps
and the command lines they run, the output folder's settings and DONE markers (a re-run skips finished
steps, an interrupted training resumes), and the printed summary. Results are read from each run's
`eval_metrics.json` (`mae_transfer.metrics`), never from a framework's own logs.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mae_transfer import task_kinds
from mae_transfer.errors import MaeTransferError
from mae_transfer.io import atomic_write_text
from mae_transfer.metrics import read_eval_metrics
from mae_transfer.paths import REPO_ROOT
from mae_transfer.subprocess_runner import run_logged, sigterm_as_interrupt

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--depth", "4"]
PRETRAIN_CONFIG = "configs/mae_pretrain_vit_tiny_cpu.py"
DET_CONFIG = "configs/coco_mask_rcnn_vit_tiny_cpu.py"
SEG_CONFIGS = {"builtin": "configs/shapes_upernet_vit_tiny_cpu.py", "ade20k": "configs/ade20k_upernet_vit_tiny_cpu.py"}
SEG_NAMES = {"builtin": "built-in shapes", "ade20k": "ADE20K"}
DONE = "DONE"
SETTINGS = "demo_settings.json"
NUM_PICTURES = 4
# the built-in set is label-scarce: few labelled pictures to fine-tune on, an unlabelled pool 10x larger to
# pretrain on, and more evaluation pictures than training ones (a less noisy mIoU / AP)
NUM_TRAIN = 32
NUM_VAL = 24
POOL_PER_TRAIN = 10
STUDY_SEEDS = [0, 1]
DET_PICTURE_SCORE = 0.2  # detection pictures: score floor and number of detections drawn (after class-agnostic NMS)
DET_PICTURE_TOP_K = 5
MAX_CLASSES_SHOWN = 10  # the summary lists each class's segmentation IoU up to this many classes
SHORT_DET_ITERS = 2000  # up to this many detection iterations the summary warns that the pictures show no trained model


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"[demo] warning: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DataSources:
    """The data the user named (tools/demo.py's flags); None everywhere = the built-in set."""

    images: str | None = None
    det_data: str | None = None
    det_train_json: str | None = None
    det_train_images: str | None = None
    det_val_json: str | None = None
    det_val_images: str | None = None
    seg_data: str | None = None


@dataclass(frozen=True)
class Schedule:
    """How long each step trains (flag --mae-epochs etc.)."""

    mae_epochs: int = 12
    det_iters: int = 160
    seg_iters: int = 300  # benchmarks/demo_pilot: the schedule the pilot chose within the 6-minute budget
    study_iters: int = 40

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise MaeTransferError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class SegData:
    """Where the segmentation steps read their data: layout ('builtin' | 'ade20k'), data_root, training split."""

    layout: str
    root: Path
    train_split: str  # builtin: "train"; ADE20K: "training", or "validation" when there is no training split

    @property
    def config(self) -> Path:
        return REPO_ROOT / SEG_CONFIGS[self.layout]

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
    """The user's data, checked; None = the built-in set, generated under OUTPUT/data."""

    images: Path | None
    num_images: int | None
    det: DetData | None
    det_pictures: list[Path]  # evaluation images drawn with predictions (user data only)
    seg: SegData | None


@dataclass(frozen=True)
class StepData:
    """The data every step runs on: the user's or the built-in set."""

    unlabeled: Path
    num_images: int
    det: DetData
    det_pictures: list[Path]
    seg: SegData
    num_labelled: int | None = None  # training pictures of the built-in set (None: the user's data)


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


def find_det_data(sources: DataSources) -> DetData | None:
    """--det-data ROOT (COCO layout) or the explicit json/image pairs; None when neither is given (the
    built-in set). Not yet read: see check_det_data."""
    s = sources
    explicit = [s.det_train_json, s.det_train_images, s.det_val_json, s.det_val_images]
    if s.det_data and any(explicit):
        raise MaeTransferError("give either --det-data or --det-train-json/--det-train-images (+ val), not both")
    if s.det_data:
        root = Path(s.det_data).expanduser()
        if not root.is_dir():
            raise MaeTransferError(f"--det-data: folder not found: {root}")
        splits = [(root / "annotations" / f"instances_{x}2017.json", root / f"{x}2017") for x in ("train", "val")]
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
            if bool(getattr(s, f"det_{split}_json")) != bool(getattr(s, f"det_{split}_images")):
                raise MaeTransferError(f"--det-{split}-json and --det-{split}-images must be given together")
        if not s.det_train_json:
            raise MaeTransferError("--det-val-json needs --det-train-json and --det-train-images too")
        train_json, train_images = Path(s.det_train_json).expanduser(), Path(s.det_train_images).expanduser()
        if s.det_val_json:
            val_json, val_images = Path(s.det_val_json).expanduser(), Path(s.det_val_images).expanduser()
        else:
            warn("no --det-val-json: the detection step is evaluated on its training images")
            val_json, val_images = train_json, train_images
        name = f"COCO-format {train_json.name}"
    return DetData(train_json.resolve(), train_images.resolve(), val_json.resolve(), val_images.resolve(), name)


def check_det_data(det: DetData) -> list[Path]:
    """Both splits readable (mae_transfer.coco.read_coco_instances), instances to train on, the same
    categories in both; returns the first NUM_PICTURES evaluation images (for the prediction pictures)."""
    from mae_transfer.coco import read_coco_instances

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


def check_inputs(sources: DataSources) -> Inputs:
    """Every user-given path, checked before anything runs (a typo should not cost a pretraining)."""
    images = num_images = None
    if sources.images:
        from mae_transfer.data import find_images

        images = Path(sources.images).expanduser().resolve()
        try:
            num_images = len(find_images(images))
        except MaeTransferError as err:  # not found / not a folder / no images
            raise MaeTransferError(f"--images: {err}") from None
    det = find_det_data(sources)
    det_pictures = check_det_data(det) if det else []
    seg = find_seg_data(sources.seg_data) if sources.seg_data else None
    return Inputs(images, num_images, det, det_pictures, seg)


def settings_of(schedule: Schedule, inputs: Inputs) -> dict[str, Any]:
    """What the outputs depend on; stored in OUTPUT/demo_settings.json."""
    det, seg = inputs.det, inputs.seg
    return dict(images=str(inputs.images or "built-in"), mae_epochs=schedule.mae_epochs,
                det_data=det.args() if det else "built-in", det_iters=schedule.det_iters,
                seg_data=[seg.layout, str(seg.root), seg.train_split] if seg else "built-in",
                seg_iters=schedule.seg_iters, study_iters=schedule.study_iters, study_seeds=STUDY_SEEDS,
                builtin_sizes=dict(train=NUM_TRAIN, val=NUM_VAL, unlabeled=POOL_PER_TRAIN * NUM_TRAIN))


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A re-run continues only with the settings the folder was made with (finished steps are reused as they are)."""
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise MaeTransferError(f"{out} holds a demo run made with other settings ({'; '.join(changed)}); "
                                   f"use another --output-dir, or delete {out} to start over")
        return
    atomic_write_text(json.dumps(settings, indent=1) + "\n", path)


# ---------------------------------------------------------------------------------------------- running
def run_step(name: str, marker: Path, args: Sequence[str | os.PathLike], log_file: Path) -> bool:
    """Run a tool (`args`: script and its arguments, run with this interpreter from the repository root) unless
    `marker` says it finished in an earlier run; the marker is written (atomically) only after the tool
    succeeded. Returns whether the tool ran."""
    if marker.is_file():
        log(f"  {name}: skipped, finished in an earlier run ({marker})")
        return False
    args = [os.fspath(a) for a in args]
    log("$ " + " ".join(args))
    start = time.time()
    run_logged([sys.executable, *args], log_file, name)
    seconds = time.time() - start
    record = dict(step=name, seconds=round(seconds, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"), command=args)
    atomic_write_text(json.dumps(record, indent=1) + "\n", marker)
    log(f"  done in {seconds:.0f} s (log: {log_file})")
    return True


def stop_cleanly(out: Path, run: Callable[[], int]) -> int:
    """Ctrl-C or SIGTERM: one line (no traceback), exit status 130; what finished stays for the next run."""
    try:
        with sigterm_as_interrupt():
            return run()
    except KeyboardInterrupt:
        print(f"[demo] interrupted: finished steps are kept in {out}; run the same command again to continue",
              file=sys.stderr, flush=True)
        return 130


# ---------------------------------------------------------------------------------------------- steps
def prepare_data(inputs: Inputs, out: Path) -> StepData:
    """The data of every step: the user's, or the built-in set (generated once; deterministic): a label-scarce
    labelled set (NUM_TRAIN pictures to fine-tune on, NUM_VAL to evaluate on) and an unlabelled pool of
    POOL_PER_TRAIN x as many pictures of the same kind for MAE pretraining."""
    shapes = None
    if inputs.images is None or inputs.det is None or inputs.seg is None:
        from harnesses.synthetic import make_shapes_dataset

        shapes = make_shapes_dataset(out / "data" / "shapes", num_train=NUM_TRAIN, num_val=NUM_VAL, size=192)
    det, det_pictures = inputs.det, inputs.det_pictures
    if det is None:
        ann = shapes / "annotations"
        det = DetData(ann / "instances_train.json", shapes / "images" / "train", ann / "instances_val.json",
                      shapes / "images" / "val", "built-in shapes")
        det_pictures = check_det_data(det)
    seg = inputs.seg or SegData("builtin", shapes, "train")
    if inputs.images is not None:
        return StepData(inputs.images, inputs.num_images, det, det_pictures, seg)
    from harnesses.synthetic import make_unlabeled_shapes

    count = POOL_PER_TRAIN * NUM_TRAIN
    unlabeled = make_unlabeled_shapes(out / "data" / "unlabeled", count, size=192)
    builtin = inputs.det is None and inputs.seg is None
    return StepData(unlabeled, count, det, det_pictures, seg, NUM_TRAIN if builtin else None)


def pretrain(schedule: Schedule, out: Path, data: StepData) -> dict[str, Any]:
    from mae_transfer.config import load_config

    mae_dir = out / "mae"
    batch = load_config(REPO_ROOT / PRETRAIN_CONFIG)["batch_size"]
    small = [f"batch_size={data.num_images}"] if data.num_images < batch else []  # a few images: one step/epoch
    epochs = schedule.mae_epochs
    # --resume: an interrupted run continues from checkpoint_last.pth (written after every epoch)
    run_step("pretrain", mae_dir / DONE,
             ["tools/pretrain.py", "--config", PRETRAIN_CONFIG, "--data", str(data.unlabeled),
              "--output-dir", str(mae_dir), f"epochs={epochs}", f"save_every={epochs}", "progress=False", *small,
              "--resume"], out / "logs" / "pretrain.log")
    # pretraining evaluates nothing (no eval_metrics.json): its loss history is the result
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


def _resume_flag(work_dir: Path, kind: str) -> list[str]:
    """A training that was interrupted continues from the checkpoint its tool left (`task_kinds`)."""
    last = task_kinds.last_checkpoint(kind, work_dir)
    if last is None:
        return []
    if not (work_dir / DONE).is_file():
        log(f"  resuming from {last}")
    return ["--resume"]


def detect(schedule: Schedule, out: Path, data: StepData, init: Path) -> dict[str, Any]:
    det_dir = out / "det"
    n, det = schedule.det_iters, task_kinds.get("det")
    base = [det.tool.script, "--config", DET_CONFIG, *data.det.args()]
    # checkpoints 4x per run (the newest kept, plus model_final.pth), so an interruption loses little;
    # seed 0: the recipe's -1 draws a seed per run, and 200-iteration AP then ranged 3-20 between runs
    run_step("detection training", det_dir / DONE,
             [*base, *_resume_flag(det_dir, "det"), "--output-dir", str(det_dir),
              det.overrides.init_override.format(checkpoint=init), *det.overrides.cell(n, max(1, n // 4), 0),
              "train.checkpointer.max_to_keep=1",
              # a few hundred CPU iterations instead of ViTDet's 184k; the config's schedule is a fraction of
              # train.max_iter (decays at 80% / 95%), so any --det-iters keeps it
              "optimizer.lr=5e-4"],
             out / "logs" / "train_det.log")
    pics = det_dir / "pictures"
    run_step("detection pictures", pics / DONE,
             [*base, "--output-dir", str(det_dir), "--infer", *map(str, data.det_pictures), "--pictures-dir", str(pics),
              "--score-thresh", str(DET_PICTURE_SCORE),  # a short CPU run ranks well (AP) but scores low
              "--top-k", str(DET_PICTURE_TOP_K),
              det.overrides.init_override.format(checkpoint=det_dir / "model_final.pth")],
             out / "logs" / "infer_det.log")
    return dict(record=read_eval_metrics(det_dir, "det"), pictures=sorted(pics.glob("*.png")))


def segment(schedule: Schedule, out: Path, data: StepData, init: Path) -> dict[str, Any]:
    seg_dir = out / "seg"
    n, seg = schedule.seg_iters, task_kinds.get("seg")
    base = [seg.tool.script, "--config", str(data.seg.config), "--output-dir", str(seg_dir)]
    spelling = seg.overrides
    options = [spelling.overrides_flag, *data.seg.cfg_options(), *(t.format(iters=n) for t in spelling.length),
               spelling.checkpoint_period.format(period=max(1, n // 2)),  # a checkpoint half-way, to resume from
               f"param_scheduler.0.end={max(1, n // 10)}", f"param_scheduler.1.begin={max(1, n // 10)}",
               f"param_scheduler.1.end={n}"]
    run_step("segmentation training", seg_dir / DONE,
             [*base, spelling.init_flag, str(init), *_resume_flag(seg_dir, "seg"), *options],
             out / "logs" / "train_seg.log")
    pics = seg_dir / "pictures"
    run_step("segmentation evaluation + pictures", pics / DONE,
             [*base, "--eval-only", str(seg_dir / f"iter_{n}.pth"), "--pictures-dir", str(pics),
              "--num-pictures", str(NUM_PICTURES), *options], out / "logs" / "eval_seg.log")
    return dict(record=read_eval_metrics(seg_dir, "seg"), pictures=sorted(pics.glob("*.png")))


def mini_study(schedule: Schedule, out: Path, data: StepData, mae_ckpt: Path) -> dict[str, Any]:
    """2 backbones x 2 freeze settings x STUDY_SEEDS on the segmentation task, through the study runner
    (resumable). Returns write_results' paths plus `difference`: the MAE − scratch line (difference_line)."""
    from mae_transfer.study.report import write_results
    from mae_transfer.study.run import run_study
    from mae_transfer.study.spec import load_study
    from mae_transfer.study.tables import collect

    study = load_study(mini_study_spec(schedule, data, mae_ckpt), output_dir=out / "study")
    summary = run_study(study)
    log(f"  ran {len(summary['ran'])} cell(s), skipped {len(summary['skipped'])} finished in an earlier run")
    rows = collect(study)
    return dict(write_results(study), difference=difference_line(study, rows), evidence=evidence_note(study, rows))


def mini_study_spec(schedule: Schedule, data: StepData, mae_ckpt: Path) -> dict[str, Any]:
    seg = data.seg
    return dict(
        name="demo_mini_study", depth=4, freeze_blocks=[0, -1], seeds=STUDY_SEEDS, reference="scratch",
        backbones={"MAE": str(mae_ckpt), "scratch": None},
        tasks={"seg": dict(kind="seg", config=str(seg.config), iters=schedule.study_iters,
                           opts=[*seg.cfg_options(), "param_scheduler.0.end={warmup}",
                                 "param_scheduler.1.begin={warmup}", "param_scheduler.1.end={iters}"])},
    )


def difference_line(study: Any, rows: list[dict[str, Any]]) -> str:
    """`MAE − scratch, mIoU: all 4 blocks +1.2±0.8 (n=2); frozen ViT -3.0±1.1 (n=2)`: the paired difference per
    freeze setting (study.tables.differences), whatever its sign; `no pair finished` where a setting has none."""
    from mae_transfer.study.tables import differences

    diffs = differences(study, rows)
    lines = []
    for backbone in study.backbones:
        if backbone == study.reference:
            continue
        for task in study.tasks:
            for metric in study.metrics_of(task):
                parts = []
                for freeze in study.freeze_blocks:
                    tuned = study.blocks_tuned(freeze)
                    name = "frozen ViT" if freeze < 0 else f"all {tuned} blocks" if tuned == study.depth else \
                        f"{tuned} blocks"
                    d = diffs.get((backbone, task, metric, freeze))
                    parts.append(f"{name} {d.text() if d else 'no pair finished'}")
                label = study.kind(task).metric(metric).label
                lines.append(f"{backbone} − {study.reference}, {label}: " + "; ".join(parts))
    return "\n".join(lines)


def evidence_note(study: Any, rows: list[dict[str, Any]]) -> str:
    """What the mini-study's differences can say at its n: with 2 pairs a 95% interval is mean ± t(0.975, 1) x
    sd / sqrt(2), t(0.975, 1) = 12.7, so no effect is established; from 3 pairs the lines show the intervals."""
    from scipy.stats import t

    from mae_transfer.study.tables import differences

    counts = sorted({d.n for d in differences(study, rows).values() if d.paired})
    if not counts:
        return "No paired difference finished: nothing to read."
    n = counts[0]
    if n < 2:
        return "n = 1 fine-tuning seed in some setting: no spread, no interval; it cannot establish an effect."
    if n < 3:
        quantile = float(t.ppf(0.975, n - 1))
        return (f"n = {n} fine-tuning seed(s) per setting: n = {n} cannot establish an effect (a 95% interval is the "
                f"mean ± t(0.975, {n - 1}) = {quantile:.1f} x sd / sqrt({n})); the differences above show the study "
                "runner at work, not evidence about MAE.")
    return (f"n = {'-'.join(map(str, (counts[0], counts[-1]))) if len(counts) > 1 else n} pairs per setting; the "
            "brackets are 95% t-intervals of each difference (per comparison, not adjusted for the others).")


# ---------------------------------------------------------------------------------------------- summary
def _value(record: dict[str, Any], *keys: str) -> Any:
    """A number of an eval_metrics.json record: in `metrics`, or kept in `details` flat ("bbox/AP50") or nested
    ({"bbox": {"AP50": ...}}); None if absent."""
    flat = "/".join(keys)
    if flat in record["metrics"]:
        return record["metrics"][flat]
    details = record.get("details") or {}
    if flat in details:
        return details[flat]
    for key in keys:
        details = details.get(key) if isinstance(details, dict) else None
    return details


def fmt_value(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and not math.isnan(value) else "n/a"


def data_sentence(data: StepData) -> str:
    """`pretrained on 320 unlabelled pictures, fine-tuned on 32 labelled`: how label-scarce the run is."""
    text = f"MAE pretrained on {data.num_images} unlabelled pictures"
    if data.num_labelled is not None:
        text += f", fine-tuned on {data.num_labelled} labelled (the built-in shapes' training split)"
    return text


def summary_table(schedule: Schedule, data: StepData, mae: dict[str, Any], det: dict[str, Any],
                  seg: dict[str, Any]) -> str:
    """The markdown table the demo ends with: one row per training step, numbers from eval_metrics.json; then
    what the detection pictures show."""
    dm, sm = det["record"], seg["record"]
    table = "\n".join([
        "| step | result |", "|---|---|",
        f"| MAE pretraining ({mae['epochs']} epochs, {data.num_images} unlabelled pictures) | masked-patch loss "
        f"{mae['first_loss']:.3f} -> "
        f"{mae['last_loss']:.3f} |",
        f"| Mask R-CNN ({schedule.det_iters} iters, {data.det.name}) | AP box {fmt_value(_value(dm, 'AP_box'))}, "
        f"AP50 box {fmt_value(_value(dm, 'bbox', 'AP50'))}, AP mask {fmt_value(_value(dm, 'AP_mask'))} |",
        f"| UperNet ({schedule.seg_iters} iters, {data.seg.name}) | mIoU {fmt_value(_value(sm, 'mIoU'))}, "
        f"aAcc {fmt_value(_value(sm, 'aAcc'))}{class_iou_text(sm)} |",
    ])
    return table + "\n\n" + det_pictures_note(schedule, data)


def class_iou_text(record: dict[str, Any]) -> str:
    """`; IoU background 91.2, circle 40.3, ...`: each class's IoU of a segmentation record (train_seg.py keeps them
    in `details`), so that the table shows which shapes were found; nothing where the record has none or the
    classes are too many for one row (ADE20K's 150: see eval_metrics.json)."""
    per_class = (record.get("details") or {}).get("IoU") or {}
    if not per_class or len(per_class) > MAX_CLASSES_SHOWN:
        return ""
    return "; IoU " + ", ".join(f"{name} {fmt_value(value)}" for name, value in per_class.items())


def det_pictures_note(schedule: Schedule, data: StepData) -> str:
    """One sentence on what det/pictures/*_pred.png show, so that a short run's boxes are read as what they are."""
    layout = (f"Detection pictures: ground truth (left) beside the model's top {DET_PICTURE_TOP_K} detections after "
              f"class-agnostic NMS with score >= {DET_PICTURE_SCORE:g} (right)")
    if schedule.det_iters <= SHORT_DET_ITERS:
        return (f"{layout}; after only {schedule.det_iters} CPU iterations on {data.det.name} the boxes are rough and "
                "the classes often wrong: they show that the pipeline works end to end, not a trained detector "
                "(ViTDet trains for 184k iterations); a panel without boxes had no detection at that score (its "
                "title gives the best one).")
    return f"{layout}, after {schedule.det_iters} iterations on {data.det.name}."


# ---------------------------------------------------------------------------------------------- the job
def run_steps(schedule: Schedule, out: Path, inputs: Inputs) -> int:
    start = time.time()
    log(f"1/6 data -> {out / 'data'}")
    data = prepare_data(inputs, out)
    log(f"  {data_sentence(data)}")
    log(f"2/6 MAE pretraining (tiny ViT, {data.num_images} unlabelled pictures from {data.unlabeled})")
    mae = pretrain(schedule, out, data)
    log("3/6 checkpoint conversion (MAE -> detectron2 layout)")
    d2_init = convert(out, mae["checkpoint"])
    log(f"4/6 detectron2 Mask R-CNN fine-tuning + COCO evaluation ({data.det.name})")
    det = detect(schedule, out, data, d2_init)
    log(f"5/6 MMSegmentation UperNet fine-tuning + mIoU ({data.seg.name}, {data.seg.root})")
    seg = segment(schedule, out, data, mae["checkpoint"])
    log(f"6/6 mini-study: MAE vs scratch x all blocks vs frozen ViT x seeds {STUDY_SEEDS} (segmentation)")
    study = mini_study(schedule, out, data, mae["checkpoint"])

    print("\n" + summary_table(schedule, data, mae, det, seg))
    print("\n" + study["md"].read_text())
    print(study["difference"])
    print(study["evidence"] + "\n")
    print(data_sentence(data) + "\n")
    print("pictures:")
    for path in [mae["picture"], *det["pictures"], *seg["pictures"], study.get("plot")]:
        if path:
            print(f"  {path}")
    print(f"\n[demo] finished in {time.time() - start:.0f} s; everything is under {out}")
    return 0


def run(output_dir: str | os.PathLike, sources: DataSources | None = None, schedule: Schedule | None = None) -> int:
    """The whole job, resumable in `output_dir`. Inputs and the folder's settings are checked before anything
    runs or is written (a bad path: one MaeTransferError); returns the exit status (130: interrupted)."""
    sources, schedule = sources or DataSources(), schedule or Schedule()
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise MaeTransferError(f"--output-dir {out} is a file, not a folder")
    inputs = check_inputs(sources)
    check_settings(out, settings_of(schedule, inputs))
    return stop_cleanly(out, lambda: run_steps(schedule, out, inputs))
