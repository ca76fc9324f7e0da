"""Read ViT checkpoints from many sources into our `VisionTransformer`, and write them for detectron2 / mmseg.

Reading is timm-style: the file is loaded safely (`torch.load(weights_only=True)`; safetensors and
Hugging Face folders too), the state dict is unwrapped (`model` / `state_dict` / `module.`), its
format is detected from the keys, a small per-format filter maps the keys to ours, and
`fit_state_dict` adapts the result to the target model (pos-embed resampling, cls row, rel-pos
tables) with a readable `LoadReport`.

Supported formats (`LoadReport.format`):
  mae_transfer_pretrain   our `MaskedAutoencoder` checkpoint (`encoder.*` + decoder)
  mae_transfer_backbone   our encoder-only export (`save_backbone`)
  mae_official_pretrain   facebookresearch/mae pretraining (`decoder_*`, `mask_token` dropped)
  mae_official_finetune   facebookresearch/mae fine-tuned (`fc_norm`, `head`)
  timm / deit             timm ViT state dicts; DeiT (`dist_token`, `head_dist` dropped)
  hf_vitmae / hf_vit      Hugging Face `ViTMAEForPreTraining` / `ViTModel` / `ViTFor...` (hub and v5 layouts)
  detectron2_vitdet       detectron2 ViTDet (`backbone.net.*`, rel-pos tables; also our detectron2 files)
  mae_transfer_mmseg      our backbone inside an mmseg model (`backbone.<our keys>`, `to_mmseg` files)
  prefixed_vit            our / timm keys under any other prefix (e.g. an adapter's `backbone.net.vit.`)
  mmseg_mae               mmseg `MAE` / `BEiT` (`layers.i.ln1`, `ffn`; layer scale, BEiT rel-pos bias tables)
  mmseg_vit               mmseg `VisionTransformer` (`attn.attn.in_proj_weight`)
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from backbones.vit import VisionTransformer, resize_abs_pos, resize_rel_pos, resize_rel_pos_bias_table
from mae_transfer.errors import MaeTransferError, PickledCheckpointError
from mae_transfer.io import atomic_torch_save

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
BACKBONE_FORMAT = "mae_transfer_backbone"
DETECTRON2_PREFIX = "backbone.net."
MMSEG_PREFIX = "backbone."


# ------------------------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What happened to every key: shown in logs and by tools/convert_checkpoint.py."""

    format: str
    source: str = "<dict>"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys not in the checkpoint: model init kept
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys not used (decoder, heads, ...)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def names(keys: list[str], limit: int = 8) -> str:
            # Collapse block indices (`blocks.*.attn.rel_pos_h (12)`), or whole prefixes (`decoder.* (24)`).
            groups: dict[str, list[str]] = {}
            for k in keys:
                groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", k), []).append(k)
            if len(groups) > limit:
                groups = {}
                for k in keys:
                    groups.setdefault(k.split(".", 1)[0] + ".*" if "." in k else k, []).append(k)
            items = [g[0] if len(g) == 1 else f"{p} ({len(g)})" for p, g in groups.items()]
            return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")

        lines = [f"checkpoint {self.source}: format {self.format}",
                 f"  loaded:     {len(self.loaded)} tensors"]
        if self.resized:
            lines.append("  resized:    " + ", ".join(
                f"{k} {tuple(a)} -> {tuple(b)}" for k, (a, b) in list(self.resized.items())[:8])
                + (f", ... (+{len(self.resized) - 8})" if len(self.resized) > 8 else ""))
        lines.append(f"  missing:    {len(self.missing)}"
                     + (f" (model init kept: {names(self.missing)})" if self.missing else ""))
        lines.append(f"  unexpected: {len(self.unexpected)}"
                     + (f" (ignored: {names(self.unexpected)})" if self.unexpected else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- reading
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


# ------------------------------------------------------------------------------------------- formats
def _strip(sd: StateDict, prefix: str) -> tuple[StateDict, list[str]]:
    """Keys under `prefix` (prefix removed) and the list of other keys."""
    kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return kept, [k for k in sd if not k.startswith(prefix)]


_MAE_DECODER = re.compile(r"^(decoder_|decoder\.|mask_token)")


def _filter_timm(sd: StateDict) -> tuple[StateDict, list[str], list[str]]:
    """timm / official MAE / DeiT keys are already ours; drop decoder, distillation and MAE pretraining extras."""
    out, dropped = {}, []
    for k, v in sd.items():
        if _MAE_DECODER.match(k) or k in ("dist_token",) or k.startswith("head_dist."):
            dropped.append(k)
        else:
            out[k] = v
    notes = []
    if "dist_token" in sd:
        notes.append("DeiT distillation token and head_dist dropped (pos_embed row of dist_token removed)")
    return out, dropped, notes


def _filter_our_pretrain(sd: StateDict) -> tuple[StateDict, list[str], list[str]]:
    enc, others = _strip(sd, "encoder.")
    return enc, others, []


_HF_LEGACY = [  # hub layout (transformers < 5 and every `save_pretrained`) -> transformers 5 names
    (re.compile(r"encoder\.layer\.(\d+)\."), r"layers.\1."),
    (re.compile(r"attention\.attention\.query\."), "attention.q_proj."),
    (re.compile(r"attention\.attention\.key\."), "attention.k_proj."),
    (re.compile(r"attention\.attention\.value\."), "attention.v_proj."),
    (re.compile(r"attention\.output\.dense\."), "attention.o_proj."),
    (re.compile(r"intermediate\.dense\."), "mlp.fc1."),
    (re.compile(r"(layers\.\d+\.)output\.dense\."), r"\1mlp.fc2."),
]
_HF_RENAME = [
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(r"^layers\.(\d+)\.layernorm_before\."), r"blocks.\1.norm1."),
    (re.compile(r"^layers\.(\d+)\.layernorm_after\."), r"blocks.\1.norm2."),
    (re.compile(r"^layers\.(\d+)\.attention\.o_proj\."), r"blocks.\1.attn.proj."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc([12])\."), r"blocks.\1.mlp.fc\2."),
    (re.compile(r"^layernorm\."), "norm."),
    (re.compile(r"^classifier\."), "head."),
]


def _filter_hf(sd: StateDict) -> tuple[StateDict, list[str], list[str]]:
    """HF ViT / ViTMAE: separate q/k/v become one qkv; `vit.` prefix optional; decoder and pooler dropped."""
    body: StateDict = {}
    dropped: list[str] = []
    for k, v in sd.items():
        name = k[len("vit."):] if k.startswith("vit.") else k
        if name.startswith(("decoder.", "pooler.")):
            dropped.append(k)
            continue
        for pattern, repl in _HF_LEGACY:
            name = pattern.sub(repl, name)
        body[name] = v
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, v in body.items():
        m = re.match(r"^layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        for pattern, repl in _HF_RENAME:
            new, n = pattern.subn(repl, name)
            if n:
                out[new] = v
                break
        else:
            dropped.append(name)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise MaeTransferError(f"layer {i}: attention {kind} needs query, key and value, found {sorted(parts)}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    # The state dict does not say which eps the HF config used; facebook/vit-mae-* use 1e-12.
    return out, dropped, ["HF configs default to LayerNorm eps=1e-12; this ViT uses 1e-6 (tiny numeric difference)"]


def _filter_detectron2(sd: StateDict) -> tuple[StateDict, list[str], list[str]]:
    net, others = _strip(sd, DETECTRON2_PREFIX)
    return net, others, []


def _mmseg_block(i: str, rest: str, v: Tensor, out: StateDict, extra: dict[str, Tensor]) -> bool:
    """Map one mmseg layer key to ours; returns False if it has no counterpart."""
    simple = {
        "ln1.": "norm1.", "ln2.": "norm2.", "attn.qkv.": "attn.qkv.", "attn.proj.": "attn.proj.",
        "attn.attn.out_proj.": "attn.proj.", "ffn.layers.0.0.": "mlp.fc1.", "ffn.layers.1.": "mlp.fc2.",
    }
    if rest == "attn.attn.in_proj_weight":
        out[f"blocks.{i}.attn.qkv.weight"] = v
        return True
    if rest == "attn.attn.in_proj_bias":
        out[f"blocks.{i}.attn.qkv.bias"] = v
        return True
    for src, dst in simple.items():
        if rest.startswith(src):
            out[f"blocks.{i}.{dst}{rest[len(src):]}"] = v
            return True
    if rest in ("gamma_1", "gamma_2", "attn.relative_position_bias_table"):
        out[f"blocks.{i}.{rest}"] = v  # our names are BEiT's; `fit_state_dict` folds them if the model has none
        return True
    if rest in ("attn.q_bias", "attn.v_bias"):
        extra[f"{i}.{rest}"] = v
        return True
    return False


def _filter_mmseg(sd: StateDict) -> tuple[StateDict, list[str], list[str]]:
    """mmseg MAE/BEiT and VisionTransformer: rename; q/v biases -> qkv bias (k = 0); layer scale and BEiT
    relative position bias tables kept under our (= BEiT's) names for `fit_state_dict`."""
    body, dropped = (_strip(sd, MMSEG_PREFIX) if any(k.startswith(MMSEG_PREFIX + "layers.") for k in sd)
                     else (dict(sd), []))
    if any(k.startswith("ln_pre.") for k in body):
        raise MaeTransferError("mmseg ViT checkpoint uses pre_norm (ln_pre), which this ViT does not have")
    out: StateDict = {}
    extra: dict[str, Tensor] = {}
    notes: list[str] = []
    for k, v in body.items():
        m = re.match(r"^layers\.(\d+)\.(.+)$", k)
        if m:
            if not _mmseg_block(m.group(1), m.group(2), v, out, extra):
                dropped.append(k)
        elif k in ("cls_token", "pos_embed"):
            out[k] = v
        elif k.startswith("patch_embed.projection."):
            out["patch_embed.proj." + k[len("patch_embed.projection."):]] = v
        elif k.startswith("ln1."):  # final norm (mmseg builds it as `ln1` when final_norm=True)
            out["norm." + k[len("ln1."):]] = v
        else:
            dropped.append(k)
    blocks = sorted({int(k.split(".")[1]) for k in out if k.startswith("blocks.")})
    if "patch_embed.proj.weight" in out and "patch_embed.proj.bias" not in out:
        out["patch_embed.proj.bias"] = out["patch_embed.proj.weight"].new_zeros(out["patch_embed.proj.weight"].shape[0])
        notes.append("patch embedding had no bias (mmseg patch_bias=False): zero bias")
    for i in map(str, blocks):
        w = out.get(f"blocks.{i}.attn.qkv.weight")
        if w is not None and f"blocks.{i}.attn.qkv.bias" not in out:
            q, vb = extra.get(f"{i}.attn.q_bias"), extra.get(f"{i}.attn.v_bias")
            zeros = w.new_zeros(w.shape[0] // 3)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([zeros if q is None else q, zeros,
                                                          zeros if vb is None else vb])
    return out, dropped, notes


# (format name, detector on keys, filter). First match wins; order matters (specific before generic).
_FORMATS: list[tuple[str, Callable[[StateDict, dict], bool],
                     Callable[[StateDict], tuple[StateDict, list[str], list[str]]]]] = [
    ("mae_transfer_backbone", lambda sd, meta: meta.get("format") == BACKBONE_FORMAT, _filter_timm),
    ("mae_transfer_pretrain", lambda sd, meta: "encoder.patch_embed.proj.weight" in sd, _filter_our_pretrain),
    ("detectron2_vitdet", lambda sd, meta: DETECTRON2_PREFIX + "patch_embed.proj.weight" in sd, _filter_detectron2),
    ("mae_transfer_mmseg", lambda sd, meta: MMSEG_PREFIX + "patch_embed.proj.weight" in sd,
     lambda sd: (*_strip(sd, MMSEG_PREFIX), [])),
    ("hf_vitmae", lambda sd, meta: "vit.embeddings.patch_embeddings.projection.weight" in sd
     and any(k.startswith("decoder.") for k in sd), _filter_hf),
    ("hf_vit", lambda sd, meta: "vit.embeddings.patch_embeddings.projection.weight" in sd
     or "embeddings.patch_embeddings.projection.weight" in sd, _filter_hf),
    ("mmseg_vit", lambda sd, meta: any(k.endswith("attn.attn.in_proj_weight") for k in sd), _filter_mmseg),
    ("mmseg_mae", lambda sd, meta: any(re.match(r"^(backbone\.)?layers\.\d+\.ffn\.layers\.0\.0\.weight$", k)
                                       for k in sd), _filter_mmseg),
    ("mae_official_pretrain", lambda sd, meta: "patch_embed.proj.weight" in sd
     and ("decoder_embed.weight" in sd or "mask_token" in sd), _filter_timm),
    ("mae_official_finetune", lambda sd, meta: "patch_embed.proj.weight" in sd and "fc_norm.weight" in sd,
     _filter_timm),
    ("deit", lambda sd, meta: "patch_embed.proj.weight" in sd and "dist_token" in sd, _filter_timm),
    ("timm", lambda sd, meta: "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd, _filter_timm),
    # Our ViT nested anywhere else (e.g. an adapter's `backbone.net.vit.`): strip the prefix.
    ("prefixed_vit", lambda sd, meta: _vit_prefix(sd) is not None,
     lambda sd: (*_strip(sd, _vit_prefix(sd) or ""), [f"keys under '{_vit_prefix(sd)}' used"])),
]


def _vit_prefix(sd: StateDict) -> str | None:
    """The prefix P with P + 'patch_embed.proj.weight' and P + 'blocks.0.attn.qkv.weight' in sd (shortest)."""
    found = [k[: -len("patch_embed.proj.weight")] for k in sd if k.endswith("patch_embed.proj.weight")]
    found = [p for p in found if p + "blocks.0.attn.qkv.weight" in sd]
    return min(found, key=len) if found else None
FORMATS = tuple(name for name, _, _ in _FORMATS)


def detect_format(sd: StateDict, meta: Mapping[str, Any] | None = None) -> str:
    meta = dict(meta or {})
    for name, test, _ in _FORMATS:
        if test(sd, meta):
            return name
    sample = ", ".join(list(sd)[:4])
    raise MaeTransferError(f"unknown checkpoint format (first keys: {sample}); supported: {', '.join(FORMATS)}")


def convert_state_dict(sd: StateDict,
                       meta: Mapping[str, Any] | None = None) -> tuple[StateDict, str, list[str], list[str]]:
    """Map a raw state dict to our key names. Returns (state_dict, format, dropped_keys, notes)."""
    fmt = detect_format(sd, meta)
    filt = next(f for name, _, f in _FORMATS if name == fmt)
    out, dropped, notes = filt(sd)
    return out, fmt, dropped, notes


# ------------------------------------------------------------------------------------------- fitting
def _prefix_rows(num: int) -> int | None:
    """Number of prefix (cls/dist) rows of a (1, P+g*g, C) table, or None if no P in 0..2 fits."""
    for p in (1, 0, 2):
        side = math.isqrt(max(num - p, 0))
        if side > 0 and side * side == num - p:
            return p
    return None


_CORE = re.compile(r"^(patch_embed\.proj\.weight|blocks\.\d+\.(norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.weight)$")


def fit_state_dict(sd: StateDict, model: VisionTransformer, report: LoadReport) -> StateDict:
    """Adapt a state dict in our naming to `model`: shapes checked, pos-embed/rel-pos resized, cls handled.

    Returns a complete state dict for `model.load_state_dict(..., strict=True)`: keys the checkpoint
    lacks (rel-pos tables, cls token, norm for ViTDet/mmseg backbones) keep the model's current values.
    """
    target = model.state_dict()
    out: StateDict = {}
    sd = _fit_beit_extras(dict(sd), target, model, report)
    src_blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if src_blocks and max(src_blocks) + 1 != model.depth:
        key = f"blocks.{min(max(src_blocks), model.depth)}.attn.qkv.weight"
        raise MaeTransferError(
            f"checkpoint has {max(src_blocks) + 1} blocks but the model has {model.depth} "
            f"(key '{key}'): the checkpoint is for a different architecture (depth)")
    for key, ref in target.items():
        if key not in sd and _BEIT_EXTRA.match(key):
            out[key] = ref  # counted in `_fit_beit_extras`'s note: started at their init, not missing
            continue
        if key not in sd:
            if _CORE.match(key):
                raise MaeTransferError(f"checkpoint ({report.format}) has no '{key}', which the model needs "
                                       f"(shape {tuple(ref.shape)})")
            report.missing.append(key)
            out[key] = ref
            continue
        v = sd[key]
        if key == "pos_embed":
            v = _fit_pos_embed(v, model, report)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and v.shape != ref.shape and v.shape[1:] == ref.shape[1:]:
            report.resized[key] = (tuple(v.shape), tuple(ref.shape))
            v = resize_rel_pos(v, ref.shape[0])
        elif key == "cls_token" and v.shape != ref.shape and v.numel() == ref.numel():
            v = v.reshape(ref.shape)
        if v.shape != ref.shape:
            if key.startswith("head."):  # another number of classes: keep the model's head
                report.notes.append(f"'{key}' has shape {tuple(v.shape)}, model {tuple(ref.shape)}: head not loaded")
                report.missing.append(key)
                out[key] = ref
                continue
            raise MaeTransferError(
                f"checkpoint key '{key}' has shape {tuple(v.shape)} but the model expects {tuple(ref.shape)}: "
                "the checkpoint is for a different architecture (width/depth/patch size)")
        out[key] = v.to(ref.dtype)
        report.loaded.append(key)
    report.unexpected.extend(k for k in sd if k not in target)
    return out


_BEIT_EXTRA = re.compile(r"^blocks\.(\d+)\.(gamma_[12]|attn\.relative_position_bias_table)$")


def _fit_beit_extras(sd: StateDict, target: StateDict, model: VisionTransformer, report: LoadReport) -> StateDict:
    """Layer scale and BEiT relative position bias tables (mmseg MAE/BEiT files) against `model`.

    The model has them: loaded as they are, a table resized to the model's grid if needed. The model lacks
    them: layer scale is folded into attn.proj / mlp.fc2 (exact); a non-zero table cannot be represented and
    is dropped with a warning. The checkpoint lacks them (e.g. MAE pretraining): the model's init is kept,
    which is how BEiT/mmseg start fine-tuning (gamma = init_values, zero table), so they are not `missing`.
    """
    folded, rel_nonzero = False, 0
    for key in [k for k in sd if _BEIT_EXTRA.match(k)]:
        i, name = _BEIT_EXTRA.match(key).groups()
        v = sd[key]
        if key in target:
            if name == "attn.relative_position_bias_table" and v.shape != target[key].shape:
                grid = model.blocks[int(i)].attn.rel_pos_bias_grid
                side = (math.isqrt(v.shape[0] - 3) + 1) // 2
                if (2 * side - 1) ** 2 + 3 != v.shape[0] or v.shape[1:] != target[key].shape[1:]:
                    raise MaeTransferError(f"checkpoint key '{key}' has shape {tuple(v.shape)} but the model "
                                           f"expects {tuple(target[key].shape)}: different heads or not a square grid")
                sd[key] = resize_rel_pos_bias_table(v, (side, side), grid)
                report.resized[key] = (tuple(v.shape), tuple(target[key].shape))
            continue
        del sd[key]
        if name.startswith("gamma"):
            # x + g * (W h + b) == x + (diag(g) W) h + g b, exactly.
            lin = f"blocks.{i}.{'attn.proj' if name == 'gamma_1' else 'mlp.fc2'}"
            if f"{lin}.weight" in sd:
                sd[f"{lin}.weight"] = sd[f"{lin}.weight"] * v[:, None]
                sd[f"{lin}.bias"] = sd[f"{lin}.bias"] * v
                folded = True
        elif bool(v.abs().max() > 0):
            rel_nonzero += 1
    if folded:
        report.notes.append("layer scale (gamma_1/gamma_2) folded into attn.proj and mlp.fc2 "
                            "(the model has no layer scale)")
    if rel_nonzero:
        report.notes.append(f"{rel_nonzero} blocks have non-zero BEiT relative position bias tables, which this "
                            "model has not (build it with use_rel_pos_bias=True): they are dropped and outputs "
                            "will differ from the source model")
        logger.warning(report.notes[-1])
    kept = [k for k in target if _BEIT_EXTRA.match(k) and k not in sd]
    if kept:
        report.notes.append(f"{len(kept)} layer-scale / relative-position-bias tensors are not in the checkpoint: "
                            "they keep the model's init (gamma = init_values, zero bias), as BEiT fine-tuning starts")
    return sd


def _fit_pos_embed(v: Tensor, model: VisionTransformer, report: LoadReport) -> Tensor:
    ref = model.pos_embed
    if v.ndim == 2:
        v = v.unsqueeze(0)
    if v.shape[-1] != ref.shape[-1]:
        raise MaeTransferError(
            f"checkpoint key 'pos_embed' has shape {tuple(v.shape)} but the model expects {tuple(ref.shape)}: "
            "different width")
    src_prefix = _prefix_rows(v.shape[1])
    if src_prefix is None:
        raise MaeTransferError(f"checkpoint 'pos_embed' with {v.shape[1]} rows is not a square grid (+cls)")
    tgt_prefix = model.num_prefix_tokens
    tgt_side = math.isqrt(ref.shape[1] - tgt_prefix)
    src_side = math.isqrt(v.shape[1] - src_prefix)
    # Resized once, as MAE fine-tuning (`interpolate_pos_embed`) and mmseg `MAE.resize_abs_pos_embed` do it: plain
    # bicubic, no antialias (timm's loader antialiases; no target here follows timm).
    grid = resize_abs_pos(v, (tgt_side, tgt_side), src_prefix, antialias=False).reshape(1, tgt_side * tgt_side, -1)
    if tgt_prefix:
        if src_prefix:
            cls_row = v[:, :1]
        else:
            cls_row = ref.detach()[:, :1]
            report.notes.append("checkpoint pos_embed has no cls row: the model's cls position kept")
        grid = torch.cat([cls_row, grid], dim=1)
    if src_side != tgt_side or src_prefix != tgt_prefix:
        report.resized["pos_embed"] = (tuple(v.shape), tuple(ref.shape))
    return grid


# ------------------------------------------------------------------------------------------- public API
def load_backbone_state_dict(src: str | os.PathLike | Mapping[str, Any], model: VisionTransformer,
                             allow_pickle: bool = False) -> tuple[StateDict, LoadReport]:
    """Read any supported checkpoint (path, HF folder, or an already loaded dict) for `model`.

    Returns (state_dict, report); `model.load_state_dict(state_dict)` then loads strictly.
    """
    source = "<dict>" if isinstance(src, Mapping) else str(src)
    raw = src if isinstance(src, Mapping) else read_checkpoint(src, allow_pickle)
    sd, meta = unwrap_state_dict(raw, source)
    converted, fmt, dropped, notes = convert_state_dict(sd, meta)
    report = LoadReport(format=fmt, source=source, notes=list(notes))
    out = fit_state_dict(converted, model, report)
    report.unexpected = dropped + report.unexpected
    return out, report


def load_backbone(model: VisionTransformer, src: str | os.PathLike | Mapping[str, Any],
                  allow_pickle: bool = False) -> LoadReport:
    """Load any supported checkpoint into `model` in place; logs and returns the report."""
    sd, report = load_backbone_state_dict(src, model, allow_pickle)
    model.load_state_dict(sd, strict=True)
    logger.info("%s", report)
    return report


def _arch_of(model: VisionTransformer) -> dict[str, Any]:
    return dict(img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
                depth=model.depth, num_heads=model.num_heads, class_token=model.cls_token is not None,
                window_size=model.window_size, global_block_indexes=list(model.global_block_indexes))


def _as_state_dict(model_or_sd: VisionTransformer | Mapping[str, Tensor]) -> StateDict:
    if isinstance(model_or_sd, torch.nn.Module):
        return {k: v.detach().cpu().clone() for k, v in model_or_sd.state_dict().items()}
    return {k: v.detach().cpu() for k, v in model_or_sd.items()}


def save_backbone(model_or_sd: VisionTransformer | Mapping[str, Tensor], path: str | os.PathLike,
                  arch: Mapping[str, Any] | None = None, **info: Any) -> Path:
    """The one backbone file (encoder-only export): {"format": "mae_transfer_backbone", "model": our ViT state
    dict, "arch": VisionTransformer kwargs, **info}; `info` holds plain values such as "name" (the backbones.vit
    name: `create_vit(ckpt["name"], **ckpt["arch"])` rebuilds the model) and where the weights come from."""
    if arch is None and isinstance(model_or_sd, VisionTransformer):
        arch = _arch_of(model_or_sd)
    return atomic_torch_save({**info, "format": BACKBONE_FORMAT, "model": _as_state_dict(model_or_sd),
                              "arch": dict(arch or {})}, path)


# Our keys detectron2's `ViT` has no tensor for: it keeps the cls row of the position table (pretrain_use_cls_token)
# but has no cls token, final norm or head.
_NOT_IN_DETECTRON2_VIT = re.compile(r"^(cls_token|(norm|fc_norm|head)\..*)$")


def to_detectron2(model_or_sd: VisionTransformer | Mapping[str, Tensor], path: str | os.PathLike,
                  prefix: str = DETECTRON2_PREFIX, detectron2_vit_keys_only: bool = False) -> Path:
    """File for detectron2's `DetectionCheckpointer`: {"model": {"backbone.net.<our key>": ...}}.

    detectron2_vit_keys_only: leave out the keys detectron2's own `ViT` lacks (`cls_token`, a final norm, a head),
    so that it loads the file with no unused key; our `ViTBackbone` then keeps its (unused) cls token's init.
    """
    sd = {prefix + k: v for k, v in _as_state_dict(model_or_sd).items()
          if not (detectron2_vit_keys_only and _NOT_IN_DETECTRON2_VIT.match(k))}
    return atomic_torch_save({"model": sd, "__author__": "mae_transfer", "matching_heuristics": False}, path)


def to_mmseg(model_or_sd: VisionTransformer | Mapping[str, Tensor], path: str | os.PathLike,
             prefix: str = MMSEG_PREFIX) -> Path:
    """File for mmengine's `load_checkpoint` / `load_from`: {"state_dict": {"backbone.<our key>": ...}, "meta": ...}."""
    sd = {prefix + k: v for k, v in _as_state_dict(model_or_sd).items()}
    return atomic_torch_save({"state_dict": sd, "meta": {"converted_by": "mae_transfer"}}, path)


# The converter's detectron2 file is for detectron2's own ViTDet as well as ours: only the keys its `ViT` has.
WRITERS: dict[str, Callable[..., Path]] = {"backbone": save_backbone, "mmseg": to_mmseg,
                                           "detectron2": partial(to_detectron2, detectron2_vit_keys_only=True)}


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, model: VisionTransformer,
                       allow_pickle: bool = False) -> LoadReport:
    """Read `src` for `model`, load it, and write `dst` in the `to` layout (atomic; nothing left on failure)."""
    if to not in WRITERS:
        raise MaeTransferError(f"unknown target layout {to!r}; expected one of {', '.join(WRITERS)}")
    report = load_backbone(model, src, allow_pickle)
    WRITERS[to](model, dst)
    return report
