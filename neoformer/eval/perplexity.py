"""Perplexity and bits per byte of text, with a sliding window for documents longer than the model's context.

Bits per byte (bpb) = total negative log-likelihood in bits / UTF-8 bytes of the text. Unlike
per-token perplexity it does not depend on the tokenizer, so models with different vocabularies
(e.g. before and after vocabulary reduction) compare directly.

Each document is scored on its own: its first token after the prefix token (BOS, else EOS), then
windows of at most ``max_length`` tokens. ``stride`` is how many new tokens each window scores: the
default (``max_length``) gives disjoint windows (lm-eval's rolling log-likelihood); a smaller
stride gives every scored token at least ``max_length - stride`` tokens of context, at the cost
of ``max_length / stride`` times more compute.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

from .scoring import rolling_windows, window_logprobs


@dataclass
class TextScore:
    nll: float  # total negative log-likelihood, nats
    tokens: int
    bytes: int
    documents: int

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def prefix_token(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_id", None)
    return bos if bos is not None else tokenizer.eos_id


def score_text(model, tokenizer, documents: Iterable[str], *, stride: int | None = None, batch_size: int = 16,
               max_length: int | None = None, limit: int | None = None) -> TextScore:
    """Negative log-likelihood, token and byte counts of ``documents`` (see the module notes)."""
    max_length = max_length or model.config.max_seq_len
    pairs, n_bytes, n_tokens, n_docs = [], 0, 0, 0
    for text in documents:
        if limit is not None and n_docs >= limit:
            break
        ids = tokenizer.encode(text)
        if not ids:
            continue
        pairs.extend(rolling_windows(ids, prefix_token(tokenizer), max_length, stride))
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
        n_docs += 1
    if not n_docs:
        raise ValueError("no text to score (every document is empty)")
    pad = getattr(tokenizer, "pad_id", None)
    scores = window_logprobs(model, pairs, batch_size=batch_size, max_length=max_length,
                             pad_id=pad if pad is not None else tokenizer.eos_id)
    return TextScore(-sum(scores), n_tokens, n_bytes, n_docs)


__all__ = ["TextScore", "score_text", "prefix_token"]
