"""The model as graph-friendly modules with flat tensor inputs and outputs (ONNX, torch.export, TorchScript).

A runtime outside Python names every input, so the cache travels as one tensor per layer and K/V
(``past_key_values.{i}.key``...), plus the NeoFormer-X memory state where there is one.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..model.memory import MemoryState
from ..model.state import Past


def kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{part}" for i in range(n_layers) for part in ("key", "value")]


class DecoderStep(nn.Module):
    """One cached forward of a decoder with flat tensor inputs/outputs (what ONNX can name)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.memory = model.rmc is not None

    def forward(self, input_ids, attention_mask, *flat):
        n = self.model.config.n_layers
        state = MemoryState(flat[2 * n], flat[2 * n + 1]) if self.memory else None
        past = Past.of([(flat[2 * i], flat[2 * i + 1]) for i in range(n)], state)
        logits, present, _ = self.model(input_ids, past, attention_mask=attention_mask.bool(), use_cache=True)
        out = [logits, *[t for kv in present for t in kv]]
        if self.memory:
            out += [present.memory_state.total, present.memory_state.count]
        return tuple(out)


class EncoderLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask=attention_mask.bool())


class Seq2SeqEncoder(EncoderLogits):
    def forward(self, input_ids, attention_mask):
        return self.model.encode(input_ids, attention_mask.bool())


class Seq2SeqDecoderStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, memory, attention_mask, *flat):
        n = self.model.config.n_layers
        past = Past.of([(flat[2 * i], flat[2 * i + 1]) for i in range(n)])
        logits, present = self.model.decode(decoder_input_ids, memory, attention_mask.bool(), past, use_cache=True)
        return (logits, *[t for kv in present for t in kv])


def eager_copy(model):
    """A copy whose attention layers use the eager reference backend (plain matmuls, exports everywhere)."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if hasattr(module, "backend") and hasattr(module, "head_dim"):
            module.backend = "eager"
    return model


def random_kv(cfg, batch: int, past: int, dtype, seed: int) -> list[torch.Tensor]:
    """Distinct random example tensors, one per KV input (never one shared tensor)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.resolved_n_kv_heads, past, cfg.resolved_head_dim)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(2 * cfg.n_layers)]
