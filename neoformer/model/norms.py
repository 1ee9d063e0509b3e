"""Normalisation layers, picked by name: ``NORMS[cfg.norm](cfg)``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics keep bf16 training stable (same as HF Llama)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
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
