"""QuantizedEmbedding: a token embedding stored row-wise quantized, dequantized one looked-up row at a time.

The (vocab, width) table is stored exactly as a QuantizedLinear's (out, in) weight (:mod:`.kernels`):
int8 with one fp32 scale per token row, nf4 / int4 with groups along the width. A lookup gathers the
packed rows of the ids and dequantizes only those, so the float table never exists. A head tied to
the embedding becomes a QuantizedLinear holding the same tensors (stored once in the checkpoint).
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import GROUPED, SCHEMES, STORED, dequantize_weight, packed_weight, quantize_weight


class QuantizedEmbedding(nn.Module):
    """nn.Embedding replacement (lookup only: no padding_idx gradient, no max_norm). Frozen: no parameters."""

    def __init__(self, scheme: str, num_embeddings: int, embedding_dim: int, tensors: dict[str, torch.Tensor],
                 group_size: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
        self.scheme, self.num_embeddings, self.embedding_dim = scheme, num_embeddings, embedding_dim
        self.group_size = group_size if scheme in GROUPED else None
        self.dtype = dtype  # of the looked-up rows: the float dtype of the rest of the model
        for name in STORED[scheme]:
            self.register_buffer(name, tensors[name])

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: str, group_size: int | None = 64) -> "QuantizedEmbedding":
        w = embedding.weight.detach()
        return cls(scheme, embedding.num_embeddings, embedding.embedding_dim, quantize_weight(w, scheme, group_size),
                   group_size, w.dtype)

    def stored(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STORED[self.scheme]}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole float table (vocab, width); the tests' reference."""
        return dequantize_weight(self.scheme, packed_weight(self.scheme, self, self.group_size), dtype or self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = {name: t.index_select(0, flat) for name, t in self.stored().items()}
        values = dequantize_weight(self.scheme, packed_weight(self.scheme, rows, self.group_size), self.dtype)
        return values.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}{group}"
