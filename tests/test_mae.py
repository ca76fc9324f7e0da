"""MAE model: loss/reconstruction parity with HF `ViTMAEForPreTraining`, masking, sin-cos tables."""
from __future__ import annotations

import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

from mae_transfer.errors import MaeTransferError
from mae_transfer.mae import MaskedAutoencoder, masking_noise, patchify, random_masking, unpatchify
from mae_transfer.pos_embed import sincos_2d


def tiny_mae(**kwargs) -> MaskedAutoencoder:
    args = dict(encoder="vit_tiny_patch16_224", img_size=64, decoder_embed_dim=64, decoder_depth=2,
                decoder_num_heads=4, encoder_overrides=dict(depth=2))
    return MaskedAutoencoder(**{**args, **kwargs})


def hf_twin(mae: MaskedAutoencoder) -> ViTMAEForPreTraining:
    """An HF ViTMAEForPreTraining with the same architecture and weights (transformers 5.x key names)."""
    enc = mae.encoder
    config = ViTMAEConfig(
        hidden_size=enc.embed_dim, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
        intermediate_size=enc.embed_dim * 4, image_size=enc.img_size, patch_size=enc.patch_size,
        decoder_hidden_size=mae.decoder_embed.out_features, decoder_num_hidden_layers=len(mae.decoder_blocks),
        decoder_num_attention_heads=mae.decoder_blocks[0].attn.num_heads,
        decoder_intermediate_size=mae.decoder_embed.out_features * 4, mask_ratio=mae.mask_ratio,
        norm_pix_loss=mae.norm_pix_loss, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    hf = ViTMAEForPreTraining(config).eval()

    def block(dst: str, src: str, sd: dict) -> dict:
        qw, kw, vw = sd[f"{src}.attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[f"{src}.attn.qkv.bias"].chunk(3)
        return {
            f"{dst}.attention.q_proj.weight": qw, f"{dst}.attention.q_proj.bias": qb,
            f"{dst}.attention.k_proj.weight": kw, f"{dst}.attention.k_proj.bias": kb,
            f"{dst}.attention.v_proj.weight": vw, f"{dst}.attention.v_proj.bias": vb,
            f"{dst}.attention.o_proj.weight": sd[f"{src}.attn.proj.weight"],
            f"{dst}.attention.o_proj.bias": sd[f"{src}.attn.proj.bias"],
            **{f"{dst}.layernorm_before.{p}": sd[f"{src}.norm1.{p}"] for p in ("weight", "bias")},
            **{f"{dst}.layernorm_after.{p}": sd[f"{src}.norm2.{p}"] for p in ("weight", "bias")},
            **{f"{dst}.mlp.{fc}.{p}": sd[f"{src}.mlp.{fc}.{p}"] for fc in ("fc1", "fc2") for p in ("weight", "bias")},
        }

    sd = mae.state_dict()
    mapped = {
        "vit.embeddings.cls_token": sd["encoder.cls_token"],
        "vit.embeddings.position_embeddings": sd["encoder.pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["encoder.patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["encoder.patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["encoder.norm.weight"], "vit.layernorm.bias": sd["encoder.norm.bias"],
        "decoder.mask_token": sd["mask_token"], "decoder.decoder_pos_embed": sd["decoder_pos_embed"],
    }
    for i in range(enc.depth):
        mapped.update(block(f"vit.layers.{i}", f"encoder.blocks.{i}", sd))
    for i in range(len(mae.decoder_blocks)):
        mapped.update(block(f"decoder.decoder_layers.{i}", f"decoder_blocks.{i}", sd))
    for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
        for p in ("weight", "bias"):
            mapped[f"decoder.{name}.{p}"] = sd[f"{name}.{p}"]
    hf.load_state_dict(mapped, strict=True)
    return hf


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_and_reconstruction_match_hf_vitmae(norm_pix_loss: bool) -> None:
    torch.manual_seed(0)
    mae = tiny_mae(norm_pix_loss=norm_pix_loss).eval()
    hf = hf_twin(mae)
    imgs = torch.randn(3, 3, 64, 64)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        loss, pred, mask = mae(imgs, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    assert (pred - out.logits).abs().max() <= 1e-5
    assert abs(loss.item() - out.loss.item()) <= 1e-5


def official_layout_sincos(dim: int, grid: int) -> torch.Tensor:
    """Patch (row i, col j) -> [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-k/(dim/4)):
    the official MAE layout (column coordinate first), written out patch by patch."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = [torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
            for i in range(grid) for j in range(grid)]
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.stack(rows)]).float()


def test_sincos_tables_match_reference() -> None:
    for dim, grid in [(64, 4), (768, 14), (512, 14)]:
        ours = sincos_2d(dim, grid, cls_token=True)[0]
        assert torch.allclose(ours, official_layout_sincos(dim, grid), atol=1e-6)
        # transformers 5.x builds the same table with the row coordinate first: same values, halves swapped
        hf = build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
        assert torch.allclose(torch.cat([ours[:, dim // 2:], ours[:, :dim // 2]], 1), hf.float(), atol=1e-6)
    mae = tiny_mae()
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad


def test_random_masking_keeps_the_lowest_noise_patches_and_unshuffles() -> None:
    x = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4], [0.0, 1, 2, 3, 4, 5, 6, 7]])
    kept, mask, ids_restore = random_masking(x, 0.75, noise)
    assert kept[0, :, 0].tolist() == [1.0, 3.0] and kept[1, :, 0].tolist() == [8.0, 9.0]
    assert mask[0].tolist() == [1, 0, 1, 0, 1, 1, 1, 1]
    shuffled = torch.gather(x, 1, torch.argsort(noise, 1).unsqueeze(-1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1)), x)


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_masking_strategies_mask_the_requested_ratio(strategy: str) -> None:
    torch.manual_seed(0)
    mae = tiny_mae(masking=strategy, img_size=128)
    loss, pred, mask = mae(torch.randn(2, 3, 128, 128))
    assert mask.shape == (2, 64) and torch.all(mask.sum(1) == 48)
    assert torch.isfinite(loss) and pred.shape == (2, 64, 16 * 16 * 3)
    if strategy == "grid":  # one kept patch in each 2x2 cell, always the same one
        kept = (mask[0] == 0).reshape(8, 8)
        assert kept[::2, ::2].all() and kept.sum() == 16
    if strategy == "block":  # masked patches form blocks: most masked patches have a masked neighbour
        grid = mask[0].reshape(8, 8)
        neighbours = torch.zeros_like(grid)
        neighbours[1:] += grid[:-1]
        neighbours[:-1] += grid[1:]
        assert (neighbours[grid == 1] > 0).float().mean() > 0.9


def test_masking_noise_rejects_bad_arguments() -> None:
    with pytest.raises(MaeTransferError, match="grid masking"):
        masking_noise(1, (4, 4), 0.5, "grid")
    with pytest.raises(MaeTransferError, match="unknown masking strategy"):
        tiny_mae(masking="checkerboard")
    with pytest.raises(MaeTransferError, match="expects 64x64 images"):
        tiny_mae()(torch.randn(1, 3, 96, 96))


def test_patchify_roundtrip_and_reconstruction_pastes_visible_patches() -> None:
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)
    assert torch.equal(unpatchify(patchify(imgs, 16), 16, (4, 4)), imgs)
    mae = tiny_mae().eval()
    with torch.no_grad():
        _, pred, mask = mae(imgs)
        masked, pasted = mae.reconstruct(imgs, pred, mask)
    visible = (1 - mask).reshape(2, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1)
    assert torch.allclose(pasted * visible, imgs * visible, atol=1e-5)
    assert torch.equal(masked * (1 - visible), torch.zeros_like(masked))


def test_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    mae = tiny_mae(norm_pix_loss=False)  # (norm-pix learning on real photos: tests/test_pretrain.py)
    # smooth images (upsampled 8x8 noise): the masked patches are predictable from the visible ones
    imgs = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), size=64, mode="bilinear")
    noise = mae.make_noise(4)
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(20):
        loss, _, _ = mae(imgs, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
