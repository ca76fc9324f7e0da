"""Weights by name: `timm:<model>[.<tag>]` and `hf-hub:<org>/<repo>` resolved to a file in huggingface_hub's cache
(timm's pretrained weights live on the Hugging Face hub), downloaded there when the machine has internet.

Offline, or for a name nobody publishes, one `error:` line: the cache path looked in and how to pass a file
(`train.init_checkpoint=PATH`), like the detectron2 URLs of the ViTDet configs.
"""
from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from mae_transfer.errors import MaeTransferError

HUB_PREFIXES = ("timm:", "hf-hub:")
# Weight files tried in a hub repository, in order (timm's, transformers', open_clip's).
_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def is_hub_name(source: object) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIXES)


def hub_files(name: str) -> tuple[str, tuple[str, ...]]:
    """(repository, weight file names to try) of a `timm:` / `hf-hub:` name."""
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise MaeTransferError(f"backbone name {name!r}: expected hf-hub:<organisation>/<repository>")
        return repo, _FILES
    if not name.startswith("timm:"):
        raise MaeTransferError(f"backbone name {name!r}: expected timm:<model>[.<tag>] or hf-hub:<org>/<repo>")
    model = name[len("timm:"):]
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        raise MaeTransferError(f"backbone name {name!r} needs timm installed (pip install timm)") from None
    cfg = get_pretrained_cfg(model)
    if cfg is None or not cfg.hf_hub_id:
        raise MaeTransferError(f"unknown timm pretrained model {model!r} in backbone name {name!r} "
                               "(timm.list_pretrained() lists the names, e.g. timm:vit_base_patch14_dinov2.lvd142m)")
    # timm's config names the file where it is not model.safetensors (OpenAI CLIP: open_clip_pytorch_model.bin)
    named = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else ()
    return cfg.hf_hub_id, (*named, *(f for f in _FILES if f not in named))


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One quick connection to the hub: offline machines fail here at once instead of in huggingface_hub's
    retries (a minute per file)."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_hub_name(name: str, local_files_only: bool | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local weight file of a hub name: from the cache, else downloaded (unless offline)."""
    repo, files = hub_files(name)
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    except ImportError:
        raise MaeTransferError(f"backbone name {name!r} needs huggingface_hub installed") from None
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    for filename in files:  # the cache first: no network for what is already here
        hit = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
        if isinstance(hit, str):
            return Path(hit)
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    if not offline and _reachable(constants.ENDPOINT):
        for filename in files:
            try:
                return Path(hf_hub_download(repo, filename, cache_dir=str(cache)))
            except Exception:  # noqa: BLE001 - missing file, no network, auth: the one message below
                continue
    raise MaeTransferError(
        f"backbone {name!r}: hub repository {repo} is not in the Hugging Face cache ({cache}) and could not be "
        "downloaded (offline?); fetch it where there is internet, or pass the file: train.init_checkpoint=PATH")
