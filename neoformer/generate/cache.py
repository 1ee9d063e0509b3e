"""A static, preallocated KV cache that rows can join and leave.

Layout: per self-attention layer one K and one V buffer, each (B, H_kv, capacity, Dh) (GQA-aware:
H_kv heads, not H). All rows share one write pointer ``end``: a forward of L new tokens writes
slots [end, end + L) of every row. Rows of different lengths are *left padded*: a row's unused
slots are marked False in ``keep`` (B, capacity), and ``pos`` (B, capacity) holds the absolute
position of every slot, so each row keeps its own positions (a 3-token prompt next to a
10-token one still starts at position 0).

The model calls the cache through the protocol of ``neoformer/model/state.py``:
- ``prepare(q_pos, key_keep) -> (k_pos, key_keep)`` once per forward, before the layers;
- ``update(layer_idx, k, v) -> (k_full, v_full)`` once per layer;
- ``model_state``: state the model owns beside K/V (e.g. a running summary), opaque here: rows
  follow ``reorder`` / ``insert_row`` through its ``select`` / ``copy_row_`` hooks.

Two modes:
- dynamic (default, eager): returns views of the filled slots [0, end); when no row has padding
  it returns ``key_keep=None``, so a one-token decode step needs no mask at all;
- static (``static=True``, for torch.compile / CUDA graphs): shapes never change; the write slot
  is a tensor and the full buffers are returned with ``key_keep`` marking unfilled slots.

Context trimming (seed 000): ``trim(n)`` keeps the last n slots, i.e. ``k[:, :, -n:, :]``; keys
were rotated by RoPE before they were cached, so later queries (whose positions keep increasing)
see the right relative distances.

Continuous batching: ``free_row(i)`` retires a row, ``insert_row(i, other)`` puts a freshly
prefilled single-row cache into row i, right-aligned with the rows already running.
"""
from __future__ import annotations

from typing import Any

import torch


class StaticKVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int, *,
                 device=None, dtype=torch.float32, layer_offset: int = 0, static: bool = False,
                 track_tokens: bool = False):
        if capacity < 1:
            raise ValueError(f"cache capacity ({capacity}) must be >= 1")
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)  # absolute position of each slot
        self.keep = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # True = a real token
        self.tokens = torch.zeros(batch, capacity, dtype=torch.long, device=device) if track_tokens else None
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # position of each row's next token
        self.capacity, self.batch, self.layer_offset = capacity, batch, layer_offset
        self.static = static
        self.end = 0  # slots in use, shared by all rows
        self.padded = False  # some slot before `end` is padding (then attention needs a mask)
        self.model_state: Any = None  # model-owned state (model/state.py), travels with the cache
        self._start = 0
        if static:
            self._slot = torch.zeros(1, dtype=torch.long, device=device)
            self._mark_capacity_dynamic()

    def _mark_capacity_dynamic(self) -> None:
        """Tell torch.compile that the capacity dimension varies, so one compiled step serves every
        capacity (a longer generation reuses the graph instead of recompiling per capacity bucket)."""
        from torch._dynamo import maybe_mark_dynamic

        for buf in (*self.k, *self.v):
            maybe_mark_dynamic(buf, 2)
        for buf in (self.pos, self.keep, self.tokens):
            if buf is not None:
                maybe_mark_dynamic(buf, 1)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int, *, dtype=None, device=None, **kwargs) -> "StaticKVCache":
        """A cache shaped for the self-attention layers that ``model.cache_layers`` names."""
        cfg, layers = model.config, model.cache_layers
        if not len(layers):
            raise ValueError(f"a {type(model).__name__} keeps no self-attention cache (it cannot generate)")
        weight = next(model.parameters())
        return cls(len(layers), batch, cfg.resolved_n_kv_heads, cfg.resolved_head_dim, capacity, device=device or weight.device,
                   dtype=dtype or weight.dtype, layer_offset=layers.start, **kwargs)

    # ---- the protocol the model calls ---------------------------------------------------------
    def prepare(self, q_pos: torch.Tensor, key_keep: torch.Tensor | None):
        """q_pos (B|1, L) positions of the new tokens, key_keep (B, L) or None ->
        (k_pos (B, Lk), key_keep (B, Lk) or None) of every key the queries may see."""
        L = q_pos.shape[-1]
        if self.static:
            return self._prepare_static(q_pos, key_keep, L)
        start, end = self.end, self.end + L
        if end > self.capacity:
            raise ValueError(f"KV cache is full ({self.end} + {L} > capacity {self.capacity}); trim it first")
        self.pos[:, start:end] = q_pos
        if key_keep is None:
            self.keep[:, start:end] = True
        else:
            self.keep[:, start:end] = key_keep
            self.padded = self.padded or not bool(key_keep.all())
        self._set_next(q_pos)
        self._start, self.end = start, end
        return self.pos[:, :end], (self.keep[:, :end] if self.padded else None)

    def _prepare_static(self, q_pos, key_keep, L):
        idx = self._slot + torch.arange(L, device=self.pos.device)
        B = self.batch
        self.pos.index_copy_(1, idx, q_pos.expand(B, L))
        keep = torch.ones(B, L, dtype=torch.bool, device=q_pos.device) if key_keep is None else key_keep
        self.keep.index_copy_(1, idx, keep)
        self._set_next(q_pos)
        self._idx = idx
        self._slot.add_(L)
        return self.pos, self.keep

    def record(self, ids: torch.Tensor) -> None:
        """Remember the token ids about to be written (needed to refill the window when trimming)."""
        if self.tokens is None:
            return
        L = ids.shape[1]
        if self.static:
            self.tokens.index_copy_(1, self._slot + torch.arange(L, device=ids.device), ids)
        else:
            self.tokens[:, self.end:self.end + L] = ids

    def _set_next(self, q_pos: torch.Tensor) -> None:
        # a new tensor, not an in-place write: the caller's q_pos may be a view of next_pos
        nxt = q_pos[:, -1] + 1
        self.next_pos = nxt if nxt.shape[0] == self.batch else nxt.expand(self.batch).contiguous()

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H_kv, L, Dh) of the new tokens; return every cached K, V of this layer."""
        i = layer_idx - self.layer_offset
        kb, vb = self.k[i], self.v[i]
        if self.static:
            kb.index_copy_(2, self._idx, k)
            vb.index_copy_(2, self._idx, v)
            return kb, vb
        kb[:, :, self._start:self.end] = k
        vb[:, :, self._start:self.end] = v
        return kb[:, :, :self.end], vb[:, :, :self.end]

    # ---- bookkeeping used by the generation loop ---------------------------------------------
    def sync(self) -> None:
        """Static mode: bring the Python-side ``end`` in line with the tensor slot (after compiled steps)."""
        if self.static:
            self.end = int(self._slot)

    def _set_end(self, end: int) -> None:
        self.end = end
        if self.static:
            self._slot.fill_(end)
            self.keep[:, end:] = False

    def rewind(self, end: int) -> None:
        """Forget the slots after ``end`` (rejected speculative tokens). ``next_pos`` follows."""
        self.sync()
        if not 0 <= end <= self.end:
            raise ValueError(f"cannot rewind to {end}: the cache holds {self.end} slots")
        if end < self.end:
            self.next_pos = self.pos[:, end - 1] + 1 if end else self.next_pos - (self.end - end)
            self._set_end(end)

    def trim(self, n: int) -> None:
        """Keep the last ``n`` filled slots of every row (seed: k[:, :, -n:, :])."""
        self.sync()
        if n >= self.end:
            return
        if n < 1:
            raise ValueError(f"trim keeps at least one token, not {n}")
        lo, hi = self.end - n, self.end
        for buf in (*self.k, *self.v):
            buf[:, :, :n] = buf[:, :, lo:hi].clone()
        for buf in (self.pos, self.keep, self.tokens):
            if buf is not None:
                buf[:, :n] = buf[:, lo:hi].clone()
        self._set_end(n)
        self.padded = not bool(self.keep[:, :n].all())

    def reset(self) -> None:
        self._set_end(0)
        self.keep.zero_()
        self.padded = False
        self.model_state = None

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row r now continues old row index[r]."""
        for buf in (*self.k, *self.v, self.pos, self.keep, self.tokens):
            if buf is not None:
                buf.copy_(buf.index_select(0, index))
        self.next_pos = self.next_pos.index_select(0, index)
        if self.model_state is not None:
            self.model_state = self.model_state.select(index)

    # ---- rows joining and leaving (continuous batching) --------------------------------------
    def free_row(self, row: int) -> None:
        """Retire a row: none of its slots is attended to any more; it can be reused by insert_row."""
        self.keep[row] = False
        self.padded = True

    def _shift_right(self, d: int) -> None:
        """Move every row's slots d places right (left padding grows), to make room for a longer row."""
        if self.end + d > self.capacity:
            raise ValueError(f"no room to shift the cache by {d} (end {self.end}, capacity {self.capacity})")
        for buf in (*self.k, *self.v):
            buf[:, :, d:self.end + d] = buf[:, :, :self.end].clone()
        for buf in (self.pos, self.keep, self.tokens):
            if buf is not None:
                buf[:, d:self.end + d] = buf[:, :self.end].clone()
        self.keep[:, :d] = False
        self._set_end(self.end + d)
        self.padded = True

    def insert_row(self, row: int, other: "StaticKVCache", other_row: int = 0) -> None:
        """Copy row ``other_row`` of a prefilled cache into ``row``, aligned so both end at ``end``."""
        other.sync()
        n = other.end
        if n > self.end:
            self._shift_right(n - self.end)
        lo = self.end - n
        for mine, theirs in zip((*self.k, *self.v), (*other.k, *other.v)):
            mine[row].zero_()
            mine[row, :, lo:self.end] = theirs[other_row, :, :n]
        self.keep[row] = False
        self.keep[row, lo:self.end] = other.keep[other_row, :n]
        self.pos[row, lo:self.end] = other.pos[other_row, :n]
        if self.tokens is not None and other.tokens is not None:
            self.tokens[row, lo:self.end] = other.tokens[other_row, :n]
        self.next_pos[row] = other.next_pos[other_row]
        if self.model_state is not None and other.model_state is not None:
            self.model_state.copy_row_(row, other.model_state, other_row)
        if self.static:
            self._set_end(self.end)
        self.padded = True
