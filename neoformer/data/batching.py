"""Padding, length bucketing ("dynamic batching"), and the resumable epoch sampler they share.

Bucketing shuffles the examples, sorts each window of ``sort_window`` examples by length and
cuts it into batches, then shuffles the batches: batches hold similar lengths (little padding)
while the order of batches stays random. A token budget instead fills each batch until
``batch_size * longest_length`` would exceed ``max_tokens``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from ..config import IGNORE_INDEX  # noqa: F401  (re-exported: the label value the loss skips)
from .sources import DataError


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, length: int | None = None) -> torch.Tensor:
    """(B, L) int64 tensor, right-padded with ``pad_value`` to ``length`` (default: the longest)."""
    length = max((len(s) for s in seqs), default=0) if length is None else length
    out = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): right-padded ids and a bool mask that is True on real tokens."""
    ids = pad_sequences(seqs, pad_id)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, torch.arange(ids.shape[1]) < lengths[:, None]


def padding_ratio(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Fraction of a padded batch's positions that are padding, over all ``batches``."""
    lengths = np.asarray(lengths)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    real = sum(int(lengths[b].sum()) for b in batches if len(b))
    return 1 - real / padded if padded else 0.0


def _sorted_windows(lengths: np.ndarray, sort_window: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    windows = [order[i : i + sort_window] for i in range(0, len(order), sort_window)]
    return [w[np.argsort(lengths[w], kind="stable")] for w in windows]


def _shuffled(batches: list[np.ndarray], rng: np.random.Generator | None) -> list[np.ndarray]:
    return [batches[i] for i in rng.permutation(len(batches))] if rng is not None else batches


def bucket_batches(
    lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0,
    sort_window: int | None = None, shuffle: bool = True,
) -> list[np.ndarray]:  # fmt: skip
    """Batches of ``batch_size`` example indices of similar length (the last may be smaller)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    batches = []
    for window in _sorted_windows(lengths, sort_window or 100 * batch_size, rng):
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    return _shuffled(batches, rng)


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, seed: int = 0, epoch: int = 0,
    sort_window: int | None = None, shuffle: bool = True,
) -> list[np.ndarray]:  # fmt: skip
    """Batches whose padded size (count x longest) stays within ``max_tokens``.

    An example longer than ``max_tokens`` gets a batch of its own; truncate beforehand to avoid it.
    """
    lengths = np.asarray(lengths)
    if max_tokens < 1:
        raise DataError(f"max_tokens must be at least 1, got {max_tokens}")
    typical_batch = max(1, max_tokens // max(1, int(np.median(lengths)) if len(lengths) else 1))
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    batches = []
    for window in _sorted_windows(lengths, sort_window or 100 * typical_batch, rng):
        start, longest = 0, 0
        for end, index in enumerate(window):
            longest = max(longest, int(lengths[index]))
            if end > start and (end - start + 1) * longest > max_tokens:
                batches.append(window[start:end])
                start, longest = end, int(lengths[index])
        if start < len(window):
            batches.append(window[start:])
    return _shuffled(batches, rng)


def shard(items: Sequence, rank: int, world_size: int) -> Sequence:
    """This rank's equal, disjoint slice of ``items``; the last ``len % world_size`` are left out."""
    per_rank = len(items) // world_size
    return items[rank * per_rank : (rank + 1) * per_rank]


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")


def check_state_kind(state: dict, sampler: object) -> None:
    """Refuse a state saved by another kind of sampler (it would resume somewhere else)."""
    if state.get("kind") != type(sampler).__name__:
        raise DataError(f"sampler state is for {state.get('kind')}, not {type(sampler).__name__}; use the same sampler")


class EpochSampler(ABC):
    """Iterates this rank's batches of one epoch after another, forever.

    ``plan(epoch)`` is a pure function of (seed, epoch, rank, world_size), so the state is just
    ``{"epoch", "batch"}``: saving it mid-epoch and loading it into a fresh sampler replays the
    exact same batches from there.
    """

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1):
        check_rank(rank, world_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.batch = 0, 0
        self._cached_plan: tuple[int, Sequence[np.ndarray]] | None = None

    @abstractmethod
    def plan(self, epoch: int) -> Sequence[np.ndarray]:
        """This rank's batches (arrays of indices or offsets) for ``epoch``."""

    def _plan_of(self, epoch: int) -> Sequence[np.ndarray]:
        if self._cached_plan is None or self._cached_plan[0] != epoch:
            plan = self.plan(epoch)
            if not len(plan):
                name = type(self).__name__
                raise DataError(f"{name} has no full batch per epoch; lower the batch size or add data")
            self._cached_plan = (epoch, plan)
        return self._cached_plan[1]

    def __len__(self) -> int:
        """Batches in the current epoch."""
        return len(self._plan_of(self.epoch))

    def next_indices(self) -> np.ndarray:
        if self.batch >= len(self._plan_of(self.epoch)):
            self.epoch, self.batch = self.epoch + 1, 0
        indices = self._plan_of(self.epoch)[self.batch]
        self.batch += 1
        return indices

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_indices()

    def state_dict(self) -> dict:
        return {"kind": type(self).__name__, "seed": self.seed, "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        check_state_kind(state, self)
        self.seed, self.epoch, self.batch = int(state["seed"]), int(state["epoch"]), int(state["batch"])
        self._cached_plan = None


class BucketSampler(EpochSampler):
    """Length-bucketed batches of example indices: by count (``batch_size``) or by ``max_tokens``."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int | None = None, max_tokens: int | None = None,
        seed: int = 0, rank: int = 0, world_size: int = 1, sort_window: int | None = None,
    ):  # fmt: skip
        if (batch_size is None) == (max_tokens is None):
            raise DataError("BucketSampler takes exactly one of batch_size or max_tokens")
        super().__init__(seed, rank, world_size)
        self.lengths, self.sort_window = np.asarray(lengths), sort_window
        self.batch_size, self.max_tokens = batch_size, max_tokens

    def plan(self, epoch: int) -> Sequence[np.ndarray]:
        if self.batch_size is not None:
            batches = bucket_batches(self.lengths, self.batch_size, self.seed, epoch, self.sort_window)
        else:
            batches = token_budget_batches(self.lengths, self.max_tokens, self.seed, epoch, self.sort_window)
        return shard(batches, self.rank, self.world_size)
