"""Loss over the LM head in row chunks: the (N, V) logits are never materialised whole.

``logits = hidden @ weight.T (* scale)`` followed by a loss is the largest tensor of a training
step: lumi-tiny's batch of 16 x 1024 tokens at vocab 32,768 is 2 GiB of fp32 logits, plus as much
again for their gradient. ``chunked_head_loss`` computes the head and the loss ``rows`` at a time
inside one autograd Function (the fused linear + cross-entropy of Liger-Kernel and Apple's Cut
Cross-Entropy, written in plain PyTorch): each chunk's logits are made, reduced to a summed loss,
differentiated and freed before the next chunk, so memory grows with the chunk, not with B x T x V.

The gradient is computed in the forward pass (the chunk's logits are already there), so the
backward only scales the stored gradients by the incoming grad_output: no recomputation, and the
head costs exactly one forward and one backward matmul pair, as in the plain path. Without grad
(evaluation) the forward only sums the chunk losses.

The per-chunk loss is any function ``loss_fn(logits (n, V) fp32, *row_inputs (n, ...)) -> sum``
(a scalar summed over the chunk's rows): token cross-entropy here, a distillation KL against
teacher logits elsewhere. Only the small ``logits -> loss`` graph is differentiated by autograd;
the matmuls of the head are written out (grad_hidden = g @ W, grad_W += g.T @ hidden).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import IGNORE_INDEX

# bytes of fp32 logits one chunk may hold (logits and their gradient live at once: twice this)
CHUNK_LOGIT_BYTES = 32 * 2 ** 20
ChunkLoss = Callable[..., torch.Tensor]


def chunk_rows_for(vocab_size: int, budget_bytes: int = CHUNK_LOGIT_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits fit ``budget_bytes`` (at least 1 row)."""
    return max(1, budget_bytes // (4 * vocab_size))


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 (the loss is always computed in fp32 or wider); fp32/fp64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the chunk's rows whose target is not IGNORE_INDEX."""
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


# A fused CPU kernel for ``token_cross_entropy_sum`` registers itself here -- neoformer.kernels does once its C++
# library loads -- as fn(logits, targets, write_grad) -> summed loss (logits overwritten in place by d loss /
# d logits when write_grad), or None where it does not apply. (model/ imports no feature package.)
CROSS_ENTROPY_KERNELS: list = []


def _fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool) -> torch.Tensor | None:
    return CROSS_ENTROPY_KERNELS[0](logits, targets, write_grad) if CROSS_ENTROPY_KERNELS else None


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma 2's logit soft-capping); unchanged when cap is None."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def capped_loss(loss_fn: ChunkLoss, cap: float, logits: torch.Tensor, *row_inputs) -> torch.Tensor:
    """``loss_fn`` of soft-capped logits (bind with functools.partial): the cap runs inside the chunk."""
    return loss_fn(soft_cap(logits, cap), *row_inputs)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _HeadGrads:
    """The head's gradients, accumulated chunk by chunk from g = d loss / d logits (n, V).

    The weight's cast and the (V, D) buffers are made once per step, not once per chunk: the plain
    ``grad_weight += g.t() @ h`` of a bf16 product into fp32 allocated and converted a (V, D) tensor every
    chunk (measured 11 ms a chunk at V 32k x D 256, three times the matmul; 0.7 s of lumi-tiny's step)."""

    def __init__(self, hidden, weight, want_hidden: bool, want_weight: bool):
        self.hidden = torch.empty_like(hidden) if want_hidden else None
        self.weight = torch.zeros_like(at_least_fp32(weight)) if want_weight else None
        self._source, self._product, self._widened = weight, None, None

    def add(self, g: torch.Tensor, h: torch.Tensor, start: int) -> None:
        with torch.autocast(g.device.type, enabled=False):  # g and h are in the matmul's dtype already
            if self.hidden is not None:
                self.hidden[start:start + g.shape[0]] = g @ self._source
            if self.weight is None:
                return
            h = h.to(g.dtype)
            if g.dtype == self.weight.dtype:
                self.weight.addmm_(g.t(), h)
                return
            if self._product is None:
                self._product = self.weight.new_empty(self.weight.shape, dtype=g.dtype)
                self._widened = torch.empty_like(self.weight)
            torch.mm(g.t(), h, out=self._product)
            self.weight += self._widened.copy_(self._product)


def _chunk_loss(h, inputs, start, cast_t, scale, loss_fn, needs_grad, grads_of, grad_scale) -> torch.Tensor:
    """One chunk's summed loss; its gradients go into ``grads_of`` (and ``grad_scale``) when ``needs_grad``."""
    with torch.autocast(h.device.type, enabled=False):
        lin = h.to(cast_t.dtype) @ cast_t  # (n, V), as the plain path's F.linear computes it
    fused = (_fused_cross_entropy(lin, inputs[0], write_grad=needs_grad)
             if loss_fn is token_cross_entropy_sum and scale is None else None)
    if fused is not None:
        if needs_grad:
            grads_of.add(lin, h, start)  # lin holds the gradient now
        return fused
    raw = at_least_fp32(lin)
    if not needs_grad:
        return loss_fn(raw * scale if scale is not None else raw, *inputs)
    with torch.enable_grad():
        leaf = raw.detach().requires_grad_()
        s = scale.detach().requires_grad_(grad_scale is not None) if scale is not None else None
        loss = loss_fn(leaf * s if s is not None else leaf, *inputs)
        grads = torch.autograd.grad(loss, [leaf] + ([s] if grad_scale is not None else []))
    del raw, leaf  # the fp32 logits, before the gradient's cast
    grads_of.add(grads[0].to(lin.dtype), h, start)  # d loss / d logits at the matmul's dtype, as autograd's
    if grad_scale is not None:
        grad_scale += grads[1]
    return loss.detach()


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, scale, loss_fn, rows, *row_inputs):
        needs_grad = any(ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=at_least_fp32(hidden).dtype, device=hidden.device)
        # the head's dtype as F.linear would pick it (autocast's), its casts made once: autocast does not cache
        # casts inside an autograd.Function (measured: 11 ms a chunk to recast lumi-tiny's 32k x 256 head)
        dtype = _matmul_dtype(hidden, weight)
        cast = weight.to(dtype)
        cast_t = cast.t().contiguous()  # (D, V): measured 1.3x faster than a transposed view as the right operand
        grads_of = _HeadGrads(hidden, cast, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_scale = torch.zeros_like(at_least_fp32(scale)) if scale is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], rows):
            # one call per chunk: its logits and gradients die on return, before the next chunk's exist
            total += _chunk_loss(hidden[start:start + rows], [x[start:start + rows] for x in row_inputs], start,
                                 cast_t, scale, loss_fn, needs_grad, grads_of, grad_scale)
        ctx.save_for_backward(grads_of.hidden, grads_of.weight, grad_scale)
        ctx.weight_dtype = weight.dtype
        ctx.scale_dtype = scale.dtype if scale is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_scale = ctx.saved_tensors
        out = [None, None, None]
        if grad_hidden is not None:
            out[0] = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            out[1] = (grad_weight * grad_output).to(ctx.weight_dtype)
        if grad_scale is not None:
            out[2] = (grad_scale * grad_output).to(ctx.scale_dtype)
        return (*out, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


@torch.compiler.disable  # the per-chunk autograd.grad cannot be traced: the compiled step runs this part eagerly
def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, row_inputs: tuple[torch.Tensor, ...],
                      loss_fn: ChunkLoss = token_cross_entropy_sum, scale: torch.Tensor | None = None,
                      rows: int | None = None) -> torch.Tensor:
    """Sum over rows of ``loss_fn(hidden @ weight.T * scale, *row_inputs)``, ``rows`` at a time.

    hidden (..., D) is flattened to (N, D); every tensor of ``row_inputs`` to (N, ...) (targets
    (..., ) -> (N,), teacher logits (..., V) -> (N, V)). ``scale`` (V,): a per-token logit scale
    (nGPT's s_z) or None. ``rows`` default: ``chunk_rows_for(V)`` (32 MiB of logits per chunk).
    Returns the sum (fp32, or fp64 for fp64 inputs); divide by the count of rows that count to get a mean.
    """
    D = hidden.shape[-1]
    flat = hidden.reshape(-1, D)
    n = flat.shape[0]
    inputs = tuple(x.reshape(n, *x.shape[hidden.dim() - 1:]) for x in row_inputs)
    rows = rows or chunk_rows_for(weight.shape[0])
    return _ChunkedHeadLoss.apply(flat, weight, scale, loss_fn, rows, *inputs)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          scale: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """Mean token cross-entropy over targets != IGNORE_INDEX, as ``F.cross_entropy(logits, targets,
    ignore_index=-100)`` of the full logits computes it (NaN when no target counts, as there)."""
    total = chunked_head_loss(hidden, weight, (targets,), token_cross_entropy_sum, scale, rows)
    return total / (targets != IGNORE_INDEX).sum()


__all__ = ["soft_cap", "capped_loss", "chunked_head_loss", "chunked_cross_entropy", "token_cross_entropy_sum", "chunk_rows_for",
           "CHUNK_LOGIT_BYTES"]
