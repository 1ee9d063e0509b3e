"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023) or with
prompt lookup (n-gram drafting, no draft model: ``prompt_lookup_num_tokens``).

Each round the draft proposes ``num_draft_tokens`` (gamma) tokens d_1..d_gamma one at a time
from its distributions q_i; the target scores [last, d_1..d_gamma] in one forward, giving p_1..
p_{gamma+1}. Token d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
rejection a token is drawn from norm(max(p_i - q_i, 0)), and if all are accepted a bonus token
is drawn from p_{gamma+1}. The output is distributed exactly as the target's (p and q are the
*processed* distributions: temperature, top-k, top-p and min-p apply to both). Greedy decoding
accepts d_i iff it is the target's argmax, so its output equals target-only greedy decoding.

Both caches hold every committed token except the last; rejected slots are rewound, and state
the model owns beside K/V (the NeoFormer-X RMC summary) is advanced over the kept tokens by the
model's ``advance_state`` hook. Rows of a batch are decoded one after another.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from .cache import StaticKVCache
from .engine import bucket, compiled_decode_one, compiled_verify, forward_tokens, trim_cache
from .sampling import process
from .stops import StopStrings


def _check(target, draft, cfg) -> None:
    if not (getattr(target, "supports_speculative_decoding", False)
            and (draft is None or getattr(draft, "supports_speculative_decoding", False))):
        raise ValueError("speculative decoding needs decoder-only target and draft models")
    if draft is not None and cfg.prompt_lookup_num_tokens:
        raise ValueError("give either draft_model or prompt_lookup_num_tokens, not both")
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}); the draft must share the tokenizer")
    if cfg.repetition_penalty not in (None, 1.0) or cfg.no_repeat_ngram_size:
        raise ValueError("repetition_penalty / no_repeat_ngram_size are not supported with speculative decoding")


def _run(model, cache: StaticKVCache, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
    positions = cache.next_pos[:, None] + torch.arange(ids.shape[1], device=ids.device)
    logits = forward_tokens(model, cache, ids, positions, last_only=last_only)
    cache.sync()
    return logits


def _rewind(model, cache: StaticKVCache, end: int, state, fed: torch.Tensor, fed_pos: torch.Tensor, n_kept: int):
    """Keep the first n_kept of the `fed` tokens (which started at slot end - len(fed) ...)."""
    cache.rewind(end)
    cache.model_state = model.advance_state(state, fed[:, :n_kept], fed_pos[:, :n_kept]) if n_kept else state


class _Side:
    """One model (target or draft) with its cache; eager, or compiled over a static-shape cache."""

    def __init__(self, model, cap: int, window: int, track: bool, compiled_fn=None):
        self.model, self.fn, self.window = model, compiled_fn, window
        capacity = bucket(cap, window) if compiled_fn is not None else cap
        self.cache = StaticKVCache.for_model(model, 1, capacity, static=compiled_fn is not None, track_tokens=track)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Read the whole prompt -> logits (1, V) after its last token."""
        return _run(self.model, self.cache, ids)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft: read ids (1, L) one at a time -> logits (1, V) after the last one."""
        if self.fn is None:
            return _run(self.model, self.cache, ids)
        for j in range(ids.shape[1]):
            logits = self.fn(self.model, self.cache, ids[:, j], self.cache.next_pos[:, None])
            self.cache.end += 1
        return logits

    def verify(self, ids: torch.Tensor, positions: torch.Tensor, compiled_len: int) -> torch.Tensor:
        """Target: read ids (1, L) in one forward -> logits (L, V). Compiled, a short round (the last ones of
        a generation) is padded to the compiled length where the cache has room: the eager forward rounds
        differently from the compiled one, and greedy output must not depend on how a round was run."""
        n = ids.shape[1]
        pad = compiled_len - n
        if self.fn is not None and 0 < pad and self.cache.end + compiled_len <= self.cache.capacity \
                and int(positions[0, -1]) + pad < self.window:
            ids = torch.cat((ids, ids[:, -1:].expand(1, pad)), dim=1)
            positions = torch.cat((positions, positions[:, -1:] + torch.arange(1, pad + 1, device=ids.device)), dim=1)
        if self.fn is not None and ids.shape[1] == compiled_len:
            logits = self.fn(self.model, self.cache, ids, positions)
            self.cache.end += ids.shape[1]
            return logits[0, :n]
        return _run(self.model, self.cache, ids, last_only=False)[0]

    def keep(self, end: int, state, fed: torch.Tensor, fed_pos: torch.Tensor, n_kept: int) -> None:
        _rewind(self.model, self.cache, end, state, fed, fed_pos, n_kept)


class _ModelDraft:
    """Draft tokens from a smaller model with its own cache. Its cache holds every committed token
    except ``last`` and may lag by ``pending`` tokens (the last draft of a fully accepted round)."""

    def __init__(self, draft, p, prompt: torch.Tensor, cap: int, track: bool, generator):
        self.cfg, self.cap, self.keep_n, self.generator = p.cfg, cap, p.keep_n, generator
        compiled = compiled_decode_one(draft, 1) if p.cfg.compile else None
        self.side = _Side(draft, cap, p.window, track, compiled)
        self.side.prefill(prompt)
        self.pending = prompt[:, :0]

    def make_room(self, g: int) -> None:
        d = self.side.cache
        if g > 0 and d.end + self.pending.shape[1] + g > self.cap:
            trim_cache(self.side.model, d, max(self.keep_n - self.pending.shape[1], 1), self.cfg.trim)

    def propose(self, last: torch.Tensor, g: int):
        """Read what the draft has not seen, propose g tokens -> (d (1, g), q logits (g, V))."""
        drafts, qs = [], []
        self.fed = torch.cat((self.pending, last), dim=1)
        c = self.side.cache
        self.end, self.state = c.end, c.model_state
        self.pos = c.next_pos[:, None] + torch.arange(self.fed.shape[1], device=last.device)
        q_logits = self.side.step(self.fed)
        for i in range(g):
            q = process(q_logits, self.cfg, None)
            drafts.append(_pick(q, self.cfg.sampling, self.generator))
            qs.append(q)
            if i < g - 1:
                q_logits = self.side.step(drafts[-1])
        return torch.cat(drafts, dim=1), torch.cat(qs, dim=0)

    def commit(self, last: torch.Tensor, d: torch.Tensor, n_ok: int, new: int) -> None:
        """Rewind the draft's cache to [.., last, d_1..d_n_ok] (it never read d_g)."""
        g = d.shape[1]
        if g == 0:
            self.pending = torch.cat((self.pending, last), dim=1)
            return
        m = self.fed.shape[1]
        kept = min(m + n_ok, m + g - 1)
        fed = torch.cat((self.fed, d[:, :g - 1]), dim=1)
        pos = torch.cat((self.pos, self.pos[:, -1:] + torch.arange(1, g, device=d.device)), dim=1)
        self.side.keep(self.end + kept, self.state, fed, pos, kept)
        self.pending = d[:, g - 1:] if n_ok == g else d[:, :0]


class _PromptLookup:
    """Draft tokens with no draft model (prompt lookup decoding, Saxena 2023; HF
    ``prompt_lookup_num_tokens``): the tokens that followed the latest earlier occurrence of the
    sequence's last n-gram (longest n <= max_matching_ngram_size first). A table maps each n-gram
    to where its latest continuation starts, updated as tokens are committed (O(1) per lookup).
    The proposal is deterministic (q is one-hot), so the acceptance rule stays exact: greedy output
    equals the target's, sampling accepts d with probability p(d) and otherwise draws from p
    without d. With a compiled target a short proposal is padded to g (the verification is
    compiled for g + 1 tokens, and costs the same however many of them are real)."""

    def __init__(self, cfg, prompt: list[int], vocab: int, pad: bool):
        self.max_n, self.vocab, self.pad = cfg.max_matching_ngram_size, vocab, pad
        self.history: list[int] = []
        self.follows: dict[tuple, int] = {}
        self.extend(prompt)

    def extend(self, tokens: list[int]) -> None:
        for tok in tokens:
            h = self.history
            for n in range(1, min(self.max_n, len(h)) + 1):  # the n-gram ending here is followed by tok
                self.follows[tuple(h[-n:])] = len(h)
            h.append(tok)

    def make_room(self, g: int) -> None:
        pass

    def propose(self, last: torch.Tensor, g: int):
        h = self.history
        found: list[int] = []
        for n in range(min(self.max_n, len(h) - 1), 0, -1):
            start = self.follows.get(tuple(h[-n:]))
            if start is not None:
                found = h[start:start + g]
                break
        if self.pad and found:
            found = found + [found[-1]] * (g - len(found))
        elif self.pad:
            found = [h[-1]] * g
        d = torch.tensor([found], dtype=torch.long, device=last.device)
        q = torch.full((len(found), self.vocab), float("-inf"), device=last.device)
        q[torch.arange(len(found)), d[0]] = 0.0  # one-hot: the proposal is certain
        return d, q

    def commit(self, last: torch.Tensor, d: torch.Tensor, n_ok: int, new: int) -> None:
        self.extend(d[0, :n_ok].tolist() + [new])


class _Round:
    """State of speculative decoding for one prompt: the target's cache holds every committed
    token except ``last``; the drafter (a model or prompt lookup) proposes each round's tokens."""

    def __init__(self, target, draft, p, prompt: torch.Tensor, generator):
        cfg = self.cfg = p.cfg
        self.gamma = cfg.prompt_lookup_num_tokens if draft is None else cfg.num_draft_tokens
        self.sampling, self.generator = cfg.sampling, generator
        self.cap = min(prompt.shape[1] + cfg.max_new_tokens, p.window)
        self.keep_n = p.keep_n
        positions = [target.config.position] + ([draft.config.position] if draft is not None else [])
        track = cfg.trim == "refill" or "learned" in positions
        compiled = cfg.compile  # draft steps and full-size verifications compiled, static-shape caches
        self.t = _Side(target, self.cap, p.window, track, compiled_verify(target, self.gamma + 1) if compiled else None)
        # The first token comes from reading the whole prompt, as in plain decoding: the prompt's keys and
        # values are then the same numbers on both paths (a prompt longer than the kernels' rows runs on
        # BLAS, the rounds on the row-invariant kernels), so greedy output stays the target's to the bit.
        self.last = _pick(process(self.t.prefill(prompt), cfg, None), self.sampling, generator)  # (1, 1)
        self.first = int(self.last)
        if draft is None:
            self.drafter = _PromptLookup(cfg, prompt[0].tolist() + [self.first], target.config.vocab_size,
                                         pad=compiled)
        else:
            self.drafter = _ModelDraft(draft, p, prompt, self.cap, track, generator)

    def size(self, remaining: int) -> int:
        """Draft tokens this round; trims the target exactly where plain decoding would."""
        t = self.t.cache
        if t.end + 1 > self.cap:
            trim_cache(self.t.model, t, self.keep_n, self.cfg.trim)
        g = min(self.gamma, self.cap - t.end - 1, remaining - 1)
        self.drafter.make_room(g)
        return g

    def run(self, remaining: int) -> tuple[list[int], int]:
        """One round -> (committed tokens, draft tokens proposed)."""
        g = self.size(remaining)
        d, q = self.drafter.propose(self.last, g) if g > 0 else (self.last[:, :0], None)
        g = d.shape[1]  # prompt lookup may find fewer
        c = self.t.cache
        t_end, t_state = c.end, c.model_state
        t_fed = torch.cat((self.last, d), dim=1)
        t_pos = c.next_pos[:, None] + torch.arange(g + 1, device=d.device)
        p_logits = process(self.t.verify(t_fed, t_pos, self.gamma + 1), self.cfg, None)  # (g + 1, V)
        n_ok, new = _accept(p_logits, q, d[0], self.sampling, self.generator)
        self.t.keep(t_end + 1 + n_ok, t_state, t_fed, t_pos, 1 + n_ok)  # [.., last, d_1..d_n_ok]
        self.drafter.commit(self.last, d, n_ok, new)
        self.last = torch.tensor([[new]], device=d.device)
        return d[0, :n_ok].tolist() + [new], g


@torch.inference_mode()
def speculative_stream(target, draft, p, row: int, generator, stats: dict, tokenizer=None) -> Iterator[int]:
    """Tokens of one prompt (row of the plan), one at a time."""
    cfg = p.cfg
    _check(target, draft, cfg)
    t0 = time.perf_counter()
    state = _Round(target, draft, p, torch.tensor([p.batch.prompts[row]], device=p.batch.ids.device), generator)
    stats["prefill_s"] = stats.get("prefill_s", 0.0) + time.perf_counter() - t0
    stop = StopStrings(cfg.stop, tokenizer, 1) if cfg.stop else None
    eos = set(cfg.eos_ids)
    t1 = time.perf_counter()
    produced = proposed = accepted = rounds = 0
    tokens: list[int] = [state.first]  # read off the prompt
    while produced < cfg.max_new_tokens:
        if produced:
            tokens, g = state.run(cfg.max_new_tokens - produced)
            proposed, accepted, rounds = proposed + g, accepted + len(tokens) - 1, rounds + 1
        for tok in tokens:
            yield tok
            produced += 1
            done = tok in eos or (stop is not None and stop.push(tok))
            if done or produced >= cfg.max_new_tokens:
                produced = cfg.max_new_tokens
                break
    stats["decode_s"] = stats.get("decode_s", 0.0) + time.perf_counter() - t1
    for key, value in (("proposed", proposed), ("accepted", accepted), ("rounds", rounds)):
        stats[key] = stats.get(key, 0) + value
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
