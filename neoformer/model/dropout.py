"""Dropout whose mask is a hash of the element's position, so it is never stored and costs no random draws.

Which elements a call drops is a function of (key, flat position) alone: 16-bit lane i % 4 of
splitmix64(key + (i // 4 + 1) * golden) (Steele et al. 2014) below p * 65536. Backward regenerates the
mask from the key instead of saving it, and a C++ kernel (``kernels/loss_cpu.cpp``, registered in
``DROPOUT_KERNELS``) applies it in place; :func:`dropped` computes the same bits in PyTorch, for the
tests and where the kernel is unavailable. Measured on lumi-tiny's bf16 CPU step: the chunked attention's
int64 draws, bool masks and masked fills were ~15 % of the step, ``nn.Dropout``'s ``bernoulli_`` ~4 %.

The key comes from the global RNG, so ``torch.manual_seed`` and a resumed RNG state decide the masks;
the rate is applied at 1/65536 resolution (0.1 -> 0.100006).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .autocast import exporting

DROP_LEVELS = 2 ** 16  # 16-bit decisions: four per 64-bit hash
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15 - 2 ** 64, 0xBF58476D1CE4E5B9 - 2 ** 64, 0x94D049BB133111EB - 2 ** 64
# A kernel that applies the mask to a contiguous CPU tensor in place registers itself here -- neoformer.kernels
# does -- as fn(x, key, threshold, scale) -> True (dropped elements zeroed, kept ones times scale), or False
# where it does not apply. (model/ imports no feature package.)
DROPOUT_KERNELS: list = []


def effective_rate(p: float) -> float:
    """The dropout rate actually applied: p rounded to a multiple of 1/65536 (0.1 -> 0.100006)."""
    return _threshold(p) / DROP_LEVELS


def _threshold(p: float) -> int:
    return min(DROP_LEVELS - 1, round(p * DROP_LEVELS))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (PyTorch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def dropped(seed: int, index: int, shape, p: float, device) -> torch.Tensor:
    """bool mask, True = dropped, for key ``seed + index`` (the chunked attention's chunk ``index``): the same
    tensor every time, and the decisions the C++ kernel applies in place."""
    count = math.prod(shape)
    z = torch.arange(1, (count + 3) // 4 + 1, dtype=torch.int64, device=device) * _GOLDEN + (seed + index)
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    lanes = (z ^ _shift_right(z, 31)).view(torch.int16)[:count]  # little-endian: lane 0 is the low 16 bits
    return ((lanes.to(torch.int32) & 0xFFFF) < _threshold(p)).view(shape)


def zero_dropped(x: torch.Tensor, key: int, p: float, scale: float = 1.0) -> torch.Tensor:
    """x with the elements ``dropped`` names zeroed and the others multiplied by ``scale``, in place."""
    if not (DROPOUT_KERNELS and DROPOUT_KERNELS[0](x, key, _threshold(p), scale)):
        x.masked_fill_(dropped(key, 0, x.shape, p, x.device), 0.0)
        if scale != 1.0:
            x.mul_(scale)
    return x


def new_key() -> int:
    """A mask key from the global RNG (so seeds and resumed RNG states decide the masks)."""
    return int(torch.randint(0, 2 ** 62, (), device="cpu"))


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key, p):
        ctx.key, ctx.p = key, p
        return zero_dropped(x.contiguous().clone(), key, p, 1.0 / (1.0 - effective_rate(p)))

    @staticmethod
    def backward(ctx, grad):
        return zero_dropped(grad.contiguous().clone(), ctx.key, ctx.p, 1.0 / (1.0 - effective_rate(ctx.p))), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same module, same state dict) that runs the hashed mask when training on CPU with the
    kernel loaded: nothing saved for backward but the key, no random draws. Elsewhere (CUDA, no kernel,
    compiling or tracing) it is ``F.dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if (DROPOUT_KERNELS and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and torch.is_grad_enabled() and not exporting()):
            return _HashDropout.apply(x, new_key(), self.p)
        return F.dropout(x, self.p, self.training, self.inplace)


__all__ = ["Dropout", "DROP_LEVELS", "dropped", "effective_rate", "new_key", "zero_dropped"]
