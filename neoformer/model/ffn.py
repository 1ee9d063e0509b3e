"""Feed-forward networks (plain and gated) and a top-k routed mixture of experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .weights import residual_projection

ACTIVATION_FNS = {
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # ReLU squared: So et al. 2021 ("Primer"), modded-nanogpt's MLP
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's gelu_new
    "silu": F.silu,
    # gated variants (Shazeer 2020, "GLU Variants Improve Transformer"): activation of the gate
    "glu": torch.sigmoid,
    "swiglu": F.silu,
    "geglu": F.gelu,
}


class FeedForward(nn.Module):
    """Plain: down(act(up(x))). Gated: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATION_FNS[cfg.activation]
        self.gated = cfg.gated_ffn
        self.ngpt = cfg.ngpt
        hidden = cfg.resolved_ffn_hidden
        if self.gated:
            self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down = residual_projection(nn.Linear(hidden, cfg.d_model, bias=cfg.bias))
        if cfg.ngpt:  # nGPT s_u, s_v: learned scales of the normalized up/gate projections
            self.up_scale = nn.Parameter(torch.ones(hidden))
            self.gate_scale = nn.Parameter(torch.ones(hidden))
            self.gate_gain = cfg.d_model ** 0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (..., D) -> (out (..., D), auxiliary loss or None)."""
        up = self.up(x)
        if not self.gated:
            return self.down(self.act(up)), None
        gate = self.gate(x)
        if self.ngpt:
            up, gate = up * self.up_scale, gate * self.gate_scale * self.gate_gain
        return self.down(self.act(gate) * up), None


class MixtureOfExperts(nn.Module):
    """Top-k routed experts (Shazeer et al. 2017; Mixtral-style renormalised top-k weights)
    with the Switch Transformer load-balancing loss: E * sum_e(tokens_fraction_e * mean_prob_e)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.n_experts = cfg.moe_experts
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.moe_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, D)
        probs = torch.softmax(self.router(tokens).float(), dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel() == 0:
                continue
            expert_out, _ = expert(tokens[rows])
            out.index_add_(0, rows, expert_out * weights[rows, slot, None])
        # load balancing: fraction of routed slots per expert times its mean router probability
        routed = F.one_hot(chosen, self.n_experts).float().sum(dim=(0, 1)) / chosen.numel()
        aux = self.n_experts * (routed * probs.mean(dim=0)).sum()
        return out.reshape(shape), aux


def make_ffn(cfg: ModelConfig) -> nn.Module:
    return MixtureOfExperts(cfg) if cfg.moe_experts else FeedForward(cfg)
