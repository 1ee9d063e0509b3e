"""NeoFormer-X memory layer: Recursive Memory Core (RMC) and Neural-Symbolic Bridge (NSB).

Design choices where the seed is loose (documented in docs/architecture.md):
- RMC reads with the *causal prefix mean* of the hidden states as the "batch summary", so
  position t never sees tokens after t (a full-sequence mean would leak the future into a
  causal LM). During cached decoding the running sum and count travel with the KV cache.
- The write step moves memory slots toward the sequence summary, weighted by how strongly each
  slot was read: delta[b, m] = w[b, m] * (s[b] - M[m]). ``apply_update(delta, lr)`` adds
  lr * delta to an *episodic* buffer on top of the learned memory, so ``reset()`` forgets
  episodes without undoing what gradient descent learned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .weights import residual_projection


@dataclass
class MemoryState:
    """Running sum and count of the hidden states read so far (per batch row)."""

    total: torch.Tensor  # (B, D)
    count: torch.Tensor  # (B,)

    # ---- the model-state hooks a cache calls (see model/state.py) ------------------------------
    def select(self, index: torch.Tensor) -> "MemoryState":
        """Rows ``index`` of the batch (beam search reorders, rows leaving a batch)."""
        return MemoryState(self.total.index_select(0, index), self.count.index_select(0, index))

    def copy_row_(self, row: int, other: "MemoryState", other_row: int = 0) -> None:
        """Row ``row`` becomes ``other``'s row ``other_row`` (a sequence joining a running batch)."""
        self.total[row] = other.total[other_row]
        self.count[row] = other.count[other_row]


class RecursiveMemoryCore(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.memory = nn.Parameter(torch.randn(cfg.rmc_mem_size, d) * cfg.init_std)  # M (mem, D)
        self.register_buffer("episodic", torch.zeros(cfg.rmc_mem_size, d))  # sum of applied deltas
        self.read_query = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(2 * d, d, bias=False)  # [h ; read] -> D
        self.scale = 1.0 / math.sqrt(d)

    def slots(self) -> torch.Tensor:
        return self.memory + self.episodic.to(self.memory.dtype)

    def read_weights(self, summary: torch.Tensor) -> torch.Tensor:
        """summary (..., D) -> attention over the memory slots (..., mem)."""
        scores = self.read_query(summary) @ self.slots().T * self.scale
        return torch.softmax(scores.float(), dim=-1).to(summary.dtype)

    def forward(self, h: torch.Tensor, state: MemoryState | None = None, keep: torch.Tensor | None = None,
                update: bool = False):
        """h (B, L, D) -> (h + out([h ; read]), new MemoryState, delta (B, mem, D) or None)."""
        weights_keep = torch.ones(h.shape[:2], device=h.device, dtype=h.dtype) if keep is None else keep.to(h.dtype)
        running = (h * weights_keep[..., None]).cumsum(dim=1)  # (B, L, D)
        count = weights_keep.cumsum(dim=1)  # (B, L)
        if state is not None:
            running = running + state.total[:, None]
            count = count + state.count[:, None]
        summary = running / count.clamp(min=1)[..., None]  # causal prefix mean (B, L, D)
        read = self.read_weights(summary) @ self.slots()  # (B, L, D)
        out = h + self.out(torch.cat((h, read), dim=-1))
        new_state = MemoryState(running[:, -1], count[:, -1])
        delta = self.write_delta(summary[:, -1]) if update else None
        return out, new_state, delta

    @staticmethod
    def advance(state: MemoryState | None, h: torch.Tensor) -> MemoryState:
        """The running summary after also reading h (B, L, D) (every token real): what a
        forward would leave, without running one (speculative decoding keeps accepted tokens)."""
        total, count = h.sum(1), torch.full(h.shape[:1], float(h.shape[1]), dtype=h.dtype, device=h.device)
        return MemoryState(total, count) if state is None else MemoryState(state.total + total, state.count + count)

    @torch.no_grad()
    def write_delta(self, summary: torch.Tensor) -> torch.Tensor:
        """summary (B, D) -> delta (B, mem, D): move read slots toward the summary."""
        weights = self.read_weights(summary)  # (B, mem)
        return weights[..., None] * (summary[:, None, :] - self.slots()[None])

    @torch.no_grad()
    def apply_update(self, delta: torch.Tensor, lr: float = 0.01) -> None:
        """Seed API: M <- M + lr * delta (delta (mem, D), e.g. ``delta.mean(0)``)."""
        if delta.shape != self.memory.shape:
            raise ValueError(f"delta has shape {tuple(delta.shape)}, expected {tuple(self.memory.shape)}; "
                             "pass delta.mean(0) for a batch of deltas")
        self.episodic.add_(delta.to(self.episodic.dtype), alpha=lr)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget all applied updates (episodes); learned memory stays."""
        self.episodic.zero_()


class NeuralSymbolicBridge(nn.Module):
    """Soft selection over a rule bank R (rules, rdim), fused into the hidden state by an FFN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, r = cfg.d_model, cfg.nsb_rule_dim
        self.rules = nn.Parameter(torch.randn(cfg.nsb_rules, r) * cfg.init_std)
        self.to_rule = nn.Linear(d, r, bias=False)
        self.fuse_in = nn.Linear(d + r, d, bias=False)
        self.fuse_out = residual_projection(nn.Linear(d, d, bias=False))
        self.scale = 1.0 / math.sqrt(r)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, L, D) -> h + FFN([h ; selected rule])."""
        select = torch.softmax((self.to_rule(h) @ self.rules.T * self.scale).float(), dim=-1).to(h.dtype)
        rule = select @ self.rules  # (B, L, rdim)
        return h + self.fuse_out(nn.functional.silu(self.fuse_in(torch.cat((h, rule), dim=-1))))
