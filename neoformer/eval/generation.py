"""Greedy ``generate_until`` for a batch of prompts, with less prefill work than a padded batch.

``neoformer.generate`` left-pads a batch and runs the whole padded block through the model. An
evaluation batch usually has more structure:

- the prompts often share a prefix (a task's fixed few-shot examples or instructions): it is read
  once, at batch 1, and its KV rows are copied to every prompt;
- the rest of each prompt runs without padding or an attention mask: prompts with the same
  remaining length go together, each group continues its own copy of the prefix cache, and the
  rows are then placed, right-aligned, into one batched cache (``StaticKVCache.insert_row``, as
  the server's continuous batching does).

Decoding is then the engine's one-token step (``decode_one``) over every row, greedy, with
per-row EOS and stop strings (``StopStrings``) and an early end when every row is done. The
tokens equal ``neoformer.generate``'s greedy tokens (tests/test_eval_harness.py checks it).
Models that keep state beside the KV cache (NeoFormer-X's RMC summary) use ``generate`` itself.
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch

from ..generate.cache import StaticKVCache
from ..generate.engine import decode_one, prefill
from ..generate.stops import StopStrings, cut_at_stop
from .scoring import _expand


def shared_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest prefix every prompt shares, leaving each at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    prefix = os.path.commonprefix(prompts) if len(prompts) > 1 else []
    return min(len(prefix), shortest - 1)


def _prefill_rows(model, prompts: list[list[int]], capacity: int) -> tuple[StaticKVCache, torch.Tensor]:
    """A (B, capacity) cache holding every prompt right-aligned, and the logits (B, V) of each
    prompt's last token."""
    device = next(model.parameters()).device
    n_shared = shared_prefix(prompts)
    base = None
    if n_shared:
        base = StaticKVCache.for_model(model, 1, capacity)
        prefill(model, base, torch.tensor([prompts[0][:n_shared]], device=device),
                torch.arange(n_shared, device=device)[None])
    by_length: dict[int, list[int]] = defaultdict(list)
    for row, prompt in enumerate(prompts):
        by_length[len(prompt)].append(row)
    cache = StaticKVCache.for_model(model, len(prompts), capacity)
    logits = None
    for length in sorted(by_length, reverse=True):  # longest first: later rows fit without shifting
        rows = by_length[length]
        if base is not None:
            part = _expand(base, torch.zeros(len(rows), dtype=torch.long, device=device))
        else:
            part = StaticKVCache.for_model(model, len(rows), length)
        ids = torch.tensor([prompts[r][n_shared:] for r in rows], device=device)
        last = prefill(model, part, ids, torch.arange(n_shared, length, device=device)[None])
        if logits is None:
            logits = last.new_empty(len(prompts), last.shape[-1])
        logits[rows] = last
        for i, row in enumerate(rows):
            cache.insert_row(row, part, i)
    return cache, logits


@torch.inference_mode()
def greedy_until(model, tokenizer, prompts: list[list[int]], max_new: int, stops: list[str], eos_id: int) -> list[str]:
    """Greedy continuation text of every prompt, cut before the first stop string, EOS dropped."""
    if max_new < 1:
        return [""] * len(prompts)
    cache, logits = _prefill_rows(model, prompts, max(len(p) for p in prompts) + max_new)
    B = len(prompts)
    stop = StopStrings(stops, tokenizer, B) if stops else None
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    steps = []
    for step in range(max_new):
        tok = logits.argmax(-1).masked_fill(finished, eos_id)  # a finished row repeats EOS (dropped below)
        steps.append(tok)
        finished |= tok == eos_id
        if stop is not None:
            finished |= stop.update(tok, finished)
        if step == max_new - 1 or bool(finished.all()):
            break
        logits = decode_one(model, cache, tok)
    rows = torch.stack(steps, dim=1).tolist()
    texts = []
    for row in rows:
        end = row.index(eos_id) if eos_id in row else len(row)
        texts.append(cut_at_stop(tokenizer.decode(row[:end]), stops))
    return texts


def keeps_model_state(model) -> bool:
    """True for models with state beside the KV cache (RMC): rows cannot be copied between caches here."""
    return bool(getattr(model.config, "rmc", False))


__all__ = ["greedy_until", "shared_prefix", "keeps_model_state"]
