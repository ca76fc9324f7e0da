"""Attention kernels, behind one dispatch function: `attention`.

Four paths compute the same softmax(q k^T / sqrt(d) + bias) v:
  - SDPA (`F.scaled_dot_product_attention`): the default, on every device and dtype.
  - `BiasedAttention`, CPU fp32 training with a bias that needs gradients (the BEiT relative position bias):
    SDPA's CPU flash kernels take such a bias but return no gradient for it, so SDPA would fall back to its
    math path; this kernel runs the flash forward and its own backward, which also gives the bias gradient.
  - `ChunkedRelPosAttention`, CPU global attention with decomposed rel-pos at >= CHUNKED_ATTENTION_MIN_TOKENS:
    SDPA's CPU kernels take no bias that needs gradients, so it would fall back to its math path and store
    every (heads, N, N) tensor; this kernel keeps nothing of size N x N between forward and backward.
  - The explicit matmul-softmax-matmul, CPU bf16 training at <= EXPLICIT_BF16_ATTENTION_MAX_TOKENS: SDPA's
    CPU flash backward is slow in bf16, while the explicit form's GEMMs run on the bf16 matrix units.
Measurements behind each choice: benchmarks/README.md, "Why the CPU kernels exist".
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNKED_ATTENTION_MIN_TOKENS = 1024  # below this (window blocks, 224-px models) SDPA's batched kernels win
CHUNK_QUERIES = 1024  # query rows per chunk: 1024 x 4096 fp32 logits = 16 MB, stays in the CPU cache
BIAS_GRAD_CHUNK = 1 << 21  # logits per block of BiasedAttention's backward (8 MB fp32): 1025 tokens in one block
EXPLICIT_BF16_ATTENTION_MAX_TOKENS = 256  # stored (heads, N, N) bf16 probabilities: a few MB per layer


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, *,
              rel_pos: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for q, k, v: (B, heads, N, d).

    rel_pos: the two decomposed relative-position terms (B, heads, h, w, h_k) and (B, heads, h, w, w_k)
    of a query grid h x w = N (ViTDet / MViTv2), added to the logits as rel_h[..., :, None] + rel_w[..., None, :].
    """
    if rel_pos is not None:
        rel_h, rel_w = rel_pos
        h, w = rel_h.shape[2], rel_h.shape[3]
        if bias is None and q.device.type == "cpu" and h * w >= CHUNKED_ATTENTION_MIN_TOKENS:
            return ChunkedRelPosAttention.apply(q, k, v, rel_h, rel_w, q.shape[-1] ** -0.5)
        rel_bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(q.shape[0], q.shape[1], h * w, -1)
        bias = rel_bias if bias is None else bias + rel_bias
    elif (bias is not None and bias.requires_grad and torch.is_grad_enabled() and q.device.type == "cpu"
          and q.dtype == torch.float32 and bias.dtype == torch.float32 and bias.dim() == 4):
        return BiasedAttention.apply(q, k, v, bias)
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad
            and max(q.shape[-2], k.shape[-2]) <= EXPLICIT_BF16_ATTENTION_MAX_TOKENS):
        # As timm's non-fused attention computes it (bf16 logits under autocast, as detectron2's ViTDet).
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _row_chunks(h: int, w: int) -> list[tuple[int, int]]:
    rows = max(1, CHUNK_QUERIES // w)  # whole rows of the query grid, so rel_h / rel_w slice cleanly
    return [(r, min(r + rows, h)) for r in range(0, h, rows)]


def _chunk_probs(q: Tensor, k: Tensor, rel_h: Tensor, rel_w: Tensor, buf: Tensor, w: int) -> Tensor:
    """softmax(q k^T + rel_h + rel_w) for one chunk of query rows, in `buf` (queries, keys)."""
    torch.mm(q, k.t(), out=buf)
    rows, kh, kw = rel_h.shape[0], rel_h.shape[-1], rel_w.shape[-1]
    logits = buf.view(rows, w, kh, kw)
    logits.add_(rel_h[..., None]).add_(rel_w[..., None, :])
    return torch.softmax(buf, -1, out=buf)


class ChunkedRelPosAttention(torch.autograd.Function):
    """softmax(scale * q k^T + rel_h[..., :, None] + rel_w[..., None, :]) v, walking (head, block of query rows)
    chunks whose logits stay in the CPU cache; the rel-pos terms are added in place and the probabilities are
    recomputed in backward instead of stored (as flash attention does).
    q, k, v: (B, heads, N, d) with N = h * w; rel_h: (B, heads, h, w, h_k); rel_w: (B, heads, h, w, w_k)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> Tensor:
        b, n, length, d = q.shape
        h, w = rel_h.shape[2], rel_h.shape[3]
        qs = (q * scale).reshape(b * n, length, d)
        kf, vf = k.reshape(b * n, -1, d), v.reshape(b * n, -1, d)
        rh, rw = rel_h.reshape(b * n, h, w, -1), rel_w.reshape(b * n, h, w, -1)
        out = torch.empty_like(qs)
        buf = qs.new_empty(min(length, max(1, CHUNK_QUERIES // w) * w), kf.shape[1])
        for i in range(b * n):
            for r0, r1 in _row_chunks(h, w):
                rows = slice(r0 * w, r1 * w)
                probs = _chunk_probs(qs[i, rows], kf[i], rh[i, r0:r1], rw[i, r0:r1], buf[: (r1 - r0) * w], w)
                torch.mm(probs, vf[i], out=out[i, rows])
        ctx.save_for_backward(qs, kf, vf, rh, rw, out)
        ctx.scale, ctx.shapes = scale, (q.shape, rel_h.shape, rel_w.shape)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qs, kf, vf, rh, rw, out = ctx.saved_tensors
        q_shape, rh_shape, rw_shape = ctx.shapes
        h, w = rh.shape[1], rh.shape[2]
        go = grad_out.reshape(out.shape)
        delta = (go * out).sum(-1)  # softmax backward: dS = P * (dP - rowsum(dO * O))
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(kf), torch.zeros_like(vf)
        drh, drw = torch.empty_like(rh), torch.empty_like(rw)
        size = min(qs.shape[1], max(1, CHUNK_QUERIES // w) * w)
        buf, dbuf = qs.new_empty(size, kf.shape[1]), qs.new_empty(size, kf.shape[1])
        for i in range(qs.shape[0]):
            for r0, r1 in _row_chunks(h, w):
                rows, m = slice(r0 * w, r1 * w), (r1 - r0) * w
                probs = _chunk_probs(qs[i, rows], kf[i], rh[i, r0:r1], rw[i, r0:r1], buf[:m], w)
                dv[i].addmm_(probs.t(), go[i, rows])
                ds = torch.mm(go[i, rows], vf[i].t(), out=dbuf[:m])
                ds.sub_(delta[i, rows, None]).mul_(probs)
                grid = ds.view(r1 - r0, w, rh.shape[-1], rw.shape[-1])
                torch.sum(grid, -1, out=drh[i, r0:r1])
                torch.sum(grid, -2, out=drw[i, r0:r1])
                torch.mm(ds, kf[i], out=dq[i, rows])
                dk[i].addmm_(ds.t(), qs[i, rows])
        dq.mul_(ctx.scale)  # logits used q * scale
        return (dq.view(q_shape), dk.view(q_shape), dv.view(q_shape), drh.view(rh_shape), drw.view(rw_shape), None)


class BiasedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + bias) v on CPU for a bias that needs gradients, e.g. BEiT's learned relative
    position bias. q, k, v: (B, heads, N, d); bias: (1 or B, 1 or heads, N, N_k), broadcast over the batch.

    Forward is SDPA's CPU flash kernel (the bias goes in as its float mask), so no (heads, N, N) tensor is kept
    for backward. Backward recomputes the probabilities per (head, image, block of query rows) from the
    forward's logsumexp and gets every gradient from them, the bias's being dS = P * (dP - rowsum(dO * O)).
    Both subtractions are folded into the GEMMs (q gets a column -logsumexp against a column of ones in k, dO
    a column -rowsum(dO * O) against ones in v). The heads are split between threads that each run
    single-threaded GEMMs: one thread per core, no synchronisation between the many small operations, which
    keeps this fast also when other processes share the cores (see benchmarks/README.md)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        bias = bias.contiguous()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, out, lse = ctx.saved_tensors
        b, heads, n, d = q.shape
        nk = k.shape[2]
        ones = q.new_ones(b, heads, nk, 1)
        q_lse = torch.cat([q * d ** -0.5, -lse.unsqueeze(-1)], -1)  # (q k^T) / sqrt(d) - lse in one GEMM
        k_one = torch.cat([k, ones], -1)
        go_delta = torch.cat([grad_out, -(grad_out * out).sum(-1, keepdim=True)], -1)  # dP - rowsum(dO * O)
        v_one = torch.cat([v, ones], -1)
        dq, dk, dv = q.new_empty(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
        dbias = q.new_zeros(bias.shape[0], heads, n, nk)  # per head: each head is one thread's alone
        rows = max(1, BIAS_GRAD_CHUNK // nk)

        @torch.no_grad()  # grad mode is per thread
        def heads_backward(head_ids: range) -> None:
            probs, dlogits = q.new_empty(min(rows, n), nk), q.new_empty(min(rows, n), nk)
            for h in head_ids:
                hb = h % bias.shape[1]
                for i in range(b):
                    for r0 in range(0, n, rows):
                        r = slice(r0, min(n, r0 + rows))
                        m = r.stop - r0
                        p = torch.addmm(bias[i % bias.shape[0], hb, r], q_lse[i, h, r], k_one[i, h].t(),
                                        out=probs[:m]).exp_()
                        dv[i, h].addmm_(p.t(), grad_out[i, h, r])
                        ds = torch.mm(go_delta[i, h, r], v_one[i, h].t(), out=dlogits[:m]).mul_(p)
                        dbias[i % bias.shape[0], h, r].add_(ds)
                        torch.mm(ds, k[i, h], out=dq[i, h, r])
                        dk[i, h].addmm_(ds.t(), q[i, h, r])

        intra_op_threads = torch.get_num_threads()
        threads = min(intra_op_threads, heads)
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(heads_backward, [range(t, heads, threads) for t in range(threads)]))
        finally:
            torch.set_num_threads(intra_op_threads)
        dq.mul_(d ** -0.5)
        dk.mul_(d ** -0.5)
        if bias.shape[1] == 1 and heads > 1:
            dbias = dbias.sum(1, keepdim=True)
        return dq, dk, dv, dbias
