"""Causal-LM windows over the packed token stream, and the samplers that pick them.

Documents are packed: the cached stream already holds every document followed by EOS, so a
window may span a document boundary, exactly as in GPT-2 / nanoGPT pretraining.

* :class:`RandomWindowSampler`: nanoGPT style, ``batch_size`` random offsets per step from a
  generator seeded by (seed, rank, step). State: the step.
* :class:`ShuffledWindowSampler`: epochs over non-overlapping windows, shuffled per epoch and
  shifted by a random offset per epoch (so boundaries move), sharded across ranks without
  overlap. State: (epoch, batch).
* :func:`sequential_batches`: every non-overlapping window once, in order, for evaluation.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .batching import EpochSampler, check_rank, check_state_kind, shard
from .pipelines import TokenizedCorpus
from .sources import DataError


class CausalWindows:
    """(X, Y) pairs of ``seq_len`` tokens, Y being X shifted by one, from a 1-D token array."""

    def __init__(self, tokens: np.ndarray | TokenizedCorpus, seq_len: int):
        tokens = tokens.tokens if isinstance(tokens, TokenizedCorpus) else tokens
        if seq_len < 1:
            raise DataError(f"seq_len must be at least 1, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"the corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "lower seq_len or add data"
            )
        self.tokens, self.seq_len = tokens, seq_len
        self._span = np.arange(seq_len + 1)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def num_windows(self, shift: int = 0) -> int:
        """Non-overlapping windows whose first start is ``shift``."""
        return max(0, (self.num_tokens - 1 - shift) // self.seq_len)

    def __len__(self) -> int:
        return self.num_windows()

    def batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """X, Y of shape (B, seq_len), int64, for windows beginning at token offsets ``starts``."""
        rows = np.asarray(self.tokens[np.asarray(starts, dtype=np.int64)[:, None] + self._span], dtype=np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequential window ``index`` as (x, y) of shape (seq_len,)."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range ({len(self)} windows)")
        x, y = self.batch(np.array([index * self.seq_len]))
        return x[0], y[0]


class ShuffledWindowSampler(EpochSampler):
    """Epochs of shuffled, non-overlapping windows; ranks get disjoint equal shares.

    Each epoch uses a random shift in [0, seq_len), then a permutation of the windows; rank r
    takes the r-th of ``world_size`` equal slices and cuts it into full batches. At most
    ``world_size * batch_size`` windows per epoch are left over, different ones each epoch.
    """

    def __init__(self, windows: CausalWindows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        self.windows, self.batch_size = windows, batch_size

    def plan(self, epoch: int) -> np.ndarray:
        """(num_batches, batch_size) token offsets of this rank's windows in ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(self.windows.seq_len))
        order = rng.permutation(self.windows.num_windows(shift))
        mine = shard(order, self.rank, self.world_size)
        num_batches = len(mine) // self.batch_size
        if num_batches == 0:
            per_rank = " per rank" if self.world_size > 1 else ""
            raise DataError(f"no full batch per epoch: {self.windows.num_tokens:,} tokens make {len(mine)} window(s) "
                            f"of seq_len {self.windows.seq_len}{per_rank} in epoch {epoch}, fewer than batch_size "
                            f"{self.batch_size}; lower --seq or --batch, or add data")
        window_numbers = mine[: num_batches * self.batch_size].reshape(num_batches, self.batch_size)
        return shift + window_numbers * self.windows.seq_len

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.batch(self.next_indices())


class RandomWindowSampler:
    """nanoGPT-style batches of random offsets; the state is the step count.

    Ranks draw from independent generators (seeded with their rank), so they see different
    windows; with random offsets, coverage is statistical rather than exact.
    """

    def __init__(self, windows: CausalWindows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        check_rank(rank, world_size)
        self.windows, self.batch_size = windows, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    def next_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        self.step += 1
        return rng.integers(0, self.windows.num_tokens - self.windows.seq_len, size=self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows.batch(self.next_indices())

    def state_dict(self) -> dict:
        return {"kind": type(self).__name__, "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        check_state_kind(state, self)
        self.seed, self.step = int(state["seed"]), int(state["step"])


SAMPLERS = {"shuffle": ShuffledWindowSampler, "random": RandomWindowSampler}


def make_sampler(
    windows: CausalWindows, batch_size: int, mode: str = "shuffle", seed: int = 0, rank: int = 0, world_size: int = 1
) -> ShuffledWindowSampler | RandomWindowSampler:
    """A training sampler by name: ``shuffle`` (epochs, exact coverage) or ``random`` (nanoGPT)."""
    if mode not in SAMPLERS:
        raise DataError(f"sampler mode must be one of {', '.join(SAMPLERS)}, not {mode!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    return SAMPLERS[mode](windows, batch_size, seed, rank, world_size)


def sequential_batches(
    windows: CausalWindows, batch_size: int, rank: int = 0, world_size: int = 1, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every non-overlapping window once, in order (rank r takes windows r, r + world_size, ...)."""
    check_rank(rank, world_size)
    starts = np.arange(len(windows))[rank::world_size] * windows.seq_len
    for number, first in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and number >= max_batches:
            return
        yield windows.batch(starts[first : first + batch_size])
