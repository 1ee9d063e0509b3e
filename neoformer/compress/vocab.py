"""Vocabulary reduction for byte-level BPE (the idea of Ushio et al. 2023, "vocabtrimmer").

Keep the ``K`` tokens most frequent on the user's data, plus every special token and all 256
single-byte tokens, so every string stays encodable. A kept token also keeps the tokens it is
merged from (its BPE ancestors): with a subset of the merges in their original order, a text whose
teacher tokens are all kept is split exactly as before, and a removed token's text falls back to
the shorter pieces (ultimately bytes) it was built from. The tokenizer.json is rewritten with
contiguous ids; the embedding and head keep the matching rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..tokenizer import HFTokenizer, Tokenizer
from .plan import CompressError
from .surgery import rebuild, state_of


@dataclass
class VocabReduction:
    tokenizer: HFTokenizer  # the student's
    kept: torch.Tensor  # (K,) teacher ids of the student's ids 0..K-1, ascending

    def to_teacher(self, ids: torch.Tensor) -> torch.Tensor:
        """Student ids -> the same tokens' teacher ids."""
        return self.kept.to(ids.device)[ids]


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def token_counts(tokenizer: Tokenizer, token_arrays) -> np.ndarray:
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for ids in token_arrays:
        counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=tokenizer.vocab_size)[:tokenizer.vocab_size]
    return counts


def must_keep(data: dict) -> set[str]:
    """Special tokens and the byte alphabet (one-character tokens of the byte-level model)."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    specials = {t["content"] for t in data.get("added_tokens", [])}
    return specials | {tok for tok in data["model"]["vocab"] if tok in alphabet}


def reduce_tokenizer(tokenizer: Tokenizer, counts: np.ndarray, size: int) -> VocabReduction:
    """The ``size``-token tokenizer that keeps the most frequent tokens (with their BPE ancestors)."""
    if not isinstance(tokenizer, HFTokenizer) or tokenizer._tok.pre_tokenizer is None:
        raise CompressError(f"--vocab needs a byte-level BPE teacher tokenizer (this one is {tokenizer.kind!r})")
    from tokenizers import Tokenizer as RustTokenizer

    data = json.loads(tokenizer._tok.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise CompressError("--vocab needs a byte-level BPE teacher tokenizer")
    vocab: dict[str, int] = {**model["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    required = must_keep(data)
    if size < len(required):
        raise CompressError(f"--vocab {size} is smaller than the special tokens plus the 256 single bytes "
                            f"({len(required)}); use at least {len(required)}")
    if size > len(vocab):
        raise CompressError(f"--vocab {size} is larger than the teacher's vocabulary ({len(vocab)})")
    merges = _merge_pairs(model)
    parents = {a + b: (a, b) for a, b in merges}
    keep = set(required)

    def closure(token: str) -> set[str]:
        todo, found = [token], set()
        while todo:
            t = todo.pop()
            if t in keep or t in found:
                continue
            found.add(t)
            todo.extend(parents.get(t, ()))
        return found

    by_id = {i: t for t, i in vocab.items()}
    for token_id in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        token = by_id.get(token_id)
        if token is None or token in keep:
            continue
        extra = closure(token)
        if len(keep) + len(extra) <= size:
            keep |= extra
        if len(keep) == size:
            break
    kept_ids = sorted(vocab[t] for t in keep)
    new_id = {by_id[old]: new for new, old in enumerate(kept_ids)}
    model["vocab"] = {t: new_id[t] for t in model["vocab"] if t in new_id}
    model["merges"] = [[a, b] for a, b in merges if a in new_id and b in new_id and a + b in new_id]
    for added in data.get("added_tokens", []):
        added["id"] = new_id[added["content"]]
    student = HFTokenizer(RustTokenizer.from_str(json.dumps(data)))
    return VocabReduction(student, torch.tensor(kept_ids, dtype=torch.long))


def slice_vocab(model: nn.Module, reduction: VocabReduction) -> nn.Module:
    """The model with only the kept rows of its embedding and head (and ids renumbered)."""
    cfg = model.config
    kept = reduction.kept
    state = state_of(model)
    for key in ("embed.tokens.weight", "lm_head.weight", "logit_scale"):
        if key in state:
            state[key] = state[key][kept]
    pad = cfg.pad_token_id
    if pad is not None:
        hits = (kept == pad).nonzero()
        pad = int(hits[0]) if len(hits) else reduction.tokenizer.pad_id
    return rebuild(cfg.replace(vocab_size=len(kept), pad_token_id=pad), state)


__all__ = ["VocabReduction", "reduce_tokenizer", "slice_vocab", "token_counts", "must_keep"]
