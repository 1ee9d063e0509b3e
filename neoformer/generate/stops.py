"""Stop strings: the one place that decides when generated text has reached one, and where to cut.

A stop string is text, not tokens: it can end in the middle of a token or span several, so each
row's recent tokens are decoded and searched. Used by the batch loop (api.token_stream), speculative
decoding, the cut of returned tokens, and text streaming (api.stream_text).
"""
from __future__ import annotations

from typing import Sequence

import torch


class StopStrings:
    """Finishes a row once its generated text contains one of ``stops``."""

    def __init__(self, stops: Sequence[str], tokenizer, batch: int = 1):
        self.stops, self.tokenizer = tuple(stops), tokenizer
        self.window = 4 * max(len(s) for s in self.stops) + 4  # tokens enough to hold the longest stop string
        self.generated: list[list[int]] = [[] for _ in range(batch)]

    def push(self, token: int, row: int = 0) -> bool:
        """Add one generated token of ``row``; True when the row's text now contains a stop string."""
        self.generated[row].append(token)
        tail = self.tokenizer.decode(self.generated[row][-self.window:])
        return any(s in tail for s in self.stops)

    def update(self, tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """One step of a batch: ``tokens`` (B,) -> (B,) bool, True where a row just hit a stop string."""
        hit = torch.zeros_like(finished)
        for row, tok in enumerate(tokens.tolist()):
            if not finished[row]:
                hit[row] = self.push(tok, row)
        return hit

    def cut_tokens(self, tokens: list[int]) -> list[int]:
        """``tokens`` up to and including the one that completed a stop string (all of them if none did)."""
        checker = StopStrings(self.stops, self.tokenizer)
        for i, tok in enumerate(tokens):
            if checker.push(tok):
                return tokens[:i + 1]
        return tokens


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (without) the earliest stop string."""
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def held_back(stops: Sequence[str]) -> int:
    """Characters a text stream must hold back: they may be the start of a stop string."""
    return max((len(s) for s in stops), default=1) - 1


__all__ = ["StopStrings", "cut_at_stop", "held_back"]
