"""The one cache/state protocol between a model and whoever keeps its cache.

A forward that reads or extends a cache talks to one object with two methods and one attribute:

- ``prepare(q_pos, new_keep) -> (k_pos, key_keep)`` once per forward, before the layers: where
  every key the new queries may see sits, and which of them are real tokens;
- ``update(layer_idx, k, v) -> (k_all, v_all)`` once per self-attention layer: store the new
  keys/values, return every cached one of that layer;
- ``model_state``: state the model owns beside K/V (the RMC running summary of NeoFormer-X),
  read and replaced by the model itself; callers treat it as opaque. Its rows are selected with
  ``state.select(index)`` and copied with ``state.copy_row_(row, other, other_row)``; the model
  advances it over tokens without a forward with ``model.advance_state(state, ids, positions)``.

Two implementations: ``neoformer.generate.cache.StaticKVCache`` (preallocated, generation engine)
and ``TupleCache`` below, the adapter that lets the seed API's tuple ``past`` go through the same
path (keys grow by concatenation).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class KVCache(Protocol):
    model_state: Any

    def prepare(self, q_pos: torch.Tensor, new_keep: torch.Tensor | None): ...

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor): ...


class Past(tuple):
    """Seed API cache: a tuple with one (K, V) per block, each (B, H_kv, P, Dh).
    ``memory_state`` carries the model-owned state of the cached prefix (the RMC running summary)."""

    memory_state: Any = None

    @classmethod
    def of(cls, kvs, memory_state: Any = None) -> "Past":
        past = cls(kvs)
        past.memory_state = memory_state
        return past


class TupleCache:
    """The seed API's tuple ``past`` seen through the cache protocol.

    A tuple stores no positions or padding: the seed API describes cached and new keys in the
    forward's own arguments (``attention_mask`` over both, or positions), so the model derives
    ``k_pos`` / ``key_keep`` of every key and hands them in; ``prepare`` returns them.
    Writing a layer twice (activation recomputation) simply replaces it."""

    def __init__(self, past, layer_offset: int = 0, k_pos: torch.Tensor | None = None,
                 key_keep: torch.Tensor | None = None):
        self.past = past or None
        self.layer_offset = layer_offset
        self.model_state = getattr(past, "memory_state", None)
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.keys = (k_pos, key_keep)

    @property
    def length(self) -> int:
        """Tokens already cached."""
        return self.past[0][0].shape[2] if self.past else 0

    def prepare(self, q_pos: torch.Tensor, new_keep: torch.Tensor | None):
        return self.keys

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        i = layer_idx - self.layer_offset
        if self.past:
            k, v = torch.cat((self.past[i][0], k), dim=2), torch.cat((self.past[i][1], v), dim=2)
        self.layers[i] = (k, v)
        return k, v

    def as_past(self) -> Past:
        return Past.of([self.layers[i] for i in sorted(self.layers)], self.model_state)
