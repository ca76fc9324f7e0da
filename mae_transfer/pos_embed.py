"""Fixed 2-D sin-cos position tables (MAE uses them in encoder and decoder)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): half sin, half cos, frequencies 1/10000^(2i/D)."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> Tensor:
    """(1, [1+]grid*grid, embed_dim) table; half the channels encode the row, half the column.

    Same layout as the official MAE `get_2d_sincos_pos_embed` (first half from the w coordinate grid,
    second from h), with a zero row for the cls token.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos 2-D position embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # meshgrid(w, h): w varies along columns
    table = np.concatenate([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)
