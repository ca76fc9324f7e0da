"""Masked Autoencoder (He et al., 2021) around the project's one ViT.

The encoder is `backbones.vit.VisionTransformer` and sees only the visible patches (plus the cls
token); a light decoder fills in a shared mask token at the masked positions and predicts the pixels of
every patch; the loss is the MSE on masked patches only, against per-patch normalised pixels by default.
Both encoder and decoder use fixed 2-D sin-cos position tables.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from backbones.vit import Block, LayerNorm, VisionTransformer, create_vit
from mae_transfer.errors import MaeTransferError
from mae_transfer.pos_embed import sincos_2d

MASKING_STRATEGIES = ("random", "block", "grid")


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), patches in row-major order, pixels as (p, p, 3)."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    x = imgs.reshape(b, c, gh, patch_size, gw, patch_size)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """Inverse of `patchify`."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch_size, patch_size, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, gh * patch_size, gw * patch_size)


def masking_noise(batch: int, grid: tuple[int, int], mask_ratio: float, strategy: str,
                  device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """Per-patch noise whose argsort puts kept patches first (small noise = keep).

    random: uniform noise (the paper's default). block: BEiT-style rectangles are marked masked until
    the ratio is reached. grid: keep one patch in every 2x2 cell (ratio 0.75 only).
    """
    gh, gw = grid
    num = gh * gw
    uniform = torch.rand(batch, num, device=device, generator=generator)
    if strategy == "random":
        return uniform
    if strategy == "grid":
        if abs(mask_ratio - 0.75) > 1e-6:
            raise MaeTransferError(f"grid masking keeps 1 of every 2x2 patches (ratio 0.75), "
                                   f"got mask_ratio={mask_ratio}")
        rows = torch.arange(gh, device=device)[:, None] % 2
        cols = torch.arange(gw, device=device)[None, :] % 2
        masked = ((rows + cols) > 0).reshape(1, num).float()
        return masked + 0.5 * uniform  # kept patches (0 + <0.5) sort before masked ones (1 + <0.5)
    if strategy == "block":
        # Rectangles are drawn on the CPU (a handful of scalars per sample) from a CPU generator seeded
        # by the caller's generator, so a CUDA generator works and runs stay reproducible.
        seed = int(torch.randint(0, 2 ** 62, (1,), device=uniform.device, generator=generator))
        cpu_gen = torch.Generator().manual_seed(seed)
        target = int(num * mask_ratio)
        masked = torch.zeros(batch, gh, gw)
        for i in range(batch):
            while masked[i].sum() < target:
                area = int(torch.randint(16, max(17, target // 2), (1,), generator=cpu_gen))
                aspect = math.exp(float(torch.empty(1).uniform_(math.log(0.3), math.log(1 / 0.3), generator=cpu_gen)))
                h = max(1, min(gh, round((area * aspect) ** 0.5)))
                w = max(1, min(gw, round((area / aspect) ** 0.5)))
                top = int(torch.randint(0, gh - h + 1, (1,), generator=cpu_gen))
                left = int(torch.randint(0, gw - w + 1, (1,), generator=cpu_gen))
                masked[i, top:top + h, left:left + w] = 1
        # Over-shoot is fine: argsort keeps exactly (1 - ratio) of the patches, unmasked ones first.
        return masked.reshape(batch, num).to(uniform.device) + 0.5 * uniform
    raise MaeTransferError(f"unknown masking strategy {strategy!r}; expected one of {MASKING_STRATEGIES}")


def take_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Per sample, the tokens of x (B, N, C) at the positions ids (B, K), in that order: (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the (1 - ratio) patches with the smallest noise, per sample, by shuffle/unshuffle.

    Returns the kept tokens (B, K, C), the binary mask (B, N; 1 = masked) in the original order, and
    `ids_restore` that unshuffles a [kept, masked] sequence back to the original order.
    """
    b, n = x.shape[:2]
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_kept = take_tokens(x, ids_keep)
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


class MaskedAutoencoder(nn.Module):
    """MAE: `forward(imgs, noise=None) -> (loss, pred, mask)` as in the official implementation."""

    def __init__(
        self,
        encoder: VisionTransformer | str = "vit_base_patch16_224",
        img_size: int = 224,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        masking: str = "random",
        norm_pix_loss: bool = True,
        encoder_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if masking not in MASKING_STRATEGIES:
            raise MaeTransferError(f"unknown masking strategy {masking!r}; expected one of {MASKING_STRATEGIES}")
        if not 0.0 < mask_ratio < 1.0:
            raise MaeTransferError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if isinstance(encoder, str):
            encoder = create_vit(encoder, img_size=img_size, **(encoder_overrides or {}))
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.masking = masking
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_size
        grid = encoder.img_size // encoder.patch_size
        self.grid = (grid, grid)
        dim = encoder.embed_dim

        # Fixed sin-cos position tables (not learned), as in the paper.
        encoder.pos_embed.requires_grad_(False)
        encoder.pos_embed.data.copy_(sincos_2d(dim, grid, cls_token=True))

        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim, grid, cls_token=True), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * 3)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------
    def make_noise(self, batch: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> Tensor:
        return masking_noise(batch, self.grid, self.mask_ratio, self.masking, device, generator)

    def forward_encoder(self, imgs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.encoder
        # The patch embedding is one linear map per patch, so masking the pixels first and embedding only the
        # visible quarter gives the tokens the official embed-then-mask order gives, for a quarter of the work.
        pixels, mask, ids_restore = random_masking(patchify(imgs, self.patch_size), self.mask_ratio, noise)
        ids_keep = torch.argsort(ids_restore, dim=1)[:, : pixels.shape[1]]  # the inverse permutation's head
        pos = take_tokens(enc.pos_embed[:, 1:].expand(imgs.shape[0], -1, -1), ids_keep)
        x = enc.patch_embed.embed_patches(pixels) + pos
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.run_blocks(torch.cat([cls, x], dim=1))
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [kept, masked], shuffled order
        patches = take_tokens(patches, ids_restore)
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = self.encoder._run_block(block, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def pixel_target(self, imgs: Tensor) -> Tensor:
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        per_patch = ((pred - self.pixel_target(imgs)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if imgs.shape[-1] != self.encoder.img_size or imgs.shape[-2] != self.encoder.img_size:
            raise MaeTransferError(
                f"MAE expects {self.encoder.img_size}x{self.encoder.img_size} images, got {tuple(imgs.shape[-2:])}"
            )
        if noise is None:
            noise = self.make_noise(imgs.shape[0], imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruct(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(masked input, reconstruction with visible patches pasted) in image space, for pictures."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        m = mask.unsqueeze(-1)
        masked = unpatchify(target * (1 - m), self.patch_size, self.grid)
        pasted = unpatchify(target * (1 - m) + pred * m, self.patch_size, self.grid)
        return masked, pasted
