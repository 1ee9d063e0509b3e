"""One transformer block shared by encoders and decoders (cross-attention on for enc-dec decoders)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention, AttnContext
from .dropout import Dropout
from .ffn import make_ffn
from .norms import make_norm, unit_norm


class Block(nn.Module):
    """Pre-norm:  x + drop(f(norm(x)))        (GPT-2, Llama)
    Post-norm: norm(x + drop(f(x)))           (Vaswani et al. 2017, BERT)
    nGPT:      unit(x + alpha * (unit(f(x)) - x))   (Loshchilov et al. 2024)"""

    def __init__(self, cfg: ModelConfig, layer_idx: int, cross_attention: bool = False):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.ngpt = cfg.ngpt
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.cross_norm = make_norm(cfg) if cross_attention else None
        self.cross_attn = Attention(cfg, layer_idx, cross=True) if cross_attention else None
        self.ffn_norm = make_norm(cfg)
        self.ffn = make_ffn(cfg)
        self.drop = Dropout(cfg.hidden_dropout)
        if cfg.ngpt:  # nGPT "eigen learning rates": how far each update moves along the sphere
            self.attn_alpha = nn.Parameter(torch.full((cfg.d_model,), 0.05))
            self.ffn_alpha = nn.Parameter(torch.full((cfg.d_model,), 0.05))
            if cross_attention:
                self.cross_alpha = nn.Parameter(torch.full((cfg.d_model,), 0.05))

    def _residual(self, x: torch.Tensor, update: torch.Tensor, norm: nn.Module, alpha_name: str) -> torch.Tensor:
        if self.ngpt:
            return unit_norm(x + getattr(self, alpha_name) * (unit_norm(update) - x))
        if self.pre_norm:
            return x + self.drop(update)
        return norm(x + self.drop(update))

    def _branch_input(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm(x) if self.pre_norm else x

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache=None, memory=None,
                memory_ctx: AttnContext | None = None):
        """x (B, L, D) -> (x (B, L, D), auxiliary loss or None); ``cache`` keeps this block's K, V."""
        update = self.attn(self._branch_input(x, self.attn_norm), ctx, cache=cache)
        x = self._residual(x, update, self.attn_norm, "attn_alpha")
        if self.cross_attn is not None:
            update = self.cross_attn(self._branch_input(x, self.cross_norm), memory_ctx, memory=memory)
            x = self._residual(x, update, self.cross_norm, "cross_alpha")
        update, aux = self.ffn(self._branch_input(x, self.ffn_norm))
        x = self._residual(x, update, self.ffn_norm, "ffn_alpha")
        return x, aux
