"""Logits processors and token choice, as small pure functions on (B, V) float logits.

Semantics follow Hugging Face transformers (``RepetitionPenaltyLogitsProcessor``,
``NoRepeatNGramLogitsProcessor``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``MinPLogitsWarper``), applied in the same order; tests compare them.
Filtered tokens get -inf.
"""
from __future__ import annotations

import torch

from .config import GenerationConfig

NEG_INF = float("-inf")


# ---- processors that look at the history ----------------------------------------------------
def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty: for tokens already in the sequence, logit < 0 -> logit * p, else logit / p.
    seen (B, V) bool marks those tokens (prompt included, as in HF)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


class NGramTracker:
    """No-repeat n-gram: per row, the tokens that followed each (n-1)-gram so far, updated
    incrementally (HF recomputes them from the whole sequence every step)."""

    def __init__(self, n: int, histories: list[list[int]]):
        self.n = n
        self.histories = [list(h) for h in histories]
        self.banned: list[dict[tuple, set]] = [{} for _ in histories]
        for row, h in enumerate(self.histories):
            for end in range(n, len(h) + 1):
                self._add(row, h[end - n:end])

    def _add(self, row: int, gram: list[int]) -> None:
        self.banned[row].setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def append(self, tokens: list[int]) -> None:
        for row, tok in enumerate(tokens):
            h = self.histories[row]
            h.append(tok)
            if len(h) >= self.n:
                self._add(row, h[-self.n:])

    def reorder(self, index: list[int]) -> None:
        """Beam search: row r continues old row index[r]."""
        self.histories = [list(self.histories[i]) for i in index]
        self.banned = [{k: set(v) for k, v in self.banned[i].items()} for i in index]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        n = self.n
        rows, cols = [], []
        for row, h in enumerate(self.histories):
            if len(h) + 1 < n:
                continue
            key = tuple(h[len(h) - n + 1:]) if n > 1 else ()
            for tok in self.banned[row].get(key, ()):
                rows.append(row)
                cols.append(tok)
        if rows:
            logits = logits.clone()
            logits[rows, cols] = NEG_INF
        return logits


# ---- warpers (sampling only) -----------------------------------------------------------------
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep tokens whose logit is >= the k-th largest (ties kept, as in HF)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability >= min_p * (probability of the most likely token)."""
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def warp(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p (HF order). Only for sampling."""
    if cfg.temperature is not None and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


class History:
    """What the history-dependent processors need: tokens seen per row (repetition penalty) and
    n-gram tables (no-repeat n-gram). Empty and free when neither option is on."""

    def __init__(self, cfg: GenerationConfig, prompts: list[list[int]], vocab_size: int, device):
        self.penalty = cfg.repetition_penalty if cfg.repetition_penalty not in (None, 1.0) else None
        self.seen = None
        if self.penalty is not None:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                if ids:
                    self.seen[row, ids] = True
        self.ngrams = NGramTracker(cfg.no_repeat_ngram_size, prompts) if cfg.no_repeat_ngram_size else None

    @property
    def active(self) -> bool:
        return self.seen is not None or self.ngrams is not None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen is not None:
            logits = repetition_penalty(logits, self.seen, self.penalty)
        if self.ngrams is not None:
            logits = self.ngrams.apply(logits)
        return logits

    def append(self, tokens: torch.Tensor) -> None:
        """tokens (B,) chosen this step."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.ngrams is not None:
            self.ngrams.append(tokens.tolist())

    def reorder(self, index: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        if self.ngrams is not None:
            self.ngrams.reorder(index.tolist())


def process(logits: torch.Tensor, cfg: GenerationConfig, history: History | None) -> torch.Tensor:
    """Raw (B, V) logits -> the logits the next token is drawn from (fp32)."""
    logits = logits.float()
    if history is not None and history.active:
        logits = history.apply(logits)
    if cfg.sampling:
        logits = warp(logits, cfg)
    return logits


def choose(logits: torch.Tensor, sampling: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Processed (B, V) logits -> next tokens (B,): argmax, or a draw from softmax(logits)."""
    if not sampling:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
