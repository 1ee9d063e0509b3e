"""``generate(model, input_ids, ...)`` and the streaming iterators built on the engine.

One loop serves greedy and sampling decoding for decoder-only and encoder-decoder models;
beam search (beam.py) and speculative decoding (speculative.py) plug in beside it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..kinds import get as model_kind
from .cache import StaticKVCache
from .config import GenerationConfig
from .engine import (Encoded, PromptBatch, as_prompts, bucket, compiled_decode_one, decode_one, left_pad, prefill,
                     trim_cache)
from .sampling import History, choose, make_generator, process
from .stops import StopStrings, cut_at_stop, held_back


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (N, T + new): left-padded prompt + generated tokens, pad after the end
    new_tokens: list[list[int]]  # generated tokens per sequence (EOS kept, padding dropped)
    texts: list[str] | None = None  # decoded new tokens, cut before a stop string (with a tokenizer)
    scores: torch.Tensor | None = None  # beam search: length-penalised log-probability per sequence
    stats: dict = field(default_factory=dict)  # prefill_s, decode_s, new_tokens, tokens_per_s, acceptance_rate


@dataclass
class Plan:
    """Everything fixed before the first step: options, prompts, window and trimming."""

    cfg: GenerationConfig
    batch: PromptBatch
    encoded: Encoded | None
    window: int  # tokens the cache may hold (context_window)
    keep_n: int  # tokens kept when trimming
    pad_id: int
    eos: torch.Tensor | None  # (n_eos,)

    def capacity(self, extra: int = 0) -> int:
        """Cache slots: prompt + new tokens (+ extra), at most the window."""
        return min(self.batch.ids.shape[1] + self.cfg.max_new_tokens + extra, self.window)


@torch.inference_mode()
def plan(model, input_ids, cfg: GenerationConfig, attention_mask=None, tokenizer=None) -> Plan:
    mcfg, cache_layout = model.config, model_kind(model).cache
    if not cache_layout.generates:
        raise ValueError(f"a model of kind {mcfg.kind!r} cannot generate; use a decoder or encoder-decoder model")
    if cfg.eos_token_id is None and tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
        cfg = dataclasses.replace(cfg, eos_token_id=tokenizer.eos_id)  # a copy: the caller's config is theirs
    if cfg.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (pass tokenizer=...)")
    eos_ids = cfg.eos_ids
    pad_id = next(i for i in (cfg.pad_token_id, mcfg.pad_token_id, *eos_ids, 0) if i is not None)
    device = next(model.parameters()).device
    prompts = as_prompts(input_ids, attention_mask)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    window = cfg.context_window or mcfg.max_seq_len
    if mcfg.position == "learned" and window > mcfg.max_seq_len:
        raise ValueError(f"context_window ({window}) exceeds the learned position table ({mcfg.max_seq_len})")
    keep_n = cfg.trim_keep or window // 2
    if keep_n >= window:
        raise ValueError(f"trim_keep ({keep_n}) must be smaller than the context window ({window})")
    encoded = None
    if cache_layout.cross_attention:  # encode the source once; the decoder starts from one start token
        if longest > mcfg.max_seq_len:
            raise ValueError(f"source of {longest} tokens is longer than the model takes ({mcfg.max_seq_len})")
        src = left_pad(prompts, pad_id, device)
        mask = src.keep.long() if src.keep is not None else None
        encoded = Encoded(model.cross_kv(model.encode(src.ids, mask)), mask)
        start = cfg.decoder_start_token_id
        if start is None:
            start = next(i for i in (mcfg.pad_token_id, getattr(tokenizer, "bos_id", None), 0) if i is not None)
        prompts = [[start] for _ in prompts]
    elif longest > window:
        raise ValueError(f"prompt of {longest} tokens is longer than the model can take without trimming "
                         f"(context window {window}); shorten the prompt")
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    for tok in eos_ids + [pad_id]:
        if not 0 <= tok < mcfg.vocab_size:
            raise ValueError(f"token id {tok} (eos/pad) is outside the vocabulary ({mcfg.vocab_size})")
    return Plan(cfg, left_pad(prompts, pad_id, device), encoded, window, keep_n, pad_id, eos)


def new_cache(model, p: Plan, batch: int, extra: int = 0, **kwargs) -> StaticKVCache:
    track = p.cfg.trim == "refill" or model.config.position == "learned"
    return StaticKVCache.for_model(model, batch, p.capacity(extra), track_tokens=track, **kwargs)


@torch.inference_mode()
def token_stream(model, p: Plan, generator=None, tokenizer=None, stats: dict | None = None) -> Iterator[torch.Tensor]:
    """Greedy / sampling loop: yields the next token of every row (B,) each step; rows that
    finished (EOS or stop string) get the pad id."""
    cfg, batch = p.cfg, p.batch
    stats = {} if stats is None else stats
    B = batch.ids.shape[0]
    if cfg.max_new_tokens == 0:
        return
    history = History(cfg, batch.prompts, model.config.vocab_size, batch.ids.device)
    compiled = cfg.compile and model_kind(model).compiled_decode
    if compiled:
        step_fn = compiled_decode_one(model, B)
        cache = StaticKVCache.for_model(model, B, bucket(p.capacity(), p.window), static=True,
                                        track_tokens=new_cache(model, p, 1).tokens is not None)
    else:
        cache = new_cache(model, p, B)
    stop = StopStrings(cfg.stop, tokenizer, B) if cfg.stop else None
    cap, sampling = cache.capacity, cfg.sampling
    t0 = time.perf_counter()
    logits = prefill(model, cache, batch.ids, batch.positions, batch.keep, p.encoded)
    stats["prefill_s"] = time.perf_counter() - t0
    finished = torch.zeros(B, dtype=torch.bool, device=batch.ids.device)
    any_finished, trims = False, 0
    t1 = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        tok = choose(process(logits, cfg, history), sampling, generator)
        if any_finished:
            tok = tok.masked_fill(finished, p.pad_id)
        yield tok
        if step == cfg.max_new_tokens - 1:
            break
        if history.active:
            history.append(tok)
        if p.eos is not None or stop is not None:
            if p.eos is not None:
                finished |= torch.isin(tok, p.eos)
            if stop is not None:
                finished |= stop.update(tok, finished)
            any_finished = bool(finished.any())
            if any_finished and bool(finished.all()):
                break
        if cache.end + 1 > cap:
            trim_cache(model, cache, p.keep_n, cfg.trim, p.encoded)
            trims += 1
        if compiled:
            logits = step_fn(model, cache, tok, cache.next_pos[:, None])
            cache.end += 1  # the compiled step moves only the tensor slot
        else:
            logits = decode_one(model, cache, tok, p.encoded)
    stats["decode_s"] = time.perf_counter() - t1
    stats["trims"] = trims


def _finish(p: Plan, steps: list[torch.Tensor], stats: dict, tokenizer, t0: float) -> GenerateOutput:
    batch = p.batch
    gen = torch.stack(steps, dim=1) if steps else batch.ids.new_zeros(batch.ids.shape[0], 0)
    new_tokens = [_cut(row, p) for row in gen.tolist()]
    for row, toks in enumerate(new_tokens):  # after a row ends, pad
        gen[row, len(toks):] = p.pad_id
    prefix = batch.ids if p.encoded is None else batch.ids[:, :1]
    sequences = torch.cat((prefix, gen), dim=1)
    texts = None
    if tokenizer is not None:
        texts = [cut_at_stop(tokenizer.decode(t), p.cfg.stop) for t in new_tokens]
    total = time.perf_counter() - t0
    n_new = sum(len(t) for t in new_tokens)
    stats.update(new_tokens=n_new, total_s=total, tokens_per_s=n_new / total if total > 0 else float("inf"))
    return GenerateOutput(sequences, new_tokens, texts, None, stats)


def _cut(row: list[int], p: Plan) -> list[int]:
    """Generated tokens of one row up to and including its first EOS."""
    eos = set(p.cfg.eos_ids)
    for i, tok in enumerate(row):
        if tok in eos:
            return row[:i + 1]
    return row


def _stop_cut(tokens: list[list[int]], p: Plan, tokenizer) -> list[list[int]]:
    """Stop strings: keep tokens up to the one that completed the stop string."""
    if not p.cfg.stop:
        return tokens
    checker = StopStrings(p.cfg.stop, tokenizer)
    return [checker.cut_tokens(toks) for toks in tokens]


def generate(model, input_ids, max_new_tokens: int | None = None, *, attention_mask=None, tokenizer=None,
             draft_model=None, return_dict: bool = False, **options):
    """Generate continuations of ``input_ids`` (a (T,) / (B, T) tensor, optionally with a left- or
    right-padded ``attention_mask``, a list of ids, or a list of ragged lists).

    Returns the sequences (B * num_return_sequences, T + new) — prompt, then new tokens, pad
    after EOS — or a :class:`GenerateOutput` with ``return_dict=True``. For encoder-decoder
    models ``input_ids`` is the source and the sequences start with the decoder start token.
    Options: see :class:`GenerationConfig` (HF names; ``max_new`` and ``temp`` are aliases).
    """
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    cfg = GenerationConfig.build(**options)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        p = plan(model, input_ids, cfg, attention_mask, tokenizer)
        generator = make_generator(cfg.seed, p.batch.ids.device)
        stats: dict = {}
        if cfg.num_beams > 1:
            if draft_model is not None:
                raise ValueError("speculative decoding (draft_model) does not combine with beam search")
            from .beam import beam_search

            sequences, scores, new_tokens = beam_search(model, p, generator, stats)
            out = _finish_beam(p, sequences, scores, new_tokens, stats, tokenizer, t0)
        elif draft_model is not None or cfg.prompt_lookup_num_tokens:
            from .speculative import speculative_generate

            steps = speculative_generate(model, draft_model, p, generator, stats, tokenizer)
            out = _finish(p, steps, stats, tokenizer, t0)
        else:
            p.batch = p.batch.repeat(cfg.num_return_sequences)
            if p.encoded is not None:
                index = torch.arange(len(p.encoded.memory), device=p.batch.ids.device)
                p.encoded = p.encoded.select(index.repeat_interleave(cfg.num_return_sequences))
            steps = list(token_stream(model, p, generator, tokenizer, stats))
            out = _finish(p, steps, stats, tokenizer, t0)
        out.new_tokens = _stop_cut(out.new_tokens, p, tokenizer)
    finally:
        model.train(was_training)
    return out if return_dict else out.sequences


def _finish_beam(p: Plan, sequences, scores, new_tokens, stats, tokenizer, t0) -> GenerateOutput:
    texts = [tokenizer.decode(t) for t in new_tokens] if tokenizer is not None else None
    total = time.perf_counter() - t0
    n_new = sum(len(t) for t in new_tokens)
    stats.update(new_tokens=n_new, total_s=total, tokens_per_s=n_new / total if total > 0 else float("inf"))
    return GenerateOutput(sequences, new_tokens, texts, scores, stats)


def stream(model, input_ids, max_new_tokens: int | None = None, *, attention_mask=None, tokenizer=None,
           draft_model=None, stats: dict | None = None, **options) -> Iterator[torch.Tensor]:
    """Yield generated tokens as they are produced: a (B,) tensor per step (finished rows get
    the pad id). With ``draft_model`` (batch 1) tokens come one at a time from each accepted run."""
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    cfg = GenerationConfig.build(**options)
    if cfg.num_beams > 1:
        raise ValueError("beam search cannot stream (the best beam is known only at the end); use generate()")
    if cfg.num_return_sequences > 1:
        raise ValueError("num_return_sequences > 1 is for generate(), not stream()")
    model.eval()
    p = plan(model, input_ids, cfg, attention_mask, tokenizer)
    generator = make_generator(cfg.seed, p.batch.ids.device)
    stats = {} if stats is None else stats
    if draft_model is not None or cfg.prompt_lookup_num_tokens:
        from .speculative import speculative_stream

        if p.batch.ids.shape[0] != 1:
            raise ValueError("streaming speculative decoding takes one prompt; use generate() for a batch")
        for tok in speculative_stream(model, draft_model, p, 0, generator, stats, tokenizer):
            yield torch.tensor([tok], device=p.batch.ids.device)
        return
    yield from token_stream(model, p, generator, tokenizer, stats)


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int | None = None, *, draft_model=None,
                stats: dict | None = None, **options) -> Iterator[str]:
    """Text pieces of one prompt as they are generated (stop strings and EOS end the stream;
    a stop string itself is not yielded)."""
    ids = tokenizer.encode(prompt)
    cfg = GenerationConfig.build(**options)  # stop strings and EOS, aliases resolved as generate() does
    eos = set(cfg.eos_ids)
    if cfg.eos_token_id is None and getattr(tokenizer, "eos_id", None) is not None:
        eos = {tokenizer.eos_id}
    stops = cfg.stop
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    for piece in _text_pieces(model, tokenizer, ids, max_new_tokens, draft_model, stats, stops, eos, options):
        stats["new_tokens"] = stats.get("streamed", 0)
        stats["total_s"] = time.perf_counter() - t0
        yield piece
    stats["new_tokens"] = stats.get("streamed", 0)
    stats["total_s"] = time.perf_counter() - t0


def _text_pieces(model, tokenizer, ids, max_new_tokens, draft_model, stats, stops, eos, options):
    generated: list[int] = []
    shown = ""
    hold = held_back(stops)
    for tok in stream(model, ids, max_new_tokens, tokenizer=tokenizer, draft_model=draft_model, stats=stats,
                      **options):
        t = int(tok[0])
        stats["streamed"] = stats.get("streamed", 0) + 1
        if t in eos:
            break
        generated.append(t)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            continue
        cut = cut_at_stop(text, stops)
        if cut != text:
            if len(cut) > len(shown):
                yield cut[len(shown):]
            return
        safe = text[:len(text) - hold] if hold else text
        if len(safe) > len(shown):
            yield safe[len(shown):]
            shown = safe
    text = cut_at_stop(tokenizer.decode(generated), stops)
    if len(text) > len(shown):
        yield text[len(shown):]
