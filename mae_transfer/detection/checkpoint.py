"""Checkpoint files inside detectron2, read through `mae_transfer.checkpoint.read_checkpoint` (which never
unpickles arbitrary objects unless the user opted in, `--allow-pickle`):

- `detection_checkpointer(...)`, a `DetectionCheckpointer` (resume, `train.init_checkpoint`, `--eval-only`) whose
  file reading is ours; its `.pkl` model-zoo files are plain pickles and need the opt-in.
- URL-valued checkpoints (`detectron2://...`, `https://...`, as the ViTDet configs' defaults) are fetched into
  iopath's cache by `local_checkpoint_path`; a file already there is used without network, and a failed download
  is one error line saying where the file was looked for and how to pass a local one.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import Detectron2Handler, PathManager
from iopath.common.file_io import get_cache_dir

from mae_transfer.checkpoint import needs_pickle_error, read_checkpoint
from mae_transfer.checkpoint.hub import is_hub_name, resolve_hub_name
from mae_transfer.errors import MaeTransferError

__all__ = ["detection_checkpointer", "local_checkpoint_path"]


def detection_checkpointer(model: Any, save_dir: str = "", allow_pickle: bool = False,
                           check_model: Callable[[dict, str], None] | None = None, **checkpointables: Any) -> Any:
    """A detectron2 `DetectionCheckpointer` (resume, `train.init_checkpoint`, `--eval-only`) that reads files
    with `read_checkpoint`; model-zoo `.pkl` files are plain pickles and load only with `allow_pickle`.
    `check_model(model state, filename)` sees every file's weights before they are loaded (detectron2 itself only
    logs a warning for parameters of another shape and leaves them as they were)."""
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
    try:
        return PathManager.get_local_path(path)
    except OSError as err:  # urllib's URLError / HTTPError and socket errors are OSErrors
        reason = getattr(err, "reason", None) or err
        raise MaeTransferError(
            f"cannot download checkpoint {path} ({reason}); no cached copy at {_iopath_cache_file(path)} "
            f"(iopath's cache: $FVCORE_CACHE, default ~/.torch/iopath_cache). Without network, put the file there "
            f"or pass a local file: {override}=PATH (e.g. a tools/pretrain.py checkpoint)") from None
