"""Checkpoint formats: which kind of file a state dict is, and how its keys map to our ViT's.

A `Format` is one row: a name (what `LoadReport.format` says), a label saying what the file is, a `detect`
predicate on the keys (and the file's other top-level entries), a `convert` function mapping the keys to ours,
and a priority. Several formats can match one file (a DeiT file also has every timm key): the matching format
with the highest priority wins, so a new row (e.g. DINOv2) only needs a priority above the formats it refines,
not a place in a list. Priorities are unique; `register_format` refuses a taken one.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mae_transfer.checkpoint import families
from mae_transfer.checkpoint.reading import Converted, StateDict
from mae_transfer.errors import MaeTransferError

BACKBONE_FORMAT = "mae_transfer_backbone"
DETECTRON2_PREFIX = "backbone.net."
MMSEG_PREFIX = "backbone."


@dataclass(frozen=True)
class Format:
    """One checkpoint format: see the module docstring."""

    name: str
    label: str
    detect: Callable[[StateDict, Mapping[str, Any]], bool]
    convert: Callable[[StateDict], Converted]
    priority: int


_REGISTRY: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add `fmt` to the formats `detect_format` considers; its name and priority must be new."""
    if fmt.name in _REGISTRY:
        raise ValueError(f"checkpoint format {fmt.name!r} is already registered")
    taken = next((f for f in _REGISTRY.values() if f.priority == fmt.priority), None)
    if taken is not None:
        raise ValueError(f"checkpoint format {fmt.name!r}: priority {fmt.priority} is already {taken.name!r}'s "
                         "(priorities decide between formats that both match a file, so they are unique)")
    _REGISTRY[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> Format:
    """Remove a registered format (e.g. one a test added); returns it."""
    return _REGISTRY.pop(name)


def registered_formats() -> list[Format]:
    """Every registered format, highest priority first (the order detection prefers them)."""
    return sorted(_REGISTRY.values(), key=lambda f: -f.priority)


def match_format(sd: StateDict, meta: Mapping[str, Any] | None = None) -> Format:
    """The highest-priority format whose `detect` accepts the state dict."""
    meta = dict(meta or {})
    matches = [f for f in _REGISTRY.values() if f.detect(sd, meta)]
    if not matches:
        sample = ", ".join(list(sd)[:4])
        names = ", ".join(f.name for f in registered_formats())
        raise MaeTransferError(f"unknown checkpoint format (first keys: {sample}); supported: {names}")
    return max(matches, key=lambda f: f.priority)


def detect_format(sd: StateDict, meta: Mapping[str, Any] | None = None) -> str:
    """The name of the state dict's format (`match_format`)."""
    return match_format(sd, meta).name


def convert_state_dict(sd: StateDict,
                       meta: Mapping[str, Any] | None = None) -> tuple[StateDict, str, list[str], list[str]]:
    """Map a raw state dict to our key names. Returns (state_dict, format name, dropped_keys, notes)."""
    fmt = match_format(sd, meta)
    out, dropped, notes = fmt.convert(sd)
    return out, fmt.name, dropped, notes


# ------------------------------------------------------------------------------------------- key filters
def _strip(sd: StateDict, prefix: str) -> tuple[StateDict, list[str]]:
    """Keys under `prefix` (prefix removed) and the list of other keys."""
    kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return kept, [k for k in sd if not k.startswith(prefix)]


_MAE_DECODER = re.compile(r"^(decoder_|decoder\.|mask_token)")


def _filter_timm(sd: StateDict) -> Converted:
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
    families.timm_family_fixups(out, notes)
    return out, dropped, notes


def _filter_our_pretrain(sd: StateDict) -> Converted:
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


def _filter_hf(sd: StateDict) -> Converted:
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


def _filter_detectron2(sd: StateDict) -> Converted:
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


def _filter_mmseg(sd: StateDict) -> Converted:
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


def _vit_prefix(sd: StateDict) -> str | None:
    """The prefix P with P + 'patch_embed.proj.weight' and P + 'blocks.0.attn.qkv.weight' in sd (shortest)."""
    found = [k[: -len("patch_embed.proj.weight")] for k in sd if k.endswith("patch_embed.proj.weight")]
    found = [p for p in found if p + "blocks.0.attn.qkv.weight" in sd]
    return min(found, key=len) if found else None


def _filter_prefixed(sd: StateDict) -> Converted:
    prefix = _vit_prefix(sd) or ""
    return (*_strip(sd, prefix), [f"keys under '{prefix}' used"])


def _filter_mmseg_ours(sd: StateDict) -> Converted:
    return (*_strip(sd, MMSEG_PREFIX), [])


def _vit_keys(sd: StateDict) -> bool:
    """Our (= timm's) ViT key names at the top level."""
    return "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd


def _detectron2_vit(sd: StateDict) -> bool:
    """detectron2's `ViT` module itself: our key names, but no cls token, final norm or head (timm ViTs have
    a final norm or fc_norm; ours keep a cls token)."""
    return _vit_keys(sd) and "cls_token" not in sd and not any(
        k.startswith(("norm.", "fc_norm.", "head.")) for k in sd)


_MMSEG_MAE_FFN = re.compile(r"^(backbone\.)?layers\.\d+\.ffn\.layers\.0\.0\.weight$")

# Priorities: a format that refines another (DeiT refines timm; mmseg's ViT has every mmseg MAE key pattern)
# sits above it; the catch-all `prefixed_vit` is lowest.
for _fmt in (
    Format("mae_transfer_backbone", "mae_transfer backbone export, written by save_backbone",
           lambda sd, meta: meta.get("format") == BACKBONE_FORMAT, _filter_timm, 100),
    Format("mae_transfer_pretrain", "mae_transfer MAE pretraining checkpoint, encoder + decoder",
           lambda sd, meta: "encoder.patch_embed.proj.weight" in sd, _filter_our_pretrain, 90),
    Format("detectron2_vitdet", "detectron2 model with a ViT backbone under backbone.net.",
           lambda sd, meta: DETECTRON2_PREFIX + "patch_embed.proj.weight" in sd, _filter_detectron2, 80),
    Format("mae_transfer_mmseg", "mmseg model with our ViT backbone under backbone.",
           lambda sd, meta: MMSEG_PREFIX + "patch_embed.proj.weight" in sd, _filter_mmseg_ours, 75),
    Format("hf_vitmae", "Hugging Face ViTMAE pretraining model, encoder + decoder",
           lambda sd, meta: "vit.embeddings.patch_embeddings.projection.weight" in sd
           and any(k.startswith("decoder.") for k in sd), _filter_hf, 70),
    Format("hf_vit", "Hugging Face ViT model",
           lambda sd, meta: "vit.embeddings.patch_embeddings.projection.weight" in sd
           or "embeddings.patch_embeddings.projection.weight" in sd, _filter_hf, 65),
    Format("mmseg_vit", "mmseg VisionTransformer backbone",
           lambda sd, meta: any(k.endswith("attn.attn.in_proj_weight") for k in sd), _filter_mmseg, 60),
    Format("mmseg_mae", "mmseg MAE / BEiT backbone",
           lambda sd, meta: any(_MMSEG_MAE_FFN.match(k) for k in sd), _filter_mmseg, 55),
    Format("mae_official_pretrain", "facebookresearch/mae pretraining checkpoint, encoder + decoder",
           lambda sd, meta: "patch_embed.proj.weight" in sd and ("decoder_embed.weight" in sd or "mask_token" in sd),
           _filter_timm, 50),
    Format("mae_official_finetune", "facebookresearch/mae fine-tuned classifier with fc_norm and head",
           lambda sd, meta: "patch_embed.proj.weight" in sd and "fc_norm.weight" in sd, _filter_timm, 45),
    Format("deit", "DeiT ViT with a distillation token",
           lambda sd, meta: "patch_embed.proj.weight" in sd and "dist_token" in sd, _filter_timm, 40),
    Format("detectron2_vit", "detectron2 ViT backbone state dict, no cls token or final norm",
           lambda sd, meta: _detectron2_vit(sd), _filter_timm, 35),
    Format("timm", "timm ViT state dict", lambda sd, meta: _vit_keys(sd), _filter_timm, 30),
    # Our ViT nested anywhere else (e.g. an adapter's `backbone.net.vit.`): strip the prefix.
    Format("prefixed_vit", "ViT with timm / our key names under a prefix",
           lambda sd, meta: _vit_prefix(sd) is not None, _filter_prefixed, 10),
):
    register_format(_fmt)
del _fmt
# The backbone families' rows (DINOv2, CLIP, BEiT, EVA-02): their filters live in `families`.
for _row in families.ROWS:
    register_format(Format(*_row))
del _row
