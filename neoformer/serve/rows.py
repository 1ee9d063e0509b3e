"""Per-row KV slots for continuous batching, seen by the model through the cache protocol.

The generation engine's ``StaticKVCache`` shares one write pointer between rows (rows are left
padded to end together). A server's rows come and go at any moment, so here every row owns its
slots from 0: row b's tokens sit in slots [0, length[b]) of its own row, whatever the other rows
hold. Two small views implement ``model/state.py``'s protocol over the shared buffers:

- :class:`PrefillChunk`: one request's prompt chunk (batch 1) written into its row;
- :class:`DecodeStep`: one new token for *every* row at its own slot.

Batch invariance (a request's tokens do not depend on its neighbours): on this CPU a GEMM row's
bits change with the number of rows M (MKL picks kernels by M; they do not change with the other
rows' values or a row's place), so a decode step runs all ``rows`` rows, idle ones included, and
a prefill is always one request alone with fixed chunk boundaries. Attention reads a window of the first ``width`` slots; keys past a row's length are
masked, and a masked key adds an exact zero, so the window's size does not change a row's result
(tests/test_serve.py checks the whole property end to end).
"""
from __future__ import annotations

from typing import Any

import torch


def window(n: int, capacity: int, step: int = 64) -> int:
    """Slots attention reads: n rounded up to a multiple of step (fewer distinct shapes), at most capacity."""
    return min(-(-n // step) * step, capacity)


class RowSlots:
    """K/V buffers (rows, H_kv, capacity, Dh) per self-attention layer, slot positions and keep flags."""

    def __init__(self, model, rows: int, capacity: int):
        cfg, layers = model.config, model.cache_layers
        weight = next(model.parameters())
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        shape = (rows, cfg.resolved_n_kv_heads, capacity, cfg.resolved_head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in layers]
        self.pos = torch.zeros(rows, capacity, dtype=torch.long, device=weight.device)
        self.keep = torch.zeros(rows, capacity, dtype=torch.bool, device=weight.device)
        self.rows, self.capacity, self.layer_offset = rows, capacity, layers.start
        self.model_state: Any = None  # the batch's model-owned state (RMC summary), all rows

    def clear_row(self, row: int) -> None:
        self.keep[row] = False

    def join_state(self, row: int, state: Any) -> None:
        """A request that finished its prefill brings its own model state into the batch."""
        if state is None:
            return
        if self.model_state is None:  # first one: a batch-shaped state built through the state hooks
            self.model_state = state.select(torch.zeros(self.rows, dtype=torch.long, device=self.pos.device))
        self.model_state.copy_row_(row, state, 0)


class PrefillChunk:
    """Prompt tokens [start, start + L) of one request, written into ``row`` (batch 1)."""

    def __init__(self, slots: RowSlots, row: int, start: int, model_state: Any):
        self.slots, self.row, self.start = slots, row, start
        self.model_state = model_state  # the request's own state while it is being prefilled

    def record(self, ids: torch.Tensor) -> None:  # engine.forward_tokens hook (token tracking): unused here
        pass

    def prepare(self, q_pos: torch.Tensor, new_keep: torch.Tensor | None):
        s, r, lo = self.slots, self.row, self.start
        hi = lo + q_pos.shape[-1]
        s.pos[r, lo:hi] = q_pos[0]
        s.keep[r, lo:hi] = True
        self.width, self.hi = window(hi, s.capacity), hi
        return s.pos[r:r + 1, :self.width], s.keep[r:r + 1, :self.width]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        i, r = layer_idx - self.slots.layer_offset, self.row
        kb, vb = self.slots.k[i], self.slots.v[i]
        kb[r:r + 1, :, self.start:self.hi] = k
        vb[r:r + 1, :, self.start:self.hi] = v
        return kb[r:r + 1, :, :self.width], vb[r:r + 1, :, :self.width]


class DecodeStep:
    """One token for each of the first ``n`` rows: row b writes slot ``lengths[b]`` at position ``lengths[b]``.

    Rows that are idle or still prefilling take part with a dummy token: they write the slot their
    next real token will overwrite (its keep flag is set by that write), so nothing of theirs is lost."""

    def __init__(self, slots: RowSlots, lengths: torch.Tensor, width: int, n: int):
        self.slots, self.lengths, self.width, self.n = slots, lengths[:n], width, n
        self.rows = torch.arange(n, device=lengths.device)

    @property
    def model_state(self):
        return self.slots.model_state

    @model_state.setter
    def model_state(self, state):
        self.slots.model_state = state

    def record(self, ids: torch.Tensor) -> None:
        pass

    def prepare(self, q_pos: torch.Tensor, new_keep: torch.Tensor | None):
        s, n = self.slots, self.n
        s.pos[self.rows, self.lengths] = q_pos[:, 0]
        s.keep[self.rows, self.lengths] = True
        return s.pos[:n, :self.width], s.keep[:n, :self.width]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        i, n = layer_idx - self.slots.layer_offset, self.n
        kb, vb = self.slots.k[i], self.slots.v[i]
        kb[self.rows, :, self.lengths] = k[:, :, 0]
        vb[self.rows, :, self.lengths] = v[:, :, 0]
        return kb[:n, :, :self.width], vb[:n, :, :self.width]


class CrossSlots:
    """Encoder-decoder: every row's cross-attention K/V of its source, padded to ``capacity`` source tokens."""

    def __init__(self, model, rows: int, capacity: int):
        cfg = model.config
        weight = next(model.parameters())
        shape = (rows, cfg.resolved_n_kv_heads, capacity, cfg.resolved_head_dim)
        n = len(model.cache_layers)
        self.layers = [(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                        torch.zeros(shape, dtype=weight.dtype, device=weight.device)) for _ in range(n)]
        self.src_mask = torch.zeros(rows, capacity, dtype=torch.long, device=weight.device)

    def put(self, row: int, memory) -> None:
        """Row ``row`` attends to ``memory`` (a one-row CrossKV of S source tokens)."""
        S = memory[0][0].shape[2]
        for (k, v), (mk, mv) in zip(self.layers, memory.layers):
            k[row].zero_()
            v[row].zero_()
            k[row, :, :S] = mk[0]
            v[row, :, :S] = mv[0]
        self.src_mask[row] = 0
        self.src_mask[row, :S] = 1

    def rows(self, rows: slice):
        """(CrossKV, src_mask) views of some rows."""
        from ..model.transformer import CrossKV

        return CrossKV([(k[rows], v[rows]) for k, v in self.layers]), self.src_mask[rows]
