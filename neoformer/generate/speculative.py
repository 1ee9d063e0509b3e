"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

Each round the draft proposes ``num_draft_tokens`` (gamma) tokens d_1..d_gamma one at a time
from its distributions q_i; the target scores [last, d_1..d_gamma] in one forward, giving p_1..
p_{gamma+1}. Token d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
rejection a token is drawn from norm(max(p_i - q_i, 0)), and if all are accepted a bonus token
is drawn from p_{gamma+1}. The output is distributed exactly as the target's (p and q are the
*processed* distributions: temperature, top-k, top-p and min-p apply to both). Greedy decoding
accepts d_i iff it is the target's argmax, so its output equals target-only greedy decoding.

Both caches hold every committed token except the last; rejected slots are rewound. The RMC
running summary (NeoFormer-X models) is recomputed for the kept tokens from the embeddings,
which is exactly what the RMC sums. Rows of a batch are decoded one after another.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from ..model.memory import MemoryState
from .cache import StaticKVCache
from .engine import bucket, compiled_decode_one, compiled_verify, forward_tokens, trim_cache
from .sampling import process


def _check(target, draft, cfg) -> None:
    if target.config.kind != "decoder" or draft.config.kind != "decoder":
        raise ValueError("speculative decoding needs decoder-only target and draft models")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}); the draft must share the tokenizer")
    if cfg.repetition_penalty not in (None, 1.0) or cfg.no_repeat_ngram_size:
        raise ValueError("repetition_penalty / no_repeat_ngram_size are not supported with speculative decoding")


def _advance_state(model, state: MemoryState | None, ids: torch.Tensor, positions: torch.Tensor):
    """RMC running summary after reading ids (1, L): the RMC sums its input, the embeddings."""
    if model.rmc is None:
        return None
    h = model.embed(ids, positions, None)  # (1, L, D)
    if state is None:
        return MemoryState(h.sum(1), torch.full((1,), float(ids.shape[1]), dtype=h.dtype, device=h.device))
    return MemoryState(state.total + h.sum(1), state.count + ids.shape[1])


def _run(model, cache: StaticKVCache, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
    positions = cache.next_pos[:, None] + torch.arange(ids.shape[1], device=ids.device)
    logits = forward_tokens(model, cache, ids, positions, last_only=last_only)
    cache.sync()
    return logits


def _rewind(model, cache: StaticKVCache, end: int, state, fed: torch.Tensor, fed_pos: torch.Tensor, n_kept: int):
    """Keep the first n_kept of the `fed` tokens (which started at slot end - len(fed) ...)."""
    cache.rewind(end)
    if model.rmc is not None:
        cache.memory_state = _advance_state(model, state, fed[:, :n_kept], fed_pos[:, :n_kept]) if n_kept else state


@torch.inference_mode()
def speculative_stream(target, draft, p, row: int, generator, stats: dict, tokenizer=None) -> Iterator[int]:
    """Tokens of one prompt (row of the plan), one at a time."""
    from .api import StopStrings

    cfg = p.cfg
    _check(target, draft, cfg)
    gamma, sampling = cfg.num_draft_tokens, cfg.sampling
    device = p.batch.ids.device
    prompt = torch.tensor([p.batch.prompts[row]], device=device)
    T = prompt.shape[1]
    cap = min(T + cfg.max_new_tokens, p.window)
    keep_n = p.keep_n
    track = cfg.trim == "refill" or target.config.position == "learned" or draft.config.position == "learned"
    if cfg.compile:  # draft steps and full-size verifications compiled, on static-shape caches
        dstep, tverify = compiled_decode_one(draft, 1), compiled_verify(target, gamma + 1)
        tcache = StaticKVCache.for_model(target, 1, bucket(cap, p.window), static=True, track_tokens=track)
        dcache = StaticKVCache.for_model(draft, 1, bucket(cap, p.window), static=True, track_tokens=track)
    else:
        tcache = StaticKVCache.for_model(target, 1, cap, track_tokens=track)
        dcache = StaticKVCache.for_model(draft, 1, cap, track_tokens=track)

    def verify(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Target reads ids (1, L) -> logits (L, V) after each."""
        if cfg.compile and ids.shape[1] == gamma + 1:
            logits = tverify(target, tcache, ids, positions)
            tcache.end += ids.shape[1]
            return logits[0]
        return _run(target, tcache, ids, last_only=False)[0]

    def draft_feed(ids: torch.Tensor) -> torch.Tensor:
        """Draft reads ids (1, L) -> logits (1, V) after the last one."""
        if not cfg.compile:
            return _run(draft, dcache, ids)
        for j in range(ids.shape[1]):
            logits = dstep(draft, dcache, ids[:, j], dcache.next_pos[:, None])
            dcache.end += 1
        return logits
    stop = StopStrings(cfg.stop, tokenizer, 1) if cfg.stop else None
    eos = set(cfg.eos_ids)
    t0 = time.perf_counter()
    if T > 1:
        positions = torch.arange(T - 1, device=device)[None]
        forward_tokens(target, tcache, prompt[:, :-1], positions)
        forward_tokens(draft, dcache, prompt[:, :-1], positions)
        tcache.sync()
        dcache.sync()
    stats["prefill_s"] = stats.get("prefill_s", 0.0) + time.perf_counter() - t0
    t1 = time.perf_counter()
    last = prompt[:, -1:]  # (1, 1) committed but not yet in either cache
    pending = last[:, :0]  # committed tokens the draft has not read yet (besides `last`)
    produced = proposed = accepted = rounds = 0
    while produced < cfg.max_new_tokens:
        # the target trims exactly where plain decoding would (when full), so greedy output matches
        if tcache.end + 1 > cap:
            trim_cache(target, tcache, keep_n, cfg.trim)
        g = min(gamma, cap - tcache.end - 1, cfg.max_new_tokens - produced - 1)
        if g > 0 and dcache.end + pending.shape[1] + g > cap:
            trim_cache(draft, dcache, max(keep_n - pending.shape[1], 1), cfg.trim)
        # 1. the draft reads what it has not seen and proposes g tokens
        drafts, qs = [], []
        if g > 0:
            d_end, d_state = dcache.end, dcache.memory_state
            d_fed = torch.cat((pending, last), dim=1)
            d_pos = dcache.next_pos[:, None] + torch.arange(d_fed.shape[1], device=device)
            q_logits = draft_feed(d_fed)
            for i in range(g):
                q = process(q_logits, cfg, None)
                tok = _pick(q, sampling, generator)
                drafts.append(tok)
                qs.append(q)
                if i < g - 1:
                    q_logits = draft_feed(tok)
        d = torch.cat(drafts, dim=1) if drafts else last[:, :0]  # (1, g)
        # 2. the target scores [last, d_1..d_g] in one forward
        t_end, t_state = tcache.end, tcache.memory_state
        t_fed = torch.cat((last, d), dim=1)
        t_pos = tcache.next_pos[:, None] + torch.arange(g + 1, device=device)
        p_logits = process(verify(t_fed, t_pos), cfg, None)  # (g + 1, V)
        # 3. accept / reject
        n_ok, new = _accept(p_logits, torch.cat(qs, dim=0) if qs else None, d[0], sampling, generator)
        proposed += g
        accepted += n_ok
        rounds += 1
        # 4. rewind both caches to [.., last, d_1..d_n_ok]; the draft may lag (pending)
        _rewind(target, tcache, t_end + 1 + n_ok, t_state, t_fed, t_pos, 1 + n_ok)
        if g > 0:
            m = d_fed.shape[1]
            d_keep = min(m + n_ok, m + g - 1)
            d_all = torch.cat((d_fed, d[:, :g - 1]), dim=1)
            d_all_pos = torch.cat((d_pos, d_pos[:, -1:] + torch.arange(1, g, device=device)), dim=1)
            _rewind(draft, dcache, d_end + d_keep, d_state, d_all, d_all_pos, d_keep)
            pending = d[:, g - 1:] if n_ok == g else d[:, :0]
        else:
            pending = torch.cat((pending, last), dim=1)
        last = torch.tensor([[new]], device=device)
        for tok in d[0, :n_ok].tolist() + [new]:
            yield tok
            produced += 1
            done = tok in eos or (stop is not None and bool(stop.update(torch.tensor([tok]),
                                                                        torch.zeros(1, dtype=torch.bool))[0]))
            if done or produced >= cfg.max_new_tokens:
                produced = cfg.max_new_tokens
                break
    stats["decode_s"] = stats.get("decode_s", 0.0) + time.perf_counter() - t1
    stats["proposed"] = stats.get("proposed", 0) + proposed
    stats["accepted"] = stats.get("accepted", 0) + accepted
    stats["rounds"] = stats.get("rounds", 0) + rounds
    stats["acceptance_rate"] = stats["accepted"] / max(stats["proposed"], 1)


def _pick(logits: torch.Tensor, sampling: bool, generator) -> torch.Tensor:
    """(1, V) processed logits -> (1, 1) token."""
    if not sampling:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def _accept(p_logits: torch.Tensor, q_logits: torch.Tensor, d: torch.Tensor, sampling: bool, generator):
    """p_logits (gamma + 1, V), q_logits (gamma, V), d (gamma,) -> (accepted count, next token)."""
    gamma = d.shape[0]
    if gamma == 0:  # no proposals (end of the window or of the budget): a plain step
        return 0, int(p_logits[0].argmax() if not sampling else
                      torch.multinomial(torch.softmax(p_logits[0], -1), 1, generator=generator))
    if not sampling:
        target_choice = p_logits.argmax(dim=-1)  # (gamma + 1,)
        match = (target_choice[:gamma] == d).long()
        n_ok = int(match.cumprod(0).sum())
        return n_ok, int(target_choice[n_ok])
    p = torch.softmax(p_logits, dim=-1)
    q = torch.softmax(q_logits, dim=-1)
    idx = torch.arange(gamma, device=d.device)
    ratio = p[idx, d] / q[idx, d]  # q[i, d_i] > 0: d_i was drawn from q_i
    u = torch.rand(gamma, generator=generator, device=d.device)
    ok = (u < ratio).long()
    n_ok = int(ok.cumprod(0).sum())
    if n_ok == gamma:
        dist = p[gamma]
    else:
        dist = (p[n_ok] - q[n_ok]).clamp(min=0)
        if float(dist.sum()) <= 0:  # p == q up to rounding
            dist = p[n_ok]
    return n_ok, int(torch.multinomial(dist / dist.sum(), 1, generator=generator))


def speculative_generate(target, draft, p, generator, stats: dict, tokenizer=None) -> list[torch.Tensor]:
    """All rows of the plan (each prompt repeated num_return_sequences times), one after
    another; returns per-step (N,) token tensors like the plain loop (pad after the end)."""
    n = p.cfg.num_return_sequences
    p.batch = p.batch.repeat(n)
    rows = [list(speculative_stream(target, draft, p, r, generator, stats, tokenizer))
            for r in range(len(p.batch.prompts))]
    width = max((len(r) for r in rows), default=0)
    grid = torch.full((len(rows), width), p.pad_id, dtype=torch.long, device=p.batch.ids.device)
    for r, toks in enumerate(rows):
        if toks:
            grid[r, :len(toks)] = torch.tensor(toks)
    return list(grid.unbind(1))
