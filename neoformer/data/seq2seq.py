"""Sequence-to-sequence pairs: read (source, target) text, tokenize, collate padded batches.

A batch holds ``src_ids`` (B, S) = source + EOS, right-padded with pad; ``src_mask`` (B, S)
True on real tokens; ``tgt_in`` (B, T) = start + target (start is BOS, or EOS when the tokenizer
has no BOS, as in GPT-2); ``tgt_out`` (B, T) = target + EOS, padded with -100 so the loss skips
padding. Feed them to ``EncoderDecoderLM.loss(src_ids, tgt_in, tgt_out, src_mask)``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .batching import IGNORE_INDEX, pad_batch, pad_sequences
from .sources import DataError


def load_pairs(path: str | Path, source_field: str = "source", target_field: str = "target") -> list[tuple[str, str]]:
    """Pairs from JSONL (two fields per record) or a text file of ``source<TAB>target`` lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"seq2seq pair file not found: {path}")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                pairs.append((str(record[source_field]), str(record[target_field])))
            except (json.JSONDecodeError, KeyError, TypeError):
                fields = f"{source_field!r} and {target_field!r}"
                raise DataError(f"{where}: expected a JSON object with {fields}") from None
        else:
            source, tab, target = line.partition("\t")
            if not tab:
                raise DataError(f"{where}: expected 'source<TAB>target', found no tab")
            pairs.append((source, target))
    if not pairs:
        raise DataError(f"{path} holds no (source, target) pairs")
    return pairs


@dataclass
class Seq2SeqBatch:
    src_ids: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor


class Seq2SeqDataset:
    """Tokenized pairs; ``collate(indices)`` builds a padded batch, ``lengths`` feeds bucketing."""

    def __init__(
        self, pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer,
        max_source_len: int = 512, max_target_len: int = 512,
    ):  # fmt: skip
        if min(max_source_len, max_target_len) < 2:
            raise DataError("max_source_len and max_target_len must be at least 2 (a token plus EOS)")
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        self.start_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        sources = tokenizer.encode_batch([s for s, _ in pairs])
        targets = tokenizer.encode_batch([t for _, t in pairs])
        # room for EOS (source, target) and the start token (target input)
        self.examples = [(s[: max_source_len - 1], t[: max_target_len - 1]) for s, t in zip(sources, targets)]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> np.ndarray:
        """Padded cost of each example: the longer of its source and target (+1 for EOS / start)."""
        return np.array([max(len(s), len(t)) + 1 for s, t in self.examples])

    def collate(self, indices: Sequence[int]) -> Seq2SeqBatch:
        chosen = [self.examples[int(i)] for i in indices]
        src_ids, src_mask = pad_batch([[*s, self.eos_id] for s, _ in chosen], self.pad_id)
        tgt_in = pad_sequences([[self.start_id, *t] for _, t in chosen], self.pad_id)
        tgt_out = pad_sequences([[*t, self.eos_id] for _, t in chosen], IGNORE_INDEX)
        return Seq2SeqBatch(src_ids, src_mask, tgt_in, tgt_out)
