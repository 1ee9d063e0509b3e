"""Beam search with the semantics of Hugging Face transformers' vectorised ``_beam_search``
(length penalty, early stopping True / False / "never", n best returned), so the same weights
give the same beams (tests compare token by token).

Per step, for each prompt: keep the top K = max(2, 1 + n_eos) * num_beams continuations over
all beams; those ending in EOS (or reaching max_new_tokens) may enter the finished set with
score sum_logprob / generated_len ** length_penalty; the best num_beams unfinished ones
continue, and the cache rows are reordered to follow them.
"""
from __future__ import annotations

import time

import torch

from .engine import decode_one, prefill, trim_cache
from .sampling import History, process

NEG = -1.0e9


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) gathered along dim 1 with index (B, K')."""
    while index.ndim < t.ndim:
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


class Beams:
    """Running and finished hypotheses of every prompt: (B, num_beams, ...) tensors."""

    def __init__(self, B: int, cfg, eos: torch.Tensor | None, pad_id: int, device):
        nb, max_new = cfg.num_beams, cfg.max_new_tokens
        self.cfg, self.eos, self.B, self.nb = cfg, eos, B, nb
        self.K = max(2, 1 + (len(eos) if eos is not None else 0)) * nb  # candidates kept per step
        self.top_mask = torch.arange(self.K, device=device) < nb
        self.running_seq = torch.full((B, nb, max_new), pad_id, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(B, nb, device=device)
        self.running_scores[:, 1:] = NEG  # only the first beam's continuations count at step 0
        self.seqs = self.running_seq.clone()
        self.scores = torch.full((B, nb), NEG, device=device)
        self.lengths = torch.zeros(B, nb, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        self.offsets = (torch.arange(B, device=device) * nb)[:, None]

    def candidates(self, log_probs: torch.Tensor, generator):
        """Top K continuations over all beams of each prompt -> (log-probs, origin beam, token), (B, K)."""
        V = log_probs.shape[-1]
        acc = (log_probs.view(self.B, self.nb, V) + self.running_scores[:, :, None]).view(self.B, self.nb * V)
        if self.cfg.sampling:
            idx = torch.multinomial(torch.softmax(acc, dim=-1), self.K, generator=generator)
            top_lp, order = torch.gather(acc, 1, idx).sort(dim=-1, descending=True)
            idx = idx.gather(1, order)
        else:
            top_lp, idx = torch.topk(acc, self.K)
        return top_lp, idx // V, idx % V

    def step(self, log_probs: torch.Tensor, step: int, generator) -> tuple[torch.Tensor, bool]:
        """Advance by one token -> (flat index of the rows the running beams continue, done)."""
        cfg, nb = self.cfg, self.nb
        top_lp, origin, tokens = self.candidates(log_probs, generator)
        top_seq = _gather(self.running_seq, origin)
        top_seq[:, :, step] = tokens
        last = step == cfg.max_new_tokens - 1
        if last:
            hits = torch.ones_like(tokens, dtype=torch.bool)
        else:
            hits = torch.isin(tokens, self.eos) if self.eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
        # the best num_beams unfinished continuations keep running
        run_lp = top_lp + hits.float() * NEG
        keep = torch.topk(run_lp, nb).indices
        self.running_seq, self.running_scores = _gather(top_seq, keep), _gather(run_lp, keep)
        flat = (_gather(origin, keep) + self.offsets).view(-1)
        # finished ones (only among the top num_beams) compete for the n-best list
        just = hits & self.top_mask[None]
        fin_lp = top_lp / ((step + 1) ** cfg.length_penalty)
        full = self.finished.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
        fin_lp = fin_lp + (full.float() + (~self.improvable).float() + (~just).float()) * NEG
        merged = torch.cat((self.scores, fin_lp), dim=1)
        best = torch.topk(merged, nb).indices
        self.seqs = _gather(torch.cat((self.seqs, top_seq), dim=1), best)
        self.scores = _gather(merged, best)
        self.lengths = _gather(torch.cat((self.lengths, torch.full_like(tokens, step + 1)), dim=1), best)
        self.finished = _gather(torch.cat((self.finished, just), dim=1), best)
        return flat, last or self._done(step, bool(hits.all()))

    def _done(self, step: int, all_hit: bool) -> bool:
        """Can a running beam still beat the worst finished one? (HF's heuristic)"""
        cfg = self.cfg
        lp = cfg.length_penalty
        horizon = cfg.max_new_tokens if (cfg.early_stopping == "never" and lp > 0) else step + 1
        best_possible = self.running_scores[:, :1] / (horizon ** lp)
        worst = torch.where(self.finished, self.scores.min(dim=1, keepdim=True).values,
                            torch.full_like(self.scores, NEG))
        self.improvable = self.improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        all_full = bool(self.finished.all()) and cfg.early_stopping is True
        return not bool(self.improvable.any()) or all_full or all_hit


@torch.inference_mode()
def beam_search(model, p, generator, stats: dict):
    """-> (sequences (B * n_return, T + new), scores (B * n_return,), new tokens per sequence)."""
    from .api import new_cache

    cfg, batch = p.cfg, p.batch
    B, n_ret = batch.ids.shape[0], cfg.num_return_sequences
    device = batch.ids.device
    if cfg.max_new_tokens == 0:
        seqs = batch.ids.repeat_interleave(n_ret, 0)
        return seqs, torch.zeros(len(seqs), device=device), [[] for _ in range(len(seqs))]
    expanded = batch.repeat(cfg.num_beams)
    encoded = p.encoded.select(torch.arange(B, device=device).repeat_interleave(cfg.num_beams)) \
        if p.encoded is not None else None
    history = History(cfg, expanded.prompts, model.config.vocab_size, device)
    cache = new_cache(model, p, B * cfg.num_beams)
    beams = Beams(B, cfg, p.eos, p.pad_id, device)
    t0 = time.perf_counter()
    logits = prefill(model, cache, expanded.ids, expanded.positions, expanded.keep, encoded)
    stats["prefill_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        log_probs = process(torch.log_softmax(logits.float(), dim=-1), cfg, history)
        flat, done = beams.step(log_probs, step, generator)
        if done:
            break
        cache.reorder(flat)
        tokens = beams.running_seq[:, :, step].reshape(-1)
        if history.active:
            history.reorder(flat)
            history.append(tokens)
        if cache.end + 1 > cache.capacity:
            trim_cache(model, cache, p.keep_n, cfg.trim, encoded)
        logits = decode_one(model, cache, tokens, encoded)
    stats["decode_s"] = time.perf_counter() - t1
    return _results(beams, batch, p, n_ret)


def _results(beams: Beams, batch, p, n_ret: int):
    seqs, scores, lengths = beams.seqs[:, :n_ret], beams.scores[:, :n_ret], beams.lengths[:, :n_ret]
    B = seqs.shape[0]
    width = int(lengths.max())
    gen = seqs[:, :, :width].reshape(B * n_ret, width)
    lengths = lengths.reshape(-1).tolist()
    for r, n in enumerate(lengths):
        gen[r, n:] = p.pad_id
    prefix = batch.ids if p.encoded is None else batch.ids[:, :1]
    sequences = torch.cat((prefix.repeat_interleave(n_ret, 0), gen), dim=1)
    new_tokens = [gen[r, :n].tolist() for r, n in enumerate(lengths)]
    return sequences, scores.reshape(-1), new_tokens
