"""Normalisation layers, picked by name: ``NORMS[cfg.norm](cfg)``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .autocast import exporting


class _RMSNormFunction(torch.autograd.Function):
    """weight * (x / rms(x)) saving only x and 1 / rms(x): autograd of the composed ops also keeps the
    fp32 normalised tensor for the weight's gradient (one (B, T, D) fp32 tensor per norm, ~16 MiB per
    norm on lumi-tiny's 16 x 1024 batch); here it is recomputed in backward (one multiply)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics (fp64 stays fp64)
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad_weight = (grad_out * normed.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        grad_normed = (grad_out * weight).to(rstd.dtype)
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not exporting():
            # eager training: the same values, less saved for backward (the compiler's partitioner
            # already recomputes cheap ops like this one itself)
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        # fp32 statistics keep bf16 training stable (same as HF Llama)
        normed = F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def make_layernorm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return nn.LayerNorm(dim or cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def make_rmsnorm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return RMSNorm(dim or cfg.d_model, eps=cfg.norm_eps)


NORMS = {"rmsnorm": make_rmsnorm, "layernorm": make_layernorm}


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    if cfg.ngpt:  # nGPT keeps hidden states on the unit sphere instead of using norm layers
        return nn.Identity()
    return NORMS[cfg.norm](cfg, dim)


def unit_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Project onto the unit sphere (nGPT)."""
    return F.normalize(x, dim=dim, eps=1e-6)
