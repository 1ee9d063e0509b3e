"""Attention with dropout in query chunks, recomputed in backward (CPU training with attn_dropout > 0).

PyTorch's CPU flash-attention kernel takes no dropout, so ``F.scaled_dot_product_attention`` with
``dropout_p > 0`` falls back to its math path, which keeps the (B, H, Lq, Lk) probabilities, the
dropout mask and the dropped probabilities of every layer for backward (lumi-tiny at 16 x 1024:
~0.8 GiB per layer) and computes the masked upper triangle of a causal product too.

Here the queries are processed ``chunk`` rows at a time; only q, k, v, the output and the
log-sum-exp of each row are saved (the FlashAttention recipe, Dao et al. 2022, Alg. 2 and 4). The
dropout mask of a chunk is a hash of (seed + chunk index, position) (model/dropout.py), so backward
regenerates exactly the mask the forward used; the seed itself comes from the global RNG, which keeps
training deterministic under ``torch.manual_seed`` and bit-exact across a resume. A causal chunk
reads only the keys up to its last query.
"""
from __future__ import annotations

import torch

from .dropout import dropped, effective_rate, zero_dropped

# rows per chunk: the (B, H, chunk, Lk) fp32 scores of one chunk stay around this size
CHUNK_BYTES = 32 * 2 ** 20


def chunk_rows(batch_heads: int, keys: int, queries: int) -> int:
    return max(16, min(queries, CHUNK_BYTES // max(1, batch_heads * keys * 4)))


class _Plan:
    """Where each chunk starts and stops, which keys it reads, and its masking."""

    def __init__(self, q, k, mask, causal, chunk):
        self.lq, self.lk = q.shape[2], k.shape[2]
        self.mask, self.causal = mask, causal
        self.chunks = [(i, start, min(start + chunk, self.lq)) for i, start in enumerate(range(0, self.lq, chunk))]

    def keys(self, stop: int) -> int:
        # causal queries are the last lq of the lk positions
        return stop + self.lk - self.lq if self.causal else self.lk

    def products(self, q, k, start, stop) -> torch.Tensor:
        """q k^T of the chunk's queries and the keys they read, (B, H, c, end), in q's dtype."""
        return torch.matmul(q[:, :, start:stop], k[:, :, :self.keys(stop)].transpose(-2, -1))

    def scores(self, q, k, start, stop, scale) -> torch.Tensor:
        """(B, H, c, end) scores in fp32 (fp64 for fp64 q): the product runs in q's dtype (bf16 on AMX)."""
        end = self.keys(stop)
        s = self.products(q, k, start, stop).to(_softmax_dtype(q)).mul_(scale)
        if self.causal:  # only the last c keys can lie in a chunk row's future
            rows = stop - start
            s[..., end - rows:].masked_fill_(torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1),
                                             float("-inf"))
        if self.mask is not None:
            rows = self.mask[..., :end] if self.mask.shape[-2] == 1 else self.mask[..., start:stop, :end]
            s = s.masked_fill_(~rows, float("-inf")) if rows.dtype == torch.bool else s.add_(rows)
        return s


# The softmax passes for bf16 chunks without a mask, in C++ (neoformer.kernels registers them, kernels/attention_cpu.cpp):
# "forward": fn(scores (rows, keys) bf16, scale, chunk rows, causal) -> (rows, 2) max and sum, scores -> exp weights;
# "backward": fn(scores, grad_probs, lse (rows,), row_dot (rows,), scale, chunk rows, causal) -> None, scores -> probs,
# grad_probs -> probs * (grad_probs - row_dot). (model/ imports no feature package.)
FUSED_SOFTMAX: dict = {}


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    return bool(FUSED_SOFTMAX) and mask is None and q.device.type == "cpu" and \
        q.dtype == k.dtype == v.dtype == torch.bfloat16


def _softmax_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


class ChunkedAttention(torch.autograd.Function):
    """The 1 / (1 - p) of dropout and the softmax's 1 / sum are applied to the (c, Dh) output rows,
    not to the (c, Lk) probabilities: two fewer passes over the largest tensor.

    bf16 q, k, v (CPUs with AMX, where bf16 products are 3-7x faster than fp32 ones) keep the matmuls in
    bf16 and everything else -- scores, softmax, log-sum-exp, the dq / dk / dv sums -- in fp32, as
    FlashAttention does; fp32 inputs run entirely in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, dropout_p, seed, chunk):
        plan = _Plan(q, k, mask, causal, chunk)
        p = effective_rate(dropout_p)
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=_softmax_dtype(q))  # (B, H, Lq)
        fused = _fused(q, k, v, mask)
        for index, start, stop in plan.chunks:
            if fused:
                _fused_forward_chunk(q, k, v, out, lse, plan, index, start, stop, scale, p, seed)
                continue
            s = plan.scores(q, k, start, stop, scale)
            row_max = s.amax(dim=-1, keepdim=True)
            weights = s.sub_(row_max).exp_()  # unnormalised probabilities
            total = weights.sum(dim=-1, keepdim=True)
            if p:
                zero_dropped(weights, seed + index, p)
            out[:, :, start:stop] = torch.matmul(weights.to(v.dtype), v[:, :, :plan.keys(stop)]).to(
                total.dtype).div_(total * (1.0 - p))
            lse[:, :, start:stop] = (row_max + total.log()).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.dropout_p, ctx.seed = plan, scale, p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, p = ctx.plan, ctx.scale, ctx.dropout_p
        grad_out = grad_out.contiguous()
        sums = _softmax_dtype(q)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k, dtype=sums), torch.zeros_like(v, dtype=sums)
        row_dot = (grad_out.to(sums) * out.to(sums)).sum(-1, keepdim=True)  # (B, H, Lq, 1): rowsum(P * dP)
        fused = _fused(q, k, v, plan.mask)
        for index, start, stop in plan.chunks:
            end = plan.keys(stop)
            if fused:
                _fused_backward_chunk(q, k, v, grad_out, lse, row_dot, dq, dk, dv, plan, ctx.seed + index, start, stop,
                                      scale, p)
                continue
            probs = plan.scores(q, k, start, stop, scale).sub_(lse[:, :, start:stop, None]).exp_()
            g = grad_out[:, :, start:stop] / (1.0 - p)
            grad_probs = torch.matmul(g, v[:, :, :end].transpose(-2, -1)).to(sums)  # (B, H, c, end)
            if p:
                kept = zero_dropped(probs.to(v.dtype, copy=True), ctx.seed + index, p)
                dv[:, :, :end] += torch.matmul(kept.transpose(-2, -1), g)
                zero_dropped(grad_probs, ctx.seed + index, p)
            else:
                dv[:, :, :end] += torch.matmul(probs.to(v.dtype).transpose(-2, -1), g)
            grad_scores = probs.mul_(grad_probs.sub_(row_dot[:, :, start:stop])).to(q.dtype)  # without the scale
            dq[:, :, start:stop] = torch.matmul(grad_scores, k[:, :, :end]).to(sums).mul_(scale)
            dk[:, :, :end] += torch.matmul(grad_scores.transpose(-2, -1), q[:, :, start:stop]).to(sums).mul_(scale)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _fused_forward_chunk(q, k, v, out, lse, plan, index, start, stop, scale, p, seed) -> None:
    end = plan.keys(stop)
    weights = plan.products(q, k, start, stop)  # (B, H, c, end) bf16
    stats = FUSED_SOFTMAX["forward"](weights.view(-1, end), scale, stop - start, plan.causal)
    row_max, total = (stats[:, i].view(*weights.shape[:-1], 1) for i in (0, 1))
    if p:
        zero_dropped(weights, seed + index, p)
    out[:, :, start:stop] = torch.matmul(weights, v[:, :, :end]).to(total.dtype).div_(total * (1.0 - p))
    lse[:, :, start:stop] = (row_max + total.log()).squeeze(-1)


def _fused_backward_chunk(q, k, v, grad_out, lse, row_dot, dq, dk, dv, plan, key, start, stop, scale, p) -> None:
    end = plan.keys(stop)
    probs = plan.products(q, k, start, stop)  # the scores, bf16
    g = grad_out[:, :, start:stop] / (1.0 - p)
    grads = torch.matmul(g, v[:, :, :end].transpose(-2, -1))  # d loss / d dropped probabilities
    if p:
        zero_dropped(grads, key, p)
    FUSED_SOFTMAX["backward"](probs.view(-1, end), grads.view(-1, end), lse[:, :, start:stop].reshape(-1),
                              row_dot[:, :, start:stop].reshape(-1), scale, stop - start, plan.causal)
    # probs: the probabilities; grads: d loss / d scores without the scale
    if p:
        zero_dropped(probs, key, p)
    dv[:, :, :end] += torch.matmul(probs.transpose(-2, -1), g)
    dq[:, :, start:stop] = torch.matmul(grads, k[:, :, :end]).float().mul_(scale)
    dk[:, :, :end] += torch.matmul(grads.transpose(-2, -1), q[:, :, start:stop]).to(dk.dtype).mul_(scale)


def backward_peak_bytes(batch_heads: int, queries: int, keys: int, head_dim: int) -> int:
    """Transient bytes of one backward (the larger pass) for the planner: a chunk's fp32 probabilities, their
    gradient and dropped copy (4 + 4 + 4 bytes per score) and its dropout mask (1), plus dq, dk, dv."""
    rows = chunk_rows(batch_heads, keys, queries)
    return 13 * batch_heads * rows * keys + 3 * batch_heads * max(queries, keys) * head_dim * 4


def use_chunked(q: torch.Tensor, mask, dropout_p: float, training: bool) -> bool:
    """CPU training with attention dropout, and no learned bias (T5's needs its gradient)."""
    return (q.device.type == "cpu" and training and dropout_p > 0 and torch.is_grad_enabled()
            and (mask is None or not mask.requires_grad))


@torch.compiler.disable
def chunked_attention(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, chunk=None, seed=None):
    """softmax(q k^T * scale + mask) with dropout, @ v. q (B, H, Lq, Dh); k, v (B, Hkv, Lk, Dh);
    mask: bool (True = attend) or additive float, broadcastable to (B, H, Lq, Lk); ``causal``: queries
    are the last Lq of the Lk positions. Same result as the plain product with the same dropout mask."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if seed is None:  # from the global RNG, so torch.manual_seed and resumed RNG state decide it
        seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))
    chunk = chunk or chunk_rows(q.shape[0] * q.shape[1], k.shape[2], q.shape[2])
    return ChunkedAttention.apply(q, k, v, mask, causal, scale, dropout_p, seed, chunk)


__all__ = ["chunked_attention", "use_chunked", "backward_peak_bytes", "dropped", "effective_rate", "chunk_rows"]
