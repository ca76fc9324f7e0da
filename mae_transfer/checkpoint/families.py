"""Checkpoint formats of the backbone families (issue 35): each family's own file layout mapped to our ViT's names.

Rows (`ROWS`: the fields of a `formats.Format`, which `formats` registers), what they read, and the source of the names:
  dinov2          facebookresearch/dinov2 `DinoVisionTransformer` (`register_tokens`, `ls1.gamma`, `mlp.w12`/`w3`,
                  chunked `blocks.i.j.` FSDP layout)
  hf_dinov2       transformers `Dinov2Model` / `Dinov2WithRegistersModel` (hub and v5 names, `layer_scale1.lambda1`)
  hf_clip         transformers `CLIPVisionModel` / `CLIPModel` (`vision_model.*`; the text tower is reported unused)
  openai_clip     OpenAI CLIP / open_clip `visual.*` (`conv1`, `ln_pre`, `in_proj_weight`, `c_fc`; text tower unused)
  clip_text_only  a CLIP file without any image tower: an error, not a backbone
  beit            microsoft/unilm BEiT / BEiTv2 and timm `Beit` (`q_bias`/`v_bias`, per-block or shared
                  relative position bias, layer scale `gamma_1/2`, no absolute position table)
  eva02           baaivision EVA-02 (`mlp.w1/w2/w3`, `ffn_ln`, `q_bias`/`v_bias`, rope buffers) and timm `Eva`
                  (`q_proj`/`k_proj`/`v_proj`, `mlp.fc1_g/fc1_x/norm`)
timm's own VisionTransformer files of every family (DeiT III / DINOv2 `ls1.gamma`, registers, CLIP `norm_pre`)
go through the `timm` row, whose filter (`formats._filter_timm`) calls `timm_family_fixups`.

Our names: layer scale is `gamma_1/gamma_2` (BEiT's), registers `reg_token` (timm's), separate q/k/v become one
`qkv` (k has no bias in BEiT/EVA/CLIP-HF-free layouts: a zero k bias is exact).
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from backbones.patch_resample import resample_patch_embed
from mae_transfer.checkpoint.reading import Converted, StateDict
from mae_transfer.errors import MaeTransferError


def timm_family_fixups(out: StateDict, notes: list[str]) -> None:
    """timm ViT files of the families, in place: `ls1/ls2.gamma` -> `gamma_1/2`; a class-token file whose position
    table has no cls row (timm `no_embed_class`: DeiT III, DINOv2 with registers) gets a zero cls row, which is
    what no_embed_class computes; a patch embedding without bias (CLIP) gets a zero bias."""
    for k in [k for k in out if re.match(r"^blocks\.\d+\.ls[12]\.gamma$", k)]:
        i, which = re.match(r"^blocks\.(\d+)\.ls([12])\.gamma$", k).groups()
        out[f"blocks.{i}.gamma_{which}"] = out.pop(k)
    pos = out.get("pos_embed")
    if pos is not None and "cls_token" in out:
        rows = pos.shape[-2]
        if math.isqrt(rows) ** 2 == rows:
            out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos.reshape(1, rows, -1)], dim=1)
            notes.append("position table without a cls row (timm no_embed_class): zero cls row added")
    _zero_patch_bias(out, notes)


def _zero_patch_bias(out: StateDict, notes: list[str]) -> None:
    w = out.get("patch_embed.proj.weight")
    if w is not None and "patch_embed.proj.bias" not in out:
        out["patch_embed.proj.bias"] = w.new_zeros(w.shape[0])
        notes.append("patch embedding has no bias in this family: zero bias")


def _fuse_qkv(out: StateDict, parts: dict[tuple[str, str], dict[str, Tensor]], needs_bias: bool = True) -> None:
    """q/k/v weights (and biases, a missing one is zero: BEiT/EVA have no k bias) -> `blocks.i.attn.qkv.*`."""
    for (i, kind), got in sorted(parts.items()):
        if kind == "bias":
            continue
        if set(got) != {"q", "k", "v"}:
            raise MaeTransferError(f"block {i}: attention needs q, k and v weights, found {sorted(got)}")
        w = torch.cat([got["q"], got["k"], got["v"]], dim=0)
        out[f"blocks.{i}.attn.qkv.weight"] = w
        biases = parts.get((i, "bias"), {})
        if biases or needs_bias:
            zeros = w.new_zeros(w.shape[0] // 3)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([biases.get(n, zeros) for n in "qkv"])


# ------------------------------------------------------------------------------------------- DINOv2
def _rename_block_key(out: StateDict, i: str, rest: str, v: Tensor, simple: dict[str, str]) -> bool:
    """Block i's key `rest` under the first matching prefix rename of `simple` (HF layouts); False if none fits."""
    for src, dst in simple.items():
        if rest.startswith(src):
            out[f"blocks.{i}.{dst}{rest[len(src):]}"] = v
            return True
    return False


def _filter_dinov2(sd: StateDict) -> Converted:
    """facebookresearch/dinov2: registers -> `reg_token`, `ls1/ls2.gamma` -> `gamma_1/2`, SwiGLU `w12/w3` ->
    `fc1/fc2` (our `swiglu_packed`), chunked `blocks.i.j.` -> `blocks.j.`; `mask_token` (iBOT) dropped."""
    out: StateDict = {}
    dropped: list[str] = []
    notes: list[str] = []
    for k, v in sd.items():
        name = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block_chunks > 0 layout
        if name == "mask_token":
            dropped.append(k)
            continue
        name = name.replace("register_tokens", "reg_token").replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.",
                                                                                                     "mlp.fc2.")
        name = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", name)
        out[name] = v
    if "mlp.fc1" in " ".join(out) and any(k.endswith("mlp.w12.weight") for k in sd):
        notes.append("SwiGLU FFN (w12/w3): build the model with mlp_layer='swiglu_packed'")
    return out, dropped, notes


def _filter_hf_dinov2(sd: StateDict) -> Converted:
    """transformers Dinov2Model (hub `attention.attention.query` and v5 `attention.q_proj` names)."""
    out: StateDict = {}
    dropped: list[str] = []
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    simple = {"norm1.": "norm1.", "norm2.": "norm2.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
              "mlp.weights_in.": "mlp.fc1.", "mlp.weights_out.": "mlp.fc2.",
              "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj."}
    for k, v in sd.items():
        name = k[len("dinov2."):] if k.startswith("dinov2.") else k
        m = re.match(r"^encoder\.layers?\.(\d+)\.(.+)$", name)
        if m:
            i, rest = m.groups()
            q = re.match(r"^attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$", rest)
            if q:
                parts.setdefault((i, q.group(2)), {})[q.group(1)[0]] = v
                continue
            ls = re.match(r"^layer_scale([12])\.lambda1$", rest)
            if ls:
                out[f"blocks.{i}.gamma_{ls.group(1)}"] = v
                continue
            if not _rename_block_key(out, i, rest, v, simple):
                dropped.append(k)
            continue
        renames = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
                   "embeddings.register_tokens": "reg_token"}
        if name in renames:
            out[renames[name]] = v
        elif name.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + name.rsplit(".", 1)[1]] = v
        elif name.startswith("layernorm."):
            out["norm." + name.rsplit(".", 1)[1]] = v
        elif name.startswith("classifier."):
            out["head." + name.rsplit(".", 1)[1]] = v
        else:
            dropped.append(k)  # embeddings.mask_token
    _fuse_qkv(out, parts)
    return out, dropped, []


# ------------------------------------------------------------------------------------------- CLIP
def _clip_text_only(sd: StateDict) -> bool:
    text = any(k.startswith(("token_embedding.", "text_model.", "text_projection", "transformer.resblocks."))
               for k in sd)
    vision = any(k.startswith(("visual.", "vision_model.", "conv1.")) or ".visual." in k for k in sd)
    return text and not vision


def _refuse_text_only(sd: StateDict) -> Converted:
    raise MaeTransferError("CLIP checkpoint holds the text tower only (token_embedding / transformer.resblocks / "
                           "text_model keys, no visual.* or vision_model.* image tower): expected the image tower")


def _filter_openai_clip(sd: StateDict) -> Converted:
    """OpenAI CLIP / open_clip `visual.*` (timm `_convert_openai_clip`'s names); `visual.proj` (the image->joint
    projection, no bias) becomes `head` with zero bias; everything outside `visual.` (text tower) is unused."""
    prefix = "module.visual." if any(k.startswith("module.visual.") for k in sd) else "visual."
    swaps = [("conv1", "patch_embed.proj"), ("positional_embedding", "pos_embed"),
             ("transformer.resblocks.", "blocks."),
             ("ln_pre", "norm_pre"), ("ln_post", "norm"), ("ln_", "norm"), ("in_proj_", "qkv."),
             ("out_proj", "proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
    out: StateDict = {}
    dropped = [k for k in sd if not k.startswith(prefix)]
    notes = []
    if dropped:
        notes.append(f"text tower and joint-embedding keys unused ({len(dropped)} keys outside '{prefix}')")
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name.startswith(("attnpool.", "layer1.", "trunk.")):
            raise MaeTransferError(f"CLIP key '{k}': a ResNet or timm-trunk image tower, not a plain ViT")
        for a, b in swaps:
            name = name.replace(a, b)
        if name == "proj":
            out["head.weight"] = v.t()
            out["head.bias"] = v.new_zeros(v.shape[1])
            continue
        if name == "class_embedding":
            name, v = "cls_token", v.reshape(1, 1, -1)
        elif name == "pos_embed":
            v = v.unsqueeze(0)
        out[name] = v
    _zero_patch_bias(out, notes)
    notes.append("OpenAI CLIP uses QuickGELU and LayerNorm eps 1e-5 (act_layer='quick_gelu', norm_eps=1e-5, "
                 "pre_norm=True); open_clip's own models use GELU")
    return out, dropped, notes


def _filter_hf_clip(sd: StateDict) -> Converted:
    """transformers CLIPVisionModel / CLIPModel: `pre_layrnorm` -> `norm_pre`, q/k/v -> qkv, `post_layernorm` ->
    `norm` (HF applies it to the pooled cls token only; ours to every token: the cls row is HF's pooler output),
    `visual_projection` -> head with zero bias; `text_model.*` unused."""
    out: StateDict = {}
    dropped: list[str] = []
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    vision = any(k.startswith("vision_model.") for k in sd)
    simple = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
              "self_attn.out_proj.": "attn.proj."}
    for k, v in sd.items():
        if vision and not k.startswith(("vision_model.", "visual_projection.")):
            dropped.append(k)
            continue
        name = k[len("vision_model."):] if k.startswith("vision_model.") else k
        m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", name)
        if m:
            i, rest = m.groups()
            q = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if q:
                parts.setdefault((i, q.group(2)), {})[q.group(1)] = v
                continue
            if not _rename_block_key(out, i, rest, v, simple):
                dropped.append(k)
        elif name == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif name.startswith("embeddings.patch_embedding."):
            out["patch_embed.proj." + name.rsplit(".", 1)[1]] = v
        elif name.startswith("pre_layrnorm."):
            out["norm_pre." + name.rsplit(".", 1)[1]] = v
        elif name.startswith("post_layernorm."):
            out["norm." + name.rsplit(".", 1)[1]] = v
        elif name == "visual_projection.weight":
            out["head.weight"] = v
            out["head.bias"] = v.new_zeros(v.shape[0])
        else:
            dropped.append(k)  # position_ids buffers of old files
    _fuse_qkv(out, parts)
    notes: list[str] = []
    text = [k for k in dropped if k.startswith(("text_model.", "text_projection", "logit_scale"))]
    if text:
        notes.append(f"text tower unused ({len(text)} keys: text_model.*, text_projection, logit_scale)")
    _zero_patch_bias(out, notes)
    return out, dropped, notes


# ------------------------------------------------------------------------------------------- BEiT
def _filter_beit(sd: StateDict) -> Converted:
    """BEiT / BEiTv2 (unilm and timm): q/v biases -> qkv bias (k = 0), a shared `rel_pos_bias` table copied into
    every block (as BEiT's fine-tuning does), `lm_head` / `mask_token` / BEiTv2 `cls_pt_layers` dropped; BEiT has no
    absolute position table: a zero one is added (exactly no position term)."""
    out: StateDict = {}
    dropped: list[str] = []
    notes: list[str] = []
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    shared = sd.get("rel_pos_bias.relative_position_bias_table")
    for k, v in sd.items():
        if k.startswith(("lm_head.", "cls_pt_layers.", "rel_pos_bias.")) or k == "mask_token" \
                or k.endswith("relative_position_index"):
            dropped.append(k)
            continue
        m = re.match(r"^blocks\.(\d+)\.attn\.(q|v)_bias$", k)
        if m:
            parts.setdefault((m.group(1), "bias"), {})[m.group(2)] = v
            continue
        out[k] = v
    blocks = sorted({int(k.split(".")[1]) for k in out if k.startswith("blocks.")})
    for i in blocks:
        bias = parts.get((str(i), "bias"))
        w = out.get(f"blocks.{i}.attn.qkv.weight")
        if bias is not None and w is not None:
            zeros = w.new_zeros(w.shape[0] // 3)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([bias.get("q", zeros), zeros, bias.get("v", zeros)])
        if shared is not None:
            out[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    if shared is not None:
        notes.append("shared relative position bias table copied into every block (BEiT fine-tuning's "
                     "use_rel_pos_bias)")
    if "pos_embed" not in out and "cls_token" in out:
        table = out.get("blocks.0.attn.relative_position_bias_table")
        if table is not None:
            side = (math.isqrt(table.shape[0] - 3) + 1) // 2
            out["pos_embed"] = table.new_zeros(1, side * side + 1, out["cls_token"].shape[-1])
            notes.append("BEiT has no absolute position table: a zero table (no position term) is loaded")
    return out, dropped, notes


# ------------------------------------------------------------------------------------------- EVA-02
def _filter_eva(sd: StateDict) -> Converted:
    """EVA-02 (baaivision, timm `checkpoint_filter_fn`'s renames) and timm `Eva`: separate q/k/v (+ q_bias,
    v_bias) -> qkv, SwiGLU `w1/w2/w3/ffn_ln` -> `fc1_g/fc1_x/fc2/norm`; rope buffers, `mask_token`, `lm_head`
    dropped. Build the model with mlp_layer='swiglu', scale_mlp=True, use_rot_pos_emb=True."""
    out: StateDict = {}
    dropped: list[str] = []
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for k, v in sd.items():
        if "rope" in k or k == "mask_token" or k.startswith("lm_head."):
            dropped.append(k)
            continue
        if "attn.inner_attn_ln" in k or re.match(r"^blocks\.\d+\.attn\.norm\.", k) or "q_norm" in k:
            raise MaeTransferError(f"EVA checkpoint key '{k}': attention sub-LN / qk-norm is not an option of this "
                                   "ViT (EVA-02 B/L files have none)")
        m = re.match(r"^blocks\.(\d+)\.attn\.(?:([qkv])_proj\.(weight|bias)|([qv])_bias)$", k)
        if m:
            i = m.group(1)
            if m.group(4):
                parts.setdefault((i, "bias"), {})[m.group(4)] = v
            else:
                parts.setdefault((i, m.group(3)), {})[m.group(2)] = v
            continue
        name = (k.replace("mlp.ffn_ln", "mlp.norm").replace("mlp.w1.", "mlp.fc1_g.").replace("mlp.w2.", "mlp.fc1_x.")
                .replace("mlp.w3.", "mlp.fc2."))
        out[name] = v
    _fuse_qkv(out, parts)
    return out, dropped, []


def _has(sd: StateDict, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.match(k) for k in sd)


# Priorities above the rows these refine: DINOv2 files have `mask_token` (mae_official_pretrain, 50), HF DINOv2
# has HF ViT's patch-embedding key (hf_vit, 65), timm BEiT / EVA `fc_norm` and BEiT / EVA MIM `mask_token`
# (mae_official_finetune 45, mae_official_pretrain 50).
ROWS = (
    ("hf_clip", "Hugging Face CLIPVisionModel / CLIPModel (image tower used)",
     lambda sd, meta: any(k.endswith("embeddings.class_embedding") for k in sd), _filter_hf_clip, 69),
    ("hf_dinov2", "Hugging Face Dinov2Model (DINOv2, optionally with registers)",
     lambda sd, meta: _has(sd, r"^(dinov2\.)?encoder\.layers?\.0\.layer_scale1\.lambda1$"), _filter_hf_dinov2,
     67),
    ("openai_clip", "OpenAI CLIP / open_clip model, image tower visual.* used",
     lambda sd, meta: "visual.conv1.weight" in sd or "module.visual.conv1.weight" in sd, _filter_openai_clip,
     63),
    ("clip_text_only", "CLIP text tower without an image tower (not loadable as a backbone)",
     lambda sd, meta: _clip_text_only(sd), _refuse_text_only, 62),
    ("dinov2", "facebookresearch/dinov2 DinoVisionTransformer",
     lambda sd, meta: "patch_embed.proj.weight" in sd and ("register_tokens" in sd or (
         "mask_token" in sd and _has(sd, r"^blocks\.(\d+\.)?\d+\.ls1\.gamma$"))
         or _has(sd, r"^blocks\.\d+\.\d+\.attn\.qkv\.weight$")), _filter_dinov2, 52),
    ("beit", "BEiT / BEiTv2 (microsoft/unilm or timm Beit)",
     lambda sd, meta: "patch_embed.proj.weight" in sd and _has(sd, r"^blocks\.0\.attn\.q_bias$")
     and "blocks.0.attn.qkv.weight" in sd, _filter_beit, 54),
    ("eva02", "EVA-02 (baaivision/EVA or timm Eva)",
     lambda sd, meta: "patch_embed.proj.weight" in sd and "blocks.0.attn.q_proj.weight" in sd, _filter_eva, 57),
)


# ------------------------------------------------------------------------------------------- patch size
def fit_patch_size(sd: StateDict, model, report) -> None:
    """A patch kernel of another size (DINOv2 / EVA-02's 14 px into a 16-px recipe), in place: resampled with
    `backbones.patch_resample` (FlexiViT) when the model says `resample_patch_embed=True`, else one error line.
    The position table then follows the model's grid in `fit_state_dict` (resized as any other table)."""
    w = sd.get("patch_embed.proj.weight")
    target = model.patch_embed.proj.weight
    if w is None or w.ndim != 4 or tuple(w.shape[-2:]) == tuple(target.shape[-2:]) or w.shape[:2] != target.shape[:2]:
        return
    src, dst = "x".join(map(str, w.shape[-2:])), "x".join(map(str, target.shape[-2:]))
    if not getattr(model, "resample_patch_embed", False):
        raise MaeTransferError(
            f"checkpoint 'patch_embed.proj.weight' has {src} patches but the model {dst}: resample it "
            f"(resample_patch_embed=True, as the det/seg family configs do) or keep patch size "
            f"{w.shape[-1]} (patch_size={w.shape[-1]}, --keep-patch-size for classification)")
    sd["patch_embed.proj.weight"] = resample_patch_embed(w, tuple(target.shape[-2:]))
    report.resized["patch_embed.proj.weight"] = (tuple(w.shape), tuple(target.shape))
    report.notes.append(f"patch embedding resampled {src} -> {dst} (FlexiViT pseudo-inverse): an approximation "
                        "of the source model, not parity; fine-tuning adapts it")
