"""Safe reading: a checkpoint file (torch zip / legacy pickle, safetensors, a Hugging Face folder) on CPU without
running pickled code, and the tensor dict found inside its wrappers."""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mae_transfer.errors import MaeTransferError, PickledCheckpointError

StateDict = dict[str, Tensor]
# (our-named state dict, dropped keys as in the file, notes for the load report): what a format's filter returns
Converted = tuple[StateDict, list[str], list[str]]

StateDict = dict[str, Tensor]


def needs_pickle_error(path: str | os.PathLike, what: str = "") -> PickledCheckpointError:
    """The one message for a file that only the full unpickler reads; `what` names the object or kind."""
    return PickledCheckpointError(
        f"{path}: the checkpoint contains pickled Python objects that the safe loader refuses"
        + (f" ({what})" if what else "")
        + "; if you trust this file, opt in with allow_pickle=True (CLI: --allow-pickle)")


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False, safe_globals: Sequence[Any] = ()) -> Any:
    """Load a checkpoint file (or a Hugging Face model folder) on CPU without running pickled code.

    Raises `MaeTransferError` with one line for: missing file, not a checkpoint, truncated/corrupt file,
    and files that need pickled objects (unless `allow_pickle`). `safe_globals` allows exactly these
    extra types while this file loads (`torch.serialization.safe_globals`), e.g. a framework's own
    checkpoint metadata.
    """
    p = Path(path)
    if p.is_dir():  # Hugging Face `save_pretrained` folder
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return read_checkpoint(p / name, allow_pickle, safe_globals)
        raise MaeTransferError(f"{p}: folder has no model.safetensors or pytorch_model.bin")
    if not p.is_file():
        raise MaeTransferError(f"{p}: checkpoint file not found")
    with open(p, "rb") as fh:
        head = fh.read(16)
    size = p.stat().st_size
    if size == 0:
        raise MaeTransferError(f"{p}: file is empty, not a checkpoint")
    if p.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        try:
            from safetensors.torch import load_file
            return load_file(str(p), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise MaeTransferError(f"{p}: cannot read safetensors file (truncated or corrupt?): "
                                   f"{_one_line(err)}") from None
    is_zip = head.startswith(b"PK\x03\x04")
    is_legacy_pickle = head[:1] == b"\x80"
    if not is_zip and not is_legacy_pickle:
        raise MaeTransferError(f"{p}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    if is_zip and not zipfile.is_zipfile(p):
        raise MaeTransferError(f"{p}: the checkpoint archive is truncated or corrupt (no zip directory at its end)")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(p, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if not allow_pickle and "weights only load failed" in str(err).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            raise needs_pickle_error(p, found.group(1) if found else "") from None
        raise MaeTransferError(f"{p}: cannot unpickle the checkpoint (truncated or corrupt?): "
                               f"{_one_line(err)}") from None
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, OSError) as err:
        if allow_pickle and is_legacy_pickle and "magic number" in str(err):
            return _plain_pickle_load(p)  # a plain pickle, e.g. a detectron2 model-zoo .pkl
        raise MaeTransferError(f"{p}: cannot read the checkpoint (truncated or corrupt?): {_one_line(err)}") from None


def _plain_pickle_load(p: Path) -> Any:
    try:
        with open(p, "rb") as fh:
            return pickle.load(fh, encoding="latin1")  # as detectron2 reads its .pkl files
    except Exception as err:  # any unpickling failure is a bad file here
        raise MaeTransferError(f"{p}: cannot unpickle the file (truncated or corrupt?): {_one_line(err)}") from None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < size and head[8:9] == b"{"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def unwrap_state_dict(obj: Any, source: str = "<dict>") -> tuple[StateDict, dict[str, Any]]:
    """Find the tensor dict inside a checkpoint: `model` / `state_dict` / `module` wrappers, `module.` prefix.

    Returns (state_dict, meta) where meta holds the other top-level entries (format tag, arch, ...).
    """
    if not isinstance(obj, Mapping):
        raise MaeTransferError(f"{source}: not a checkpoint (top level is a {type(obj).__name__}, expected a dict)")
    meta: dict[str, Any] = {}
    sd: Any = obj
    for _ in range(3):  # e.g. {"model": {"module": {...}}}
        for key in ("model", "state_dict", "module", "model_state"):
            if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
                meta.update({k: v for k, v in sd.items() if k != key and not isinstance(v, Mapping | Tensor)})
                if "arch" in sd and isinstance(sd["arch"], Mapping):
                    meta["arch"] = dict(sd["arch"])
                sd = sd[key]
                break
        else:
            break
    # detectron2 model-zoo .pkl files hold numpy arrays (readable with allow_pickle=True).
    tensors = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in sd.items()
               if isinstance(k, str) and isinstance(v, Tensor | np.ndarray)}
    if not tensors:
        raise MaeTransferError(f"{source}: no tensors found in the checkpoint "
                               f"(keys: {', '.join(map(str, list(obj)[:6]))})")
    if all(k.startswith("module.") for k in tensors):  # DDP-wrapped
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, meta
