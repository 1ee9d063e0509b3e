"""Position encodings: RoPE, sinusoidal, learned absolute, ALiBi and T5 relative bias.

Every table is computed lazily from the position ids on their device, so models built on the
meta device (or moved between devices) never carry stale buffers.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


# ---- RoPE (Su et al. 2021, RoFormer) ---------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """cos/sin for rotary embeddings in the half-split layout used by Llama/HF.

    Scaling: ``linear`` divides positions by the factor (Chen et al. 2023, position
    interpolation); ``ntk`` raises the base by factor^(d/(d-2)) (NTK-aware scaling, bloc97 2023).
    """

    def __init__(self, head_dim: int, base: float, scaling: str | None = None, factor: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.base = base * factor ** (head_dim / (head_dim - 2)) if scaling == "ntk" else base
        self.position_scale = 1.0 / factor if scaling == "linear" else 1.0
        self._inv_freq: dict[tuple, torch.Tensor] = {}

    def inv_freq(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if (device, dtype) not in self._inv_freq:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).to(dtype) / self.head_dim
            self._inv_freq[device, dtype] = 1.0 / (self.base ** exponents)
        return self._inv_freq[device, dtype]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, L) -> cos, sin each (B, 1, L, Dh), ready to broadcast over heads.
        Angles are computed in fp32 (fp64 for fp64 models), then cast."""
        compute = torch.promote_types(dtype, torch.float32)
        freqs = positions.to(compute)[..., None] * self.position_scale * self.inv_freq(positions.device, compute)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, Dh)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, Dh) rotated by the angles of its positions."""
    return x * cos + rotate_half(x) * sin


# ---- absolute encodings added to the token embeddings ---------------------------------------
def sinusoidal_encoding(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Vaswani et al. 2017: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...). (B, L) -> (B, L, d)."""
    compute = torch.promote_types(dtype, torch.float32)
    div = torch.exp(torch.arange(0, dim, 2, device=positions.device).to(compute) * (-math.log(10000.0) / dim))
    angles = positions.to(compute)[..., None] * div  # (B, L, d/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(dtype)


# ---- additive attention biases ---------------------------------------------------------------
def alibi_slopes(n_heads: int) -> list[float]:
    """Press et al. 2022: geometric slopes; non-powers of two interleave the next power's slopes."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


class ALiBi(nn.Module):
    def __init__(self, n_heads: int):
        super().__init__()
        self.slopes = alibi_slopes(n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, Lq), (B, Lk) -> bias (B, H, Lq, Lk) = -slope * |i - j|."""
        compute = torch.promote_types(dtype, torch.float32)
        slopes = torch.tensor(self.slopes, device=q_pos.device, dtype=compute)
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(compute)  # (B, Lq, Lk)
        return (-slopes[None, :, None, None] * distance[:, None]).to(dtype)


class RelativePositionBias(nn.Module):
    """T5 bucketed relative position bias (Raffel et al. 2020), shared by all layers of a stack."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        self.bias = nn.Embedding(cfg.relative_buckets, cfg.n_heads)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        buckets = torch.zeros_like(relative)
        num_buckets = self.num_buckets
        if self.bidirectional:
            num_buckets //= 2
            buckets += (relative > 0).long() * num_buckets
            relative = relative.abs()
        else:
            relative = -torch.clamp(relative, max=0)
        max_exact = num_buckets // 2
        is_small = relative < max_exact
        scaled = torch.log(relative.float().clamp(min=1) / max_exact) / math.log(self.max_distance / max_exact)
        large = max_exact + (scaled * (num_buckets - max_exact)).long()
        large = torch.clamp(large, max=num_buckets - 1)
        return buckets + torch.where(is_small, relative, large)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        relative = k_pos[:, None, :] - q_pos[:, :, None]  # (B, Lq, Lk) memory - query
        return self.bias(self.bucket(relative)).permute(0, 3, 1, 2).to(dtype)  # (B, H, Lq, Lk)


def make_bias_module(cfg: ModelConfig, bidirectional: bool) -> nn.Module | None:
    if cfg.position == "alibi":
        return ALiBi(cfg.n_heads)
    if cfg.position == "relative":
        return RelativePositionBias(cfg, bidirectional)
    return None
