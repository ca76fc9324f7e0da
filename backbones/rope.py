"""2-D axial rotary position embedding (EVA-02's `VisionRotaryEmbeddingFast`, timm's `RotaryEmbeddingCat` with
in_pixels=False): half of each head's channels rotate with the row index, half with the column index.

Positions are the patch indices scaled onto the pretraining grid (`ref_grid`), so a 16x16-pretrained model
sees the same angle range on a 64x64 detection grid or in a 14x14 window, as EVA-02's detection code does.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rope_sin_cos(grid: tuple[int, int], ref_grid: tuple[int, int], head_dim: int, theta: float = 10000.0,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(sin, cos), each (h*w, head_dim), interleaved layout [f0, f0, f1, f1, ...] (rows' bands, then columns')."""
    bands_n = head_dim // 4
    bands = 1.0 / theta ** (torch.arange(bands_n, dtype=torch.float32, device=device) / bands_n)
    axes = [torch.arange(n, dtype=torch.float32, device=device) * (ref / n)
            for n, ref in zip(grid, ref_grid, strict=True)]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (h, w, 2)
    angles = (coords[..., None] * bands).flatten(-2).flatten(0, 1)  # (h*w, 2*bands_n)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.sin(), angles.cos()


def rotate_pairs(x: Tensor) -> Tensor:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor, num_prefix: int = 0) -> Tensor:
    """Rotate the last h*w tokens of x (..., N, head_dim); the `num_prefix` leading (cls/register) tokens stay."""
    if num_prefix:
        head, tail = x[..., :num_prefix, :], x[..., num_prefix:, :]
        return torch.cat([head, (tail * cos + rotate_pairs(tail) * sin).to(x.dtype)], dim=-2)
    return (x * cos + rotate_pairs(x) * sin).to(x.dtype)
