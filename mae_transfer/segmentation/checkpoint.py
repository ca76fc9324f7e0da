"""Checkpoint reading inside MMSegmentation, all through `mae_transfer.checkpoint.read_checkpoint` (which never
unpickles arbitrary objects unless the user opted in, `--allow-pickle`):

- mmengine's Runner (`load_from`, `resume`, `init_cfg` 'Pretrained'): `use_safe_mmengine_loading(allow_pickle)`
  registers our reader as mmengine's loader for local files (mmengine's own `CheckpointLoader.register_scheme`).
  mmengine's training checkpoints carry a message hub with `HistoryBuffer`s and numpy values; exactly those types
  are allowed while they load (`mmengine_checkpoint_globals`), nothing broader.
- The mmseg backbone's checkpoint reader: `MAEViT(init_checkpoint=...)` (backbones.mmseg, which knows no
checkpoint formats) reads any format `mae_transfer.checkpoint` imports through the loader this module hands in.

The configs list it next to the adapter, `custom_imports=dict(imports=['backbones.mmseg',
'mae_transfer.segmentation.checkpoint'])`: importing it registers the loader, as importing the adapter registers MAEViT.
Framework glue (imports mmseg through the adapter), not the MAE core.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

import backbones.mmseg  # first: the mmcv-lite workaround
from backbones.vit import VisionTransformer
from mae_transfer.checkpoint import LoadReport, load_backbone, read_checkpoint

# Statistics `HistoryBuffer` pickles as `getattr(HistoryBuffer, name)`; the only attributes a checkpoint may fetch.
_HISTORY_BUFFER_STATISTICS = ("min", "max", "current", "mean")


def _history_buffer_statistic(owner: Any, name: str) -> Callable[..., Any]:
    """Stands in for `builtins.getattr` while an mmengine checkpoint loads: a general getattr would let a
    crafted file reach any attribute (and through `__globals__`, any function), so only the statistic
    methods of mmengine's `HistoryBuffer` class can be fetched."""
    if owner is not HistoryBuffer or name not in _HISTORY_BUFFER_STATISTICS:
        raise ValueError(f"refusing getattr({type(owner).__name__}, {name!r}) in an mmengine checkpoint")
    return getattr(HistoryBuffer, name)


def mmengine_checkpoint_globals() -> list[Any]:
    """The non-tensor types in mmengine 0.10.7's training checkpoints (listed with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on a Runner's `iter_N.pth`)."""
    numeric_dtypes = [type(np.dtype(t)) for t in (bool, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                                   np.uint32, np.uint64, np.float16, np.float32, np.float64)]
    return [HistoryBuffer, np.ndarray, np.dtype, *numeric_dtypes, np.core.multiarray._reconstruct,
            np.core.multiarray.scalar, (_history_buffer_statistic, "builtins.getattr")]


def read_mmengine_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """Read a checkpoint written by mmengine's Runner (or any plain one) without unpickling other objects."""
    return read_checkpoint(path, allow_pickle, safe_globals=mmengine_checkpoint_globals())


def use_safe_mmengine_loading(allow_pickle: bool = False) -> None:
    """Make mmengine read local checkpoints (`load_from`, `resume`, `init_cfg` 'Pretrained') with
    `read_mmengine_checkpoint`. mmengine 0.10.7 calls `torch.load` without `weights_only`, so under
    torch >= 2.6 its own training checkpoints do not load at all without this."""
    def load_local(filename: str, map_location: Any = None) -> Any:
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")  # mmengine's own message and type
        return read_mmengine_checkpoint(filename, allow_pickle)

    CheckpointLoader.register_scheme(prefixes="", loader=load_local, force=True)


def load_init_checkpoint(source: str, vit: VisionTransformer, allow_pickle: bool = False) -> LoadReport:
    """Import `source` (any supported format) into `vit`; the load report (format, loaded / kept / unused keys,
    resized tables) goes to the mmengine log of the run, so every training log says what the backbone started
    from."""
    report = load_backbone(source, vit, allow_pickle)
    print_log(f"backbone init_checkpoint load report:\n{report}", logger="current")
    return report


backbones.mmseg.set_checkpoint_loader(load_init_checkpoint)
