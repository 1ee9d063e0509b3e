"""Feed-forward networks (plain and gated) and a top-k routed mixture of experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .autocast import cast_once, exporting
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

# d act(gate) / d gate times the incoming gradient, as autograd computes it for each gated activation
_GATE_BACKWARD = {
    "swiglu": lambda grad, gate: torch.ops.aten.silu_backward(grad, gate),
    "geglu": lambda grad, gate: torch.ops.aten.gelu_backward(grad, gate),
    "glu": lambda grad, gate: torch.ops.aten.sigmoid_backward(grad, torch.sigmoid(gate)),
}


class _GatedDown(torch.autograd.Function):
    """``down(act(gate) * up)`` saving only gate and up: autograd of the composed ops also keeps
    act(gate) and the product (two (B, T, ffn) tensors per layer, 64 MiB on lumi-tiny's 16 x 1024
    bf16 batch); here both are recomputed in backward (two elementwise passes). The same ops as
    autograd's (aten's activation backward), so gradients equal the plain path's."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, activation):
        ctx.save_for_backward(gate, up, weight)
        ctx.activation, ctx.bias_dtype = activation, None if bias is None else bias.dtype
        return F.linear(ACTIVATION_FNS[activation](gate) * up, weight.to(gate.dtype),
                        None if bias is None else bias.to(gate.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        activated = ACTIVATION_FNS[ctx.activation](gate)
        grad_out = grad_out.to(gate.dtype)
        grad_hidden = grad_out @ weight.to(gate.dtype)
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = (rows.t() @ (activated * up).reshape(-1, up.shape[-1])).to(weight.dtype)
        grad_gate = _GATE_BACKWARD[ctx.activation](grad_hidden * up, gate)
        grad_bias = None if ctx.bias_dtype is None else rows.sum(0).to(ctx.bias_dtype)
        return grad_gate, grad_hidden * activated, grad_weight, grad_bias, None


class FeedForward(nn.Module):
    """Plain: down(act(up(x))). Gated: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATION_FNS[cfg.activation]
        self.gated = cfg.gated_ffn
        self.ngpt = cfg.ngpt
        hidden = cfg.resolved_ffn_hidden
        self.activation = cfg.activation
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
        x = cast_once(x)
        up = self.up(x)
        if not self.gated:
            return self.down(self.act(up)), None
        gate = self.gate(x)
        if self.ngpt:
            up, gate = up * self.up_scale, gate * self.gate_scale * self.gate_gain
        if self._recompute_gated():
            return _GatedDown.apply(gate, up, self.down.weight, self.down.bias, self.activation), None
        return self.down(self.act(gate) * up), None

    def _recompute_gated(self) -> bool:
        """Eager training through a plain ``down`` Linear (not a LoRA/quantized replacement, no hooks
        that would miss its call); compiled graphs get the same recomputation from the partitioner."""
        down = self.down
        return (self.training and torch.is_grad_enabled() and not exporting() and type(down) is nn.Linear
                and self.activation in _GATE_BACKWARD and not down._forward_hooks and not down._forward_pre_hooks)


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
