"""The one plain Vision Transformer used by MAE pretraining, detectron2 and MMSegmentation.

Parameter names follow timm's `VisionTransformer` (and so the official MAE encoder), so those
checkpoints load without renaming. Options used downstream (all off by default):
window attention with a few global blocks and decomposed relative position (ViTDet), BEiT-style
relative position bias tables and layer scale (BEiT / mmseg `MAE` segmentation fine-tuning), absolute
position embeddings interpolated to any input size, drop path, activation checkpointing, and
intermediate block outputs as feature maps, partial fine-tuning (`freeze_blocks`).

Attention goes through `backbones.kernels.attention` (SDPA, or a CPU kernel where SDPA is slow there).

Two layouts go through the same blocks:
  tokens  (B, N, C): classification / MAE (cls token, visible patches only);
  spatial (B, H, W, C): dense tasks (windows, rel-pos), no cls token, as in ViTDet.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from backbones.errors import BackboneError
from backbones.kernels import attention
from backbones.rope import apply_rope, rope_sin_cos

logger = logging.getLogger(__name__)

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class DropPath(nn.Module):
    """Stochastic depth per sample (residual branch dropped with probability `drop_prob`)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, H/p, W/p, C)."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise BackboneError(
                f"input size {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}"
            )
        return self.proj(x).permute(0, 2, 3, 1)

    def embed_patches(self, pixels: Tensor) -> Tensor:
        """Flattened patches (..., p*p*3, pixels in (row, col, channel) order) -> tokens (..., C): the same
        linear map as `proj`, for callers that embed only some patches (MAE's visible ones)."""
        weight = self.proj.weight.permute(0, 2, 3, 1).reshape(self.proj.out_channels, -1)
        return F.linear(pixels, weight, self.proj.bias)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (its weights were trained with it, not with GELU)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACT_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "silu": nn.SiLU}


def act_layer_for(name: str) -> Callable[[], nn.Module]:
    if name not in ACT_LAYERS:
        raise BackboneError(f"act_layer must be one of {', '.join(ACT_LAYERS)}, got {name!r}")
    return ACT_LAYERS[name]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """DINOv2's SwiGLU FFN (its `w12`/`w3`, timm `SwiGLUPacked`): fc1 yields [x1; x2], out = fc2(silu(x1) * x2).
    `hidden_dim` is fc1's width, both halves (timm's convention: ViT-g/14 has mlp_ratio 5.33334)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise BackboneError(f"swiglu_packed needs an even hidden width (dim * mlp_ratio), got {hidden_dim}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_dim // 2, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(x1) * x2)


class SwiGLU(nn.Module):
    """EVA-02's SwiGLU (timm `SwiGLU` names): fc2(norm(silu(fc1_g x) * fc1_x x)); `norm` is EVA-02's sub-LN
    (`scale_mlp`), Identity without it."""

    def __init__(self, dim: int, hidden_dim: int, scale_mlp: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden_dim)
        self.fc1_x = nn.Linear(dim, hidden_dim)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(hidden_dim, eps=eps) if scale_mlp else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))


MLP_LAYERS = ("mlp", "swiglu_packed", "swiglu")


def resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Linearly resample a (L, head_dim) relative-position table to `length` rows (as ViTDet does)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


def rel_pos_table(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis: (q_size, k_size, head_dim)."""
    rel_pos = resize_rel_pos(rel_pos, 2 * max(q_size, k_size) - 1)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_terms(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                             hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The two factors of the ViTDet/MViTv2 decomposed rel-pos bias, from the unscaled q (B, heads, h*w, d):
    (B, heads, h, w, h) and (B, heads, h, w, w); `kernels.attention(..., rel_pos=...)` adds them to the logits."""
    h, w = hw
    b, heads, _, dim = q.shape
    r_q = q.reshape(b, heads, h, w, dim)
    return (torch.einsum("bnhwc,hkc->bnhwk", r_q, rel_pos_table(h, h, rel_pos_h)),
            torch.einsum("bnhwc,wkc->bnhwk", r_q, rel_pos_table(w, w, rel_pos_w)))


def beit_relative_position_index(grid: tuple[int, int]) -> Tensor:
    """BEiT's (1+N, 1+N) index into a ((2*Wh-1)*(2*Ww-1)+3, heads) bias table for a Wh x Ww grid plus a
    leading cls token: patch pairs index their 2-D offset; the last 3 rows are cls->patch, patch->cls and
    cls->cls (the layout of BEiT, mmseg `BEiTAttention` and timm `Beit`, so their tables load as they are)."""
    wh, ww = grid
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    num = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
    index[0, 0:] = num - 3
    index[0:, 0] = num - 2
    index[0, 0] = num - 1
    return index


def resize_rel_pos_bias_table(table: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """A BEiT ((2*Wh-1)*(2*Ww-1)+3, heads) table for grid `src_grid` resampled to `dst_grid`: bicubic over the
    (2*Wh-1) x (2*Ww-1) offset grid with the end offsets kept at the ends (align_corners), the 3 cls rows
    unchanged. BEiT/mmseg resize with scipy's interp2d (removed from scipy), on a geometric grid."""
    if tuple(src_grid) == tuple(dst_grid):
        return table
    sh, sw = 2 * src_grid[0] - 1, 2 * src_grid[1] - 1
    dh, dw = 2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1
    if table.shape[0] != sh * sw + 3:
        raise BackboneError(f"relative position bias table with {table.shape[0]} rows does not fit grid {src_grid}")
    grid, extra = table[:-3], table[-3:]
    dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
    grid = grid.to(dtype).reshape(1, sh, sw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dh, dw), mode="bicubic", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(dh * dw, -1).to(table.dtype)
    return torch.cat([grid, extra], dim=0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_size: tuple[int, int] | None = None,
                 rel_pos_bias_grid: tuple[int, int] | None = None,
                 rope_ref_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        # EVA-02 2-D RoPE on q and k of the patch tokens; no parameters (sin/cos follow the grid seen).
        self.rope_ref_grid = tuple(rope_ref_grid) if rope_ref_grid else None
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if rel_pos_size is None:
                raise ValueError("rel_pos_size is required with use_rel_pos")
            # Zero init: the pretrained model had no rel-pos, so the bias starts neutral.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))
        self.rel_pos_bias_grid = tuple(rel_pos_bias_grid) if rel_pos_bias_grid else None
        if self.rel_pos_bias_grid:
            # BEiT/mmseg names; zero init as MAE fine-tuning (mmseg `MAEAttention`): starts as the plain ViT.
            wh, ww = self.rel_pos_bias_grid
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * wh - 1) * (2 * ww - 1) + 3, num_heads))
            # Derived from the grid, so not saved: state dicts hold only learned values.
            self.register_buffer("relative_position_index", beit_relative_position_index(self.rel_pos_bias_grid),
                                 persistent=False)

    def rel_pos_bias(self, hw: tuple[int, int], cls_token: bool) -> Tensor:
        """BEiT relative position bias (1, heads, [1+]N, [1+]N) for a query grid hw (the table is resized
        when hw is not the grid it was built for, e.g. the tiny CPU config or another crop size)."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        if tuple(hw) != self.rel_pos_bias_grid:
            table = resize_rel_pos_bias_table(table, self.rel_pos_bias_grid, hw)
            index = beit_relative_position_index(hw).to(table.device)
        n = index.shape[0]
        # (heads, n, n), contiguous; a row-wise index_select of the transposed table is the fastest gather here
        bias = table.t().contiguous().index_select(1, index.reshape(-1)).reshape(-1, n, n)
        if not cls_token:
            bias = bias[:, 1:, 1:]
        return bias.unsqueeze(0)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """x: tokens (B, N, C) or spatial (B, H, W, C); rel-pos needs the spatial layout. With the BEiT bias,
        tokens must be [cls +] an h x w grid: `hw` gives the grid (default: square)."""
        shape = x.shape
        b, c = shape[0], shape[-1]
        tokens = x.reshape(b, -1, c)
        qkv = self.qkv(tokens).reshape(b, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.rope_ref_grid:
            q, k = self._rope(q, k, x, hw)
        rel_pos = None
        if self.use_rel_pos:
            if x.ndim != 4:
                raise ValueError("relative position needs spatial (B, H, W, C) input")
            rel_pos = decomposed_rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (shape[1], shape[2]))
        bias = None
        if self.rel_pos_bias_grid:
            bias = self._rel_pos_bias_for(x, hw).to(q.dtype)
        out = attention(q, k, v, bias, rel_pos=rel_pos)
        out = out.transpose(1, 2).reshape(b, -1, c)
        return self.proj(out).reshape(shape)

    def _rope(self, q: Tensor, k: Tensor, x: Tensor, hw: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
        if x.ndim == 4:
            grid = (x.shape[1], x.shape[2])
        elif hw is None:
            raise BackboneError("rotary position embedding needs the patch grid (hw) of token-layout input "
                                "(it needs every patch, e.g. no MAE masking)")
        else:
            grid = tuple(hw)
        prefix = q.shape[2] - grid[0] * grid[1]
        if prefix < 0:
            raise BackboneError(f"rotary position embedding: {q.shape[2]} tokens are fewer than a "
                                f"{grid[0]}x{grid[1]} grid")
        sin, cos = rope_sin_cos(grid, self.rope_ref_grid, self.head_dim, device=q.device)
        return apply_rope(q, sin, cos, prefix), apply_rope(k, sin, cos, prefix)

    def _rel_pos_bias_for(self, x: Tensor, hw: tuple[int, int] | None) -> Tensor:
        if x.ndim == 4:
            return self.rel_pos_bias((x.shape[1], x.shape[2]), cls_token=False)
        n = x.shape[1]
        if hw is None:
            side = math.isqrt(n - 1)
            if side * side != n - 1:
                raise BackboneError(f"relative position bias: {n} tokens are not cls + a square grid; pass hw")
            hw = (side, side)
        if hw[0] * hw[1] + 1 != n:
            raise BackboneError(f"relative position bias: {n} tokens are not cls + a {hw[0]}x{hw[1]} grid "
                                "(it needs every patch, e.g. no MAE masking)")
        return self.rel_pos_bias(hw, cls_token=True)


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * num_windows, window, window, C), padding H and W up to multiples of window."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    hp, wp = padded_hw
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]].contiguous()


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, window_size: int = 0, use_rel_pos: bool = False,
                 rel_pos_size: tuple[int, int] | None = None, rel_pos_bias_grid: tuple[int, int] | None = None,
                 init_values: float | None = None, norm_eps: float = 1e-6, act_layer: str = "gelu",
                 mlp_layer: str = "mlp", scale_mlp: bool = False,
                 rope_ref_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos,
                              (window_size, window_size) if window_size > 0 else rel_pos_size,
                              rel_pos_bias_grid=(window_size, window_size) if rel_pos_bias_grid and window_size > 0
                              else rel_pos_bias_grid, rope_ref_grid=rope_ref_grid)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        if mlp_layer == "swiglu":
            self.mlp = SwiGLU(dim, hidden, scale_mlp, norm_eps)
        elif mlp_layer == "swiglu_packed":
            self.mlp = SwiGLUPacked(dim, hidden)
        else:
            self.mlp = Mlp(dim, hidden, act_layer_for(act_layer))
        self.init_values = init_values
        if init_values is not None:
            # Layer scale with BEiT/mmseg names (`gamma_1`, `gamma_2`), so their checkpoints map 1:1.
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """hw: the patch grid of a token-layout x (only the BEiT relative position bias needs it)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            grid = (x.shape[1], x.shape[2])
            x, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded_hw, grid)
        else:
            x = self.attn(x, hw)
        if self.init_values is not None:
            x = self.gamma_1 * x
        x = shortcut + self.drop_path(x)
        x2 = self.mlp(self.norm2(x))
        if self.init_values is not None:
            x2 = self.gamma_2 * x2
        return x + self.drop_path(x2)


def resize_abs_pos(pos_embed: Tensor, hw: tuple[int, int], num_prefix_tokens: int, *, antialias: bool) -> Tensor:
    """Patch part of a (1, P+S*S, C) absolute position table resized to grid `hw`: (1, H, W, C), bicubic with
    align_corners=False; the P prefix (cls) rows are left out. The one position-table resampler (forward time
    and checkpoint import).

    antialias=False, in the table's own dtype: the fine-tuning references -- MAE `util/pos_embed.py
    interpolate_pos_embed`, mmseg `MAE.resize_abs_pos_embed` / `VisionTransformer.resize_pos_embed`, detectron2
    `get_abs_pos` (ViTDet, at forward time). antialias=True, in float32: timm's `resample_abs_pos_embed`
    (its checkpoint filter's default), a few percent away from the others on a 224 -> 512 table.
    """
    grid = pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise BackboneError(f"position table with {grid.shape[1]} patch rows is not a square grid")
    grid = grid.reshape(1, side, side, -1)
    if (side, side) == tuple(hw):
        return grid
    channels_first = grid.permute(0, 3, 1, 2)
    if antialias:
        resized = F.interpolate(channels_first.float(), size=tuple(hw), mode="bicubic", align_corners=False,
                                antialias=True).to(grid.dtype)
    else:
        resized = F.interpolate(channels_first, size=tuple(hw), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class VisionTransformer(nn.Module):
    """Plain ViT (timm parameter names). See the module docstring for the options."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
        global_pool: str = "token",
        class_token: bool = True,
        final_norm: bool = True,
        window_size: int = 0,
        global_block_indexes: Sequence[int] = (),
        use_rel_pos: bool = False,
        rel_pos_input_size: int | None = None,
        use_rel_pos_bias: bool = False,
        init_values: float | None = None,
        grad_checkpointing: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        norm_eps: float = 1e-6,
        act_layer: str = "gelu",
        mlp_layer: str = "mlp",
        scale_mlp: bool = False,
        use_rot_pos_emb: bool = False,
        ref_feat_shape: int | tuple[int, int] | None = None,
        resample_patch_embed: bool = False,
    ) -> None:
        """
        img_size: size the absolute position table is built for (pretraining size); other sizes interpolate.
        global_pool: 'token' (cls token), 'avg' (mean of patch tokens, then `fc_norm` as in MAE fine-tuning)
            or '' (no pooling); used by `forward_head`.
        window_size / global_block_indexes: window attention in every block except the listed global ones.
        use_rel_pos / rel_pos_input_size: decomposed relative position; global blocks' tables are sized
            for `rel_pos_input_size` pixels (the dense-task input size), window blocks' for the window.
        use_rel_pos_bias: BEiT relative position bias, one zero-initialised table per block
            (`attn.relative_position_bias_table`, cls rows included) for the `img_size` grid (window blocks:
            the window), added to the attention logits; other grids resize it at run time.
        init_values: layer scale (`gamma_1`, `gamma_2` per block) starting at this value; None: none.
        Backbone families (names as timm's VisionTransformer / Eva arguments; all off by default):
        reg_tokens: DINOv2 register tokens (`reg_token`, after the cls token, no position embedding).
        pre_norm: LayerNorm `norm_pre` after the position embedding (CLIP's `ln_pre`).
        norm_eps: LayerNorm eps (CLIP 1e-5; the rest 1e-6).
        act_layer: MLP activation, 'gelu' | 'quick_gelu' (OpenAI CLIP) | 'gelu_tanh' | 'silu'.
        mlp_layer: 'mlp' | 'swiglu_packed' (DINOv2-g, mlp_ratio = fc1 width as timm) | 'swiglu' (EVA-02,
            `fc1_g`/`fc1_x`); scale_mlp: EVA-02's
            sub-LN inside the SwiGLU.
        use_rot_pos_emb / ref_feat_shape: EVA-02 2-D RoPE in every block, positions scaled to the pretraining
            grid `ref_feat_shape` (default img_size // patch_size).
        resample_patch_embed: checkpoint import may resample a patch kernel of another size to `patch_size`
            (`backbones.patch_resample`, FlexiViT); off: such a checkpoint is an error.
        LayerScale is `init_values` (timm's `ls1.gamma` is our `gamma_1`); BEiT's bias is `use_rel_pos_bias`.
        For BEiT / mmseg `MAE` segmentation fine-tuning set img_size to the crop size (512): the position
        table is then stored, and trained, at that grid, as theirs.
        """
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise BackboneError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if mlp_layer not in MLP_LAYERS:
            raise BackboneError(f"mlp_layer must be one of {', '.join(MLP_LAYERS)}, got {mlp_layer!r}")
        act_layer_for(act_layer)
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.global_pool = global_pool
        self.grad_checkpointing = grad_checkpointing
        self.window_size = window_size
        self.global_block_indexes = tuple(global_block_indexes)
        self.use_rel_pos_bias = use_rel_pos_bias
        self.init_values = init_values
        self.frozen_blocks = 0  # set by `freeze_blocks`
        self.resample_patch_embed = resample_patch_embed  # read by the checkpoint importer only

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        # num_prefix_tokens: the position table's leading rows (cls only; registers have no position, as in
        # DINOv2); num_leading_tokens: all tokens before the patches (timm calls this num_prefix_tokens).
        self.num_prefix_tokens = 1 if class_token else 0
        self.num_reg_tokens = int(reg_tokens)
        self.num_leading_tokens = self.num_prefix_tokens + self.num_reg_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + self.num_prefix_tokens, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        if use_rot_pos_emb:
            ref = ref_feat_shape or grid
            self.rope_ref_grid: tuple[int, int] | None = (ref, ref) if isinstance(ref, int) else tuple(ref)
        else:
            self.rope_ref_grid = None

        rel_grid = (rel_pos_input_size or img_size) // patch_size
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i],
                  window_size=0 if i in self.global_block_indexes else window_size,
                  use_rel_pos=use_rel_pos, rel_pos_size=(rel_grid, rel_grid),
                  rel_pos_bias_grid=(grid, grid) if use_rel_pos_bias else None, init_values=init_values,
                  norm_eps=norm_eps, act_layer=act_layer, mlp_layer=mlp_layer, scale_mlp=scale_mlp,
                  rope_ref_grid=self.rope_ref_grid)
            for i in range(depth)
        )
        use_fc_norm = global_pool == "avg"
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        # As in MAE: patch projection initialised like a linear layer (xavier on the flattened kernel).
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for block in self.blocks:
                if block.init_values is not None:
                    block.gamma_1.fill_(block.init_values)
                    block.gamma_2.fill_(block.init_values)
                if block.attn.rel_pos_bias_grid:
                    block.attn.relative_position_bias_table.zero_()

    # ------------------------------------------------------------------ partial fine-tuning
    def freeze_blocks(self, k: int) -> list[str]:
        """Freeze the first `k` blocks in place; returns the frozen parameter names.

        k > 0: patch embedding, cls/pos embedding and blocks 0..k-1 frozen; k == -1: the whole backbone
        except `head` (linear-probe style); k == 0: nothing. Frozen parameters get requires_grad=False (so
        LLRD param groups leave them out and autograd keeps no activations for them), and `train()` keeps
        the frozen modules in eval mode.
        """
        depth = len(self.blocks)
        if k < -1 or k > depth:
            raise BackboneError(f"freeze_blocks must be -1 (whole backbone), 0 or 1..{depth}, got {k}")
        if k == 0:
            return []
        if k == -1:
            names = [n for n, _ in self.named_parameters() if not n.startswith("head.")]
        else:
            prefixes = ("patch_embed.", "norm_pre.", *(f"blocks.{i}." for i in range(k)))
            names = [n for n, _ in self.named_parameters()
                     if n.startswith(prefixes) or n in ("cls_token", "pos_embed", "reg_token")]
        params = dict(self.named_parameters())
        for n in names:
            params[n].requires_grad_(False)
        self.frozen_blocks = k
        self.train(self.training)
        logger.info("freeze_blocks=%d: %d parameter tensors frozen", k, len(names))
        return names

    def frozen_modules(self) -> list[nn.Module]:
        """The modules `freeze_blocks` froze (empty when nothing is frozen)."""
        if self.frozen_blocks == -1:
            return [m for n, m in self.named_children() if n != "head"]
        return [self.patch_embed, self.norm_pre, *self.blocks[: self.frozen_blocks]] if self.frozen_blocks else []

    def train(self, mode: bool = True) -> VisionTransformer:
        super().train(mode)
        for module in self.frozen_modules():  # frozen parts: no drop path / dropout in training either
            module.train(False)
        return self

    # ------------------------------------------------------------------ blocks
    def _run_block(self, block: nn.Module, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, hw, use_reentrant=False)
        return block(x, hw)

    def run_blocks(self, x: Tensor, out_indices: Sequence[int] = (),
                   hook: Callable[[int, Tensor], None] | None = None, hw: tuple[int, int] | None = None) -> Tensor:
        """Run all blocks; `hook(i, x)` is called after every block whose index is in `out_indices`.
        hw: patch grid of a token-layout x (for the BEiT relative position bias; default square)."""
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x, hw)
            if hook is not None and i in out_indices:
                hook(i, x)
        return x

    # ------------------------------------------------------------------ token layout
    def abs_pos(self, hw: tuple[int, int]) -> Tensor:
        """The patch part of the position table at grid hw: (1, H, W, C), resized at run time as detectron2's
        `get_abs_pos` and mmseg's `resize_pos_embed` do (no antialias)."""
        return resize_abs_pos(self.pos_embed, hw, self.num_prefix_tokens, antialias=False)

    def embed_tokens(self, x: Tensor) -> Tensor:
        """Patches + (interpolated) abs pos, with the cls token [and registers] prepended: (B, [1+R+]N, C)."""
        x = self.patch_embed(x)
        b, h, w, c = x.shape
        x = (x + self.abs_pos((h, w))).reshape(b, h * w, c)
        if self.reg_token is not None:
            x = torch.cat([self.reg_token.expand(b, -1, -1), x], dim=1)
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
            x = torch.cat([cls, x], dim=1)
        return self.norm_pre(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised tokens (B, [1+]N, C), as timm's `forward_features`."""
        hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return self.norm(self.run_blocks(self.embed_tokens(x), hw=hw))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_leading_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ spatial layout (dense tasks)
    def forward_spatial(self, x: Tensor, out_indices: Sequence[int] | None = None) -> list[Tensor]:
        """Dense features without the cls token, as (B, C, H/p, W/p) maps.

        Returns the outputs of the blocks in `out_indices` (default: the last block only), taken
        before the final norm (as ViTDet and the mmseg MAE backbone do).
        """
        out_indices = (self.depth - 1,) if out_indices is None else tuple(out_indices)
        x = self.patch_embed(x)
        # Registers are left out here as the cls token is (ViTDet's spatial layout has patch tokens only).
        x = self.norm_pre(x + self.abs_pos((x.shape[1], x.shape[2])))
        outputs: list[Tensor] = []
        self.run_blocks(x, out_indices, hook=lambda i, feat: outputs.append(feat.permute(0, 3, 1, 2).contiguous()))
        return outputs


# name -> (embed_dim, depth, num_heads, patch_size); names follow timm.
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny_patch16_224": (192, 12, 3, 16),
    "vit_small_patch16_224": (384, 12, 6, 16),
    "vit_base_patch16_224": (768, 12, 12, 16),
    "vit_large_patch16_224": (1024, 24, 16, 16),
    "vit_huge_patch14_224": (1280, 32, 16, 14),
}


def vit_config(name: str) -> dict[str, Any]:
    """Architecture keyword arguments of a named ViT."""
    if name not in VIT_SIZES:
        raise BackboneError(f"unknown model name {name!r}; expected one of: {', '.join(VIT_SIZES)}")
    embed_dim, depth, num_heads, patch_size = VIT_SIZES[name]
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size)


def create_vit(name: str, **overrides: Any) -> VisionTransformer:
    """Build a named ViT (timm-style names), e.g. `create_vit("vit_base_patch16_224", drop_path_rate=0.1)`."""
    return VisionTransformer(**{**vit_config(name), **overrides})
