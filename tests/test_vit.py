"""Our ViT against timm's VisionTransformer (same weights, same outputs) and its own options."""
from __future__ import annotations

import pytest
import timm
import torch

from backbones.errors import BackboneError
from backbones.vit import VisionTransformer, create_vit, vit_config

SMALL = dict(embed_dim=96, depth=3, num_heads=3, patch_size=16)


def timm_twin(model: VisionTransformer, **kwargs) -> torch.nn.Module:
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim, depth=model.depth,
        num_heads=model.num_heads, **kwargs)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    return ref.eval()


@pytest.mark.parametrize("global_pool,num_classes", [("token", 10), ("avg", 10), ("token", 0)])
def test_matches_timm_vision_transformer(global_pool: str, num_classes: int) -> None:
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=64, global_pool=global_pool, num_classes=num_classes, **SMALL).eval()
    for p in ours.parameters():  # non-trivial values everywhere (LayerNorms and biases too)
        p.data.normal_(0, 0.05).add_(torch.rand(()) * 0.1)
    ref = timm_twin(ours, global_pool=global_pool, num_classes=num_classes,
                    fc_norm=global_pool == "avg")
    assert set(ours.state_dict()) == set(ref.state_dict())  # timm names load with no renaming
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max() <= 1e-5
        assert (ours(x) - ref(x)).abs().max() <= 1e-5


def test_matches_timm_at_other_input_size_with_dynamic_img_size() -> None:
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=64, **SMALL).eval()
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=96, depth=3, num_heads=3, dynamic_img_size=True,
        num_classes=0)
    ref.load_state_dict(ours.state_dict(), strict=False)
    ref.eval()
    x = torch.randn(1, 3, 96, 128)  # non-square grid: 6 x 8
    with torch.no_grad():
        # timm resamples with antialias; upsampling is where the two agree only approximately
        diff = (ours.forward_features(x) - ref.forward_features(x)).abs().max()
    assert diff < 5e-2
    assert ours.forward_features(x).shape == (1, 1 + 6 * 8, 96)


def test_timm_names_and_shapes_for_named_sizes() -> None:
    for name in ["vit_tiny_patch16_224", "vit_base_patch16_224"]:
        ours = create_vit(name)
        ref = timm.create_model(name, pretrained=False, num_classes=0)
        ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
        assert set(ours_sd) == set(ref_sd)
        assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert vit_config("vit_huge_patch14_224") == dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14)
    with pytest.raises(BackboneError, match="unknown model name 'vit_gigantic'"):
        create_vit("vit_gigantic")


def test_spatial_outputs_match_token_path() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, final_norm=False, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_spatial(x, out_indices=(0, 2))
        # without a cls token the spatial path must equal the token path's patch tokens
        model.cls_token = None
        model.pos_embed.data = model.pos_embed.data[:, 1:]
        model.num_prefix_tokens = 0
        tokens = model.forward_features(x)
    assert [f.shape for f in feats] == [(2, 96, 4, 4)] * 2
    assert torch.allclose(feats[-1].flatten(2).transpose(1, 2), tokens, atol=1e-5)


def test_windowed_model_with_rel_pos_runs_at_any_size_and_backpropagates() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, window_size=3, global_block_indexes=(1,), use_rel_pos=True,
                              rel_pos_input_size=128, drop_path_rate=0.1, **SMALL)
    assert model.blocks[0].attn.rel_pos_h.shape == (5, 32)   # window 3 -> 2*3-1
    assert model.blocks[1].attn.rel_pos_h.shape == (15, 32)  # global at 128 px -> 2*8-1
    out = model.forward_spatial(torch.randn(1, 3, 112, 80))  # 7 x 5 grid: windows need padding
    assert out[0].shape == (1, 96, 7, 5)
    out[0].sum().backward()
    assert model.blocks[0].attn.rel_pos_h.grad is not None


def test_activation_checkpointing_gives_identical_gradients() -> None:
    torch.manual_seed(0)
    plain = VisionTransformer(img_size=64, num_classes=5, **SMALL)
    ckpt = VisionTransformer(img_size=64, num_classes=5, grad_checkpointing=True, **SMALL)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_drop_path_is_stochastic_in_train_and_off_in_eval() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, drop_path_rate=0.5, **SMALL)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    assert not torch.allclose(model.forward_features(x), model.forward_features(x))
    model.eval()
    assert torch.equal(model.forward_features(x), model.forward_features(x))


def test_bad_input_size_is_a_clear_error() -> None:
    model = VisionTransformer(img_size=64, **SMALL)
    with pytest.raises(BackboneError, match="not divisible by the patch size 16"):
        model(torch.randn(1, 3, 60, 64))


def test_bf16_cpu_training_matches_timm_non_fused_attention() -> None:
    """Under CPU bf16 autocast, training uses the explicit matmul-softmax-matmul (faster than SDPA's flash
    backward there): it must be the computation timm runs with fused attention off, forward and backward."""
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=64, num_classes=10, **SMALL)
    for p in ours.parameters():
        p.data.normal_(0, 0.05).add_(torch.rand(()) * 0.1)
    ref = timm_twin(ours, num_classes=10)
    for module in ref.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x = torch.randn(2, 3, 64, 64)
    for model in (ours, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
    torch.testing.assert_close(ours.head.weight.grad, ref.head.weight.grad, rtol=1e-2, atol=1e-3)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ref.get_parameter(name).grad, rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.parametrize("tokens,with_bias", [(197, False), (50, False), (196, True)])
def test_bf16_cpu_training_attention_is_about_as_accurate_as_sdpa(tokens: int, with_bias: bool) -> None:
    from backbones.kernels import attention

    torch.manual_seed(0)
    shape = (4, 6, tokens, 32)
    q, k, v = (torch.randn(shape) * 1.5 for _ in range(3))
    bias = torch.randn(4, 6, tokens, tokens) if with_bias else None
    grad = torch.randn(shape)

    def run(fn, dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, None if bias is None else bias.to(dtype))
        out.backward(grad.to(dtype))
        return [out.float()] + [t.grad.float() for t in inputs]

    sdpa = lambda q, k, v, b: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=b)  # noqa: E731
    reference = run(sdpa, torch.float32)
    # bf16 logits (the matmul's output dtype under autocast; detectron2's ViTDet attention and timm's non-fused
    # path round them the same way) cost some accuracy next to the flash kernel's fp32 tiles: the relative
    # error stays a few bf16 units (2^-8), within a small factor of SDPA's own.
    for ours, theirs, exact in zip(run(attention, torch.bfloat16), run(sdpa, torch.bfloat16), reference, strict=True):
        error = ((ours - exact).norm() / exact.norm()).item()
        sdpa_error = ((theirs - exact).norm() / exact.norm()).item()
        assert error < 3 * sdpa_error and error < 1.5e-2, (error, sdpa_error)
    with torch.no_grad():  # inference keeps SDPA
        args = [t.bfloat16() for t in (q, k, v)]
        torch.testing.assert_close(attention(*args), sdpa(*args, None), rtol=0, atol=0)


def test_beit_options_off_by_default_and_neutral_at_init() -> None:
    """Layer scale and the BEiT relative position bias are opt-in (pretraining / ViTDet keys unchanged); at
    init (gamma 1.0, zero tables) they compute exactly the plain ViT."""
    cfg = dict(img_size=64, embed_dim=48, depth=2, num_heads=3)
    plain = VisionTransformer(**cfg).eval()
    assert not any("gamma" in k or "relative_position" in k for k in plain.state_dict())
    beit = VisionTransformer(**cfg, use_rel_pos_bias=True, init_values=1.0).eval()
    extra = set(beit.state_dict()) - set(plain.state_dict())
    assert extra == {f"blocks.{i}.{n}" for i in range(2)
                     for n in ("gamma_1", "gamma_2", "attn.relative_position_bias_table")}
    assert beit.blocks[0].attn.relative_position_bias_table.shape == (7 * 7 + 3, 3)
    beit.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(beit.forward_features(x), plain.forward_features(x), atol=1e-6, rtol=0)


def test_beit_rel_pos_bias_is_trained_and_resized_at_other_grids() -> None:
    model = VisionTransformer(img_size=64, embed_dim=48, depth=2, num_heads=3, use_rel_pos_bias=True,
                              init_values=0.1, grad_checkpointing=True)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.relative_position_bias_table.normal_()
    model.train()
    model.forward_features(torch.randn(2, 3, 48, 80)).sum().backward()  # 3x5 grid: table resized in forward
    for block in model.blocks:
        assert block.attn.relative_position_bias_table.grad.abs().sum() > 0
        assert block.gamma_1.grad.abs().sum() > 0 and block.gamma_2.grad.abs().sum() > 0
    with pytest.raises(BackboneError, match="not cls"):
        model.blocks[0].attn(torch.randn(1, 7, 48))  # masked tokens (MAE) have no grid for the bias


@pytest.mark.parametrize("bias_shape", [(1, 3, 9, 9), (2, 3, 9, 9), (1, 1, 9, 9)])
@pytest.mark.parametrize("block", [None, 20])
def test_learned_bias_attention_kernel_gradients(bias_shape, block, monkeypatch) -> None:
    """`BiasedAttention` (flash forward, separate bias gradient) passes gradcheck, broadcast over batch/heads,
    with all heads in one block and with blocks of a few query rows of one head."""
    from backbones import kernels
    from backbones.kernels import BiasedAttention

    if block:
        monkeypatch.setattr(kernels, "BIAS_GRAD_CHUNK", block)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    bias = torch.randn(*bias_shape, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(BiasedAttention.apply, (q, k, v, bias), fast_mode=True)


def test_learned_bias_attention_dispatch_matches_explicit_attention() -> None:
    """fp32 CPU training with a bias that needs gradients goes through `BiasedAttention` and equals the
    explicit softmax(q k^T / sqrt(d) + bias) v in value and in every gradient (q, k, v from a strided qkv)."""
    from backbones.kernels import attention

    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 65, 3, 4, 16, generator=g).requires_grad_()
    bias = torch.randn(1, 4, 65, 65, generator=g).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q, k, v, bias)
    assert type(out.grad_fn).__name__ == "BiasedAttentionBackward"
    ref = ((q * 16 ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1) @ v
    grad = torch.randn(out.shape, generator=g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads, ref_grads = torch.autograd.grad(out, (qkv, bias), grad), torch.autograd.grad(ref, (qkv, bias), grad)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
