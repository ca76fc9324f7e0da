"""Checkpoint files inside the frameworks we call: safe loading for detectron2's checkpointer and mmengine's
Runner, and checkpoint URLs that fail cleanly offline.

Every checkpoint any tool reads goes through `mae_transfer.checkpoint.read_checkpoint`, which never
unpickles arbitrary objects unless the user opted in (`--allow-pickle`). detectron2 and mmengine load
files themselves (resume, `load_from`, `--eval-only`, model-zoo `.pkl` files), so each gets a small hook
that routes its loads through that one reader:

- detectron2: `detection_checkpointer(...)`, a `DetectionCheckpointer` whose file reading is ours; its
  `.pkl` model-zoo files are plain pickles and need the opt-in.
- mmengine: `use_safe_mmengine_loading(allow_pickle)` registers our reader as mmengine's loader for local
  files (mmengine's own `CheckpointLoader.register_scheme` API). mmengine's training checkpoints carry a
  message hub with `HistoryBuffer`s and numpy values; exactly those types are allowed while they load
  (`MMENGINE_CHECKPOINT_GLOBALS`), nothing broader.

URL-valued checkpoints (`detectron2://...`, `https://...`, as the ViTDet configs' defaults) are fetched into
iopath's cache by `local_checkpoint_path`; a file already there is used without network, and a failed
download is one error line saying where the file was looked for and how to pass a local one.

Frameworks are imported lazily: importing this module loads neither.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from mae_transfer.checkpoint import needs_pickle_error, read_checkpoint
from mae_transfer.checkpoint.hub import is_hub_name, resolve_hub_name
from mae_transfer.errors import MaeTransferError

# Statistics `HistoryBuffer` pickles as `getattr(HistoryBuffer, name)`; the only attributes a checkpoint may fetch.
_HISTORY_BUFFER_STATISTICS = ("min", "max", "current", "mean")


def _history_buffer_statistic(owner: Any, name: str) -> Callable[..., Any]:
    """Stands in for `builtins.getattr` while an mmengine checkpoint loads: a general getattr would let a
    crafted file reach any attribute (and through `__globals__`, any function), so only the statistic
    methods of mmengine's `HistoryBuffer` class can be fetched."""
    from mmengine.logging import HistoryBuffer

    if owner is not HistoryBuffer or name not in _HISTORY_BUFFER_STATISTICS:
        raise ValueError(f"refusing getattr({type(owner).__name__}, {name!r}) in an mmengine checkpoint")
    return getattr(HistoryBuffer, name)


def mmengine_checkpoint_globals() -> list[Any]:
    """The non-tensor types in mmengine 0.10.7's training checkpoints (listed with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on a Runner's `iter_N.pth`)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

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
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_local(filename: str, map_location: Any = None) -> Any:
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")  # mmengine's own message and type
        return read_mmengine_checkpoint(filename, allow_pickle)

    CheckpointLoader.register_scheme(prefixes="", loader=load_local, force=True)


def detection_checkpointer(model: Any, save_dir: str = "", allow_pickle: bool = False,
                           check_model: Callable[[dict, str], None] | None = None, **checkpointables: Any) -> Any:
    """A detectron2 `DetectionCheckpointer` (resume, `train.init_checkpoint`, `--eval-only`) that reads files
    with `read_checkpoint`; model-zoo `.pkl` files are plain pickles and load only with `allow_pickle`.
    `check_model(model state, filename)` sees every file's weights before they are loaded (detectron2 itself only
    logs a warning for parameters of another shape and leaves them as they were)."""
    from detectron2.checkpoint import DetectionCheckpointer

    class SafeDetectionCheckpointer(DetectionCheckpointer):
        def _load_file(self, filename: str) -> Any:
            if filename.endswith((".pkl", ".pyth")) and not allow_pickle:
                raise needs_pickle_error(filename, "a pickle file (detectron2 model-zoo format)")
            loaded = super()._load_file(filename)
            if check_model is not None and isinstance(loaded.get("model"), dict):
                check_model(loaded["model"], filename)
            return loaded

        def _torch_load(self, f: str) -> Any:
            return read_checkpoint(f, allow_pickle)

    return SafeDetectionCheckpointer(model, save_dir, **checkpointables)


def _iopath_cache_file(url: str) -> str:
    """Where iopath's HTTP handler caches `url` ($FVCORE_CACHE, else ~/.torch/iopath_cache, + the URL path)."""
    from detectron2.utils.file_io import Detectron2Handler
    from iopath.common.file_io import get_cache_dir

    if url.startswith(Detectron2Handler.PREFIX):
        url = Detectron2Handler.S3_DETECTRON2_PREFIX + url[len(Detectron2Handler.PREFIX):]
    return os.path.join(get_cache_dir(), urlparse(url).path.lstrip("/"))


def local_checkpoint_path(path: str, override: str = "train.init_checkpoint") -> str:
    """A local file for a checkpoint path or URL (detectron2://, https://, ...): iopath's cached copy, downloaded
    on first use. A URL that cannot be fetched (no network, as on many cluster nodes) is one error naming the
    URL, the cache file looked for and how to pass a local file instead (`override`=PATH)."""
    if is_hub_name(path):  # timm:<model> / hf-hub:<repo>: huggingface_hub's cache (checkpoint.hub)
        return str(resolve_hub_name(path))
    if "://" not in path:
        return path
    from detectron2.utils.file_io import PathManager

    try:
        return PathManager.get_local_path(path)
    except OSError as err:  # urllib's URLError / HTTPError and socket errors are OSErrors
        reason = getattr(err, "reason", None) or err
        raise MaeTransferError(
            f"cannot download checkpoint {path} ({reason}); no cached copy at {_iopath_cache_file(path)} "
            f"(iopath's cache: $FVCORE_CACHE, default ~/.torch/iopath_cache). Without network, put the file there "
            f"or pass a local file: {override}=PATH (e.g. a tools/pretrain.py checkpoint)") from None
