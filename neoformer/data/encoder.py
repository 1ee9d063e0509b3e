"""Encoder (masked-LM) data: BERT masking and packed variable-length batches.

Masking follows BERT (Devlin et al. 2019): select ``mask_prob`` (15%) of the maskable tokens;
of those, 80% become ``<mask>``, 10% a random ordinary token, 10% stay. Labels are the original
ids at selected positions and -100 elsewhere. Special tokens (pad, EOS, BOS, mask, unk) are never
selected, and random replacements are never special.

Packing (NeoBERT / flash-attn varlen): documents are concatenated into one row of shape
(1, total) with ``cu_seqlens`` = [0, len0, len0 + len1, ...] (int32) and ``max_seqlen``, so no
position is padding and attention stays inside each document.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .batching import IGNORE_INDEX
from .pipelines import TokenizedCorpus
from .sources import DataError


class MLMMasker:
    """Seeded BERT masking; ``masker(ids) -> (inputs, labels)`` for ids of any shape."""

    def __init__(
        self, vocab_size: int, mask_id: int | None, special_ids: Iterable[int], mask_prob: float = 0.15, seed: int = 0
    ):
        if mask_id is None:
            raise DataError("this tokenizer has no mask token; MLM needs one (use a bpe or sentencepiece tokenizer)")
        if not 0 < mask_prob < 1:
            raise DataError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.vocab_size, self.mask_id, self.mask_prob = vocab_size, mask_id, mask_prob
        self.special_ids = torch.tensor(sorted({*special_ids, mask_id}), dtype=torch.long)
        ordinary = torch.ones(vocab_size, dtype=torch.bool)
        ordinary[self.special_ids] = False
        self._replacements = ordinary.nonzero().flatten()  # random tokens are drawn from these
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, mask_prob: float = 0.15, seed: int = 0) -> "MLMMasker":
        return cls(tokenizer.vocab_size, tokenizer.mask_id, tokenizer.special_ids, mask_prob, seed)

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        maskable = ~torch.isin(input_ids, self.special_ids)
        draw = torch.rand(input_ids.shape, generator=self.generator)
        selected = maskable & (draw < self.mask_prob)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        action = torch.rand(input_ids.shape, generator=self.generator)  # < 0.8 mask, < 0.9 random, else keep
        inputs = input_ids.clone()
        inputs[selected & (action < 0.8)] = self.mask_id
        randomize = selected & (action >= 0.8) & (action < 0.9)
        picks = torch.randint(len(self._replacements), (int(randomize.sum()),), generator=self.generator)
        inputs[randomize] = self._replacements[picks]
        return inputs, labels

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def document_chunks(corpus: TokenizedCorpus, max_len: int) -> list[np.ndarray]:
    """Every document (without its EOS) cut into pieces of at most ``max_len`` tokens."""
    if max_len < 1:
        raise DataError(f"max_len must be at least 1, got {max_len}")
    return [doc[i : i + max_len] for doc in corpus.documents() for i in range(0, len(doc), max_len) if len(doc)]


@dataclass
class PackedBatch:
    """Sequences concatenated into one row: ``input_ids`` (1, total), ``cu_seqlens`` (n + 1,) int32."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_sequences(self) -> int:
        return len(self.cu_seqlens) - 1


def pack_sequences(seqs: Sequence[Sequence[int]]) -> PackedBatch:
    lengths = [len(s) for s in seqs]
    if not seqs or min(lengths) == 0:
        raise DataError("pack_sequences needs one or more non-empty sequences")
    ids = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]))[None]
    cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return PackedBatch(ids, cu_seqlens, max(lengths))


def packed_batches(seqs: Iterable[Sequence[int]], max_tokens: int) -> Iterator[PackedBatch]:
    """Greedily pack sequences (each at most ``max_tokens`` long) into rows of at most ``max_tokens``."""
    row: list[Sequence[int]] = []
    used = 0
    for seq in seqs:
        if len(seq) > max_tokens:
            raise DataError(f"a sequence of {len(seq)} tokens exceeds max_tokens={max_tokens}; chunk documents first")
        if not len(seq):
            continue
        if used + len(seq) > max_tokens:
            yield pack_sequences(row)
            row, used = [], 0
        row.append(seq)
        used += len(seq)
    if row:
        yield pack_sequences(row)
