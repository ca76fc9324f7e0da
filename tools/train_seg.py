#!/usr/bin/env python
"""Train / evaluate UperNet with our ViT in MMSegmentation (mmengine Runner).

    python tools/train_seg.py configs/ade20k_upernet_vit_b.py --work-dir work_dirs/vit_b \
        --init-checkpoint mae_pretrain.pth [--freeze-blocks 4] [--cfg-options k=v ...]
    python tools/train_seg.py CONFIG --resume                      # continue from the work dir's last checkpoint
    python tools/train_seg.py CONFIG --eval-only iter_160000.pth --save-pictures pics/
    python -m torch.distributed.run --nproc_per_node 8 tools/train_seg.py CONFIG --launcher pytorch

Bad input (missing data, labels outside the classes, a checkpoint that does not fit, an unknown
config key) ends with one `error: ...` line and exit status 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import mae_transfer  # noqa: E402,F401  (compat shims first)
from mae_transfer.cli import run_cli
from mae_transfer.io import atomic_write_text  # noqa: E402
from mae_transfer.errors import MaeTransferError  # noqa: E402

logger = logging.getLogger("train_seg")

LABEL_FILES_CHECKED = 20  # label maps read per split to validate label values (first N, sorted)
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="MMEngine config, e.g. configs/ade20k_upernet_vit_b.py")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override existing config keys, e.g. train_cfg.max_iters=1000 (unknown keys are an error)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume: from the work dir's last checkpoint, or from CKPT")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none",
                   help="mmengine distributed launcher (multi-GPU / multi-node)")
    p.add_argument("--init-checkpoint", help="backbone weights, any format mae_transfer.checkpoint imports")
    p.add_argument("--allow-pickle", action="store_true",
                   help="trust the checkpoints given: let them hold pickled Python objects (unsafe for untrusted files)")
    p.add_argument("--freeze-blocks", type=int, help="freeze patch embedding + the first k blocks (-1: all)")
    p.add_argument("--eval-only", metavar="CKPT", help="evaluate a train_seg.py checkpoint on the test set")
    p.add_argument("--save-pictures", metavar="DIR",
                   help="write colourised ground truth | prediction pictures of the test set to DIR")
    p.add_argument("--num-pictures", type=int, default=8, help="pictures to write with --save-pictures")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- config
def _lookup(node: Any, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(node, (list, tuple)):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                return False
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        else:
            return False
    return True


def apply_cfg_options(cfg: Any, options: list[str], config_path: str) -> None:
    """Merge `key=value` overrides; every key must already exist in the config (typos fail loudly)."""
    from mmengine.config import DictAction

    if not options:
        return
    parsed: dict[str, Any] = {}
    action = DictAction(option_strings=["--cfg-options"], dest="cfg_options")
    for item in options:
        if "=" not in item:
            raise MaeTransferError(f"--cfg-options: expected KEY=VALUE, got {item!r}")
        ns = argparse.Namespace()
        action(None, ns, [item])
        parsed.update(ns.cfg_options)
    for key in parsed:
        if not _lookup(cfg._cfg_dict, key.split(".")):
            raise MaeTransferError(f"--cfg-options: unknown config key {key!r} (not in {config_path})")
    cfg.merge_from_dict(parsed, allow_list_keys=True)


def build_config(args: argparse.Namespace) -> Any:
    from mmengine.config import Config

    if not os.path.isfile(args.config):
        raise MaeTransferError(f"config file not found: {args.config}")
    try:
        cfg = Config.fromfile(args.config)
    except Exception as err:  # syntax errors, missing _base_ files
        raise MaeTransferError(f"cannot read config {args.config}: {type(err).__name__}: {err}") from err
    apply_cfg_options(cfg, args.cfg_options, args.config)
    cfg.launcher = args.launcher
    if args.launcher != "none" and not _cuda_available():
        # mmengine 0.10.7's init_dist calls torch.cuda.set_device, and torch's SyncBN is GPU-only.
        raise MaeTransferError(f"--launcher {args.launcher} needs CUDA GPUs (mmengine's distributed setup); "
                               "on CPU use --launcher none")
    cfg.work_dir = args.work_dir or str(Path("work_dirs") / Path(args.config).stem)
    if args.init_checkpoint:
        cfg.model.backbone.init_checkpoint = args.init_checkpoint
    if args.allow_pickle:
        cfg.model.backbone.allow_pickle = True
    if args.freeze_blocks is not None:
        cfg.model.backbone.freeze_blocks = args.freeze_blocks
    if args.resume:
        cfg.resume = True
        cfg.load_from = None if args.resume == "auto" else args.resume
    # Several runs may share a process (tests, studies): mmengine keys its visualizer/logger
    # singletons by name, so give each run its own.
    run_name = f"{Path(args.config).stem}_{uuid.uuid4().hex[:8]}"
    cfg.experiment_name = run_name
    if cfg.get("visualizer"):
        cfg.visualizer.name = run_name
    return cfg


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- data checks
def _resolve_root(root: str | None) -> str | None:
    """Relative data roots resolve against the current directory, then the repository root."""
    if not root or os.path.isabs(root) or os.path.exists(root):
        return root
    candidate = REPO_ROOT / root
    return str(candidate) if candidate.exists() else root


def _datasets(cfg: Any, split_keys: Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for key in split_keys:
        loader = cfg.get(key)
        if loader and loader.get("dataset"):
            out.append((key, loader.dataset))
    return out


def _label_range(cfg: Any) -> tuple[int, int]:
    head = cfg.model.decode_head
    return int(head.num_classes), int(head.get("ignore_index", 255))


def check_data(cfg: Any, split_keys: Sequence[str]) -> None:
    """Data roots/folders exist, hold images, and sampled label maps only use known label values."""
    import numpy as np
    from PIL import Image

    num_classes, ignore_index = _label_range(cfg)
    for key, ds in _datasets(cfg, split_keys):
        ds.data_root = _resolve_root(ds.get("data_root"))
        root = ds.data_root or ""
        if root and not os.path.isdir(root):
            raise MaeTransferError(f"data root not found: {root} ({key}.dataset.data_root)")
        prefix = ds.get("data_prefix", {})
        img_dir = os.path.join(root, prefix.get("img_path", ""))
        seg_dir = os.path.join(root, prefix.get("seg_map_path", ""))
        for what, folder in (("img_path", img_dir), ("seg_map_path", seg_dir)):
            if not os.path.isdir(folder):
                raise MaeTransferError(f"data folder not found: {folder} ({key}.dataset.data_prefix.{what})")
        if not any(f.lower().endswith(IMG_EXTS) for f in os.listdir(img_dir)):
            raise MaeTransferError(f"no images in {img_dir} ({key}.dataset.data_prefix.img_path)")
        reduce_zero = bool(ds.get("reduce_zero_label", False))
        # With reduce_zero_label, 0 becomes the ignore label and v -> v-1, so file values run 0..num_classes.
        allowed = set(range(num_classes + 1 if reduce_zero else num_classes)) | {ignore_index}
        suffix = ds.get("seg_map_suffix", ".png")
        labels = sorted(f for f in os.listdir(seg_dir) if f.endswith(suffix))[:LABEL_FILES_CHECKED]
        if not labels:
            raise MaeTransferError(f"no label maps (*{suffix}) in {seg_dir} ({key}.dataset.data_prefix.seg_map_path)")
        for name in labels:
            values = set(np.unique(np.asarray(Image.open(os.path.join(seg_dir, name)))).tolist())
            bad = sorted(values - allowed)
            if bad:
                hi = num_classes if reduce_zero else num_classes - 1
                raise MaeTransferError(
                    f"label values {bad[:8]} in {os.path.join(seg_dir, name)} are outside 0..{hi} and the ignore "
                    f"index {ignore_index} (num_classes={num_classes}, reduce_zero_label={reduce_zero}); "
                    "check model.decode_head.num_classes / ignore_index for this dataset")


def check_init_checkpoint(path: str) -> None:
    """Fail before the Runner starts if the backbone checkpoint is missing or not importable."""
    if not os.path.isfile(path):
        raise MaeTransferError(f"init checkpoint not found: {path}")


def check_eval_checkpoint(model: Any, path: str, allow_pickle: bool = False) -> None:
    """The --eval-only checkpoint must be a full model checkpoint that fits this config's model."""
    import torch

    from mae_transfer.framework_checkpoints import read_mmengine_checkpoint

    # Missing / truncated / non-checkpoint / pickled files give one clear line.
    obj = read_mmengine_checkpoint(path, allow_pickle)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MaeTransferError(f"{path} holds no model state_dict (expected a checkpoint written by train_seg.py)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else ""
        if wrong:
            k = wrong[0]
            detail += ("; " if detail else "") + (
                f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise MaeTransferError(f"checkpoint {path} does not fit the model of this config: {detail}; "
                               "use --init-checkpoint for backbone-only / foreign weights")


# ---------------------------------------------------------------------------------------- pictures
def save_pictures(runner: Any, cfg: Any, out_dir: str, limit: int) -> list[str]:
    """Colourised ground truth | prediction (dataset palette, alpha blend) for the first `limit` test images."""
    import mmcv
    import torch
    from mmengine.dist import is_main_process
    from mmseg.visualization import SegLocalVisualizer

    if not is_main_process() or limit <= 0:
        return []
    os.makedirs(out_dir, exist_ok=True)
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
    loader = runner.build_dataloader(loader_cfg)
    meta = loader.dataset.metainfo
    vis = SegLocalVisualizer(name=f"pictures_{uuid.uuid4().hex[:8]}", alpha=0.5)
    vis.set_dataset_meta(classes=meta["classes"], palette=meta["palette"])
    model = runner.model
    model.eval()
    written = []
    with torch.no_grad():
        for batch in loader:
            for sample in model.test_step(batch):
                image = mmcv.imread(sample.img_path, channel_order="rgb")
                out_file = os.path.join(out_dir, Path(sample.img_path).stem + ".png")
                vis.add_datasample(Path(sample.img_path).stem, image, sample, draw_gt="gt_sem_seg" in sample,
                                   draw_pred=True, out_file=out_file, with_labels=False)
                written.append(out_file)
            if len(written) >= limit:
                break
    logger.info("wrote %d pictures (ground truth | prediction) to %s", len(written), out_dir)
    return written


def _start_iteration_hook() -> Any:
    """An mmengine hook that records the iteration training starts from (after a resume) in `.iteration`."""
    from mmengine.hooks import Hook

    class StartIteration(Hook):
        priority = "LOWEST"
        iteration: int | None = None

        def before_train(self, runner) -> None:
            self.iteration = runner.iter

    return StartIteration()


# ---------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import backbones.mmseg  # noqa: F401  (registers MAEViT + the LLRD constructor)
    from mmengine.runner import Runner

    from mae_transfer.framework_checkpoints import use_safe_mmengine_loading

    use_safe_mmengine_loading(args.allow_pickle)  # load_from, resume and --eval-only read through it

    cfg = build_config(args)
    if args.init_checkpoint:
        check_init_checkpoint(args.init_checkpoint)

    if args.eval_only:
        check_data(cfg, ["test_dataloader"])
        # Test only: mmengine wants the training parts all set or all None.
        for key in ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler",
                    "val_dataloader", "val_cfg", "val_evaluator"):
            cfg[key] = None
        cfg.model.backbone.init_checkpoint = None  # the full checkpoint holds the backbone
        cfg.load_from = args.eval_only
        cfg.resume = False
        runner = Runner.from_cfg(cfg)
        check_eval_checkpoint(runner.model, args.eval_only, args.allow_pickle)
        metrics = runner.test()
        logger.info("test metrics: %s", metrics)
        # machine-readable copy for scripts (demo, studies)
        atomic_write_text(json.dumps({k: float(v) for k, v in metrics.items()}, indent=2),
                          Path(cfg.work_dir) / "eval_metrics.json")
    else:
        check_data(cfg, ["train_dataloader", "val_dataloader", "test_dataloader"])
        runner = Runner.from_cfg(cfg)
        start = _start_iteration_hook()
        runner.register_hook(start, priority="LOWEST")
        runner.train()
        if start.iteration is not None and start.iteration >= runner.max_iters and runner.val_loop is not None:
            # mmengine saves the last checkpoint before the last validation: a run stopped between the two
            # resumes with nothing to train and would never validate. Validate now.
            logger.info("resumed at the last iteration (%d): running the final validation", start.iteration)
            runner.val_loop.run()
    if args.save_pictures:
        save_pictures(runner, cfg, args.save_pictures, args.num_pictures)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
