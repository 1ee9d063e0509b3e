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


@torch.inference_mode()
def beam_search(model, p, generator, stats: dict):
    """-> (sequences (B * n_return, T + new), scores (B * n_return,), new tokens per sequence)."""
    from .api import new_cache

    cfg, batch = p.cfg, p.batch
    nb, max_new, lp = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    B, T = batch.ids.shape
    device = batch.ids.device
    n_ret = cfg.num_return_sequences
    if max_new == 0:
        seqs = batch.ids.repeat_interleave(n_ret, 0)
        return seqs, torch.zeros(len(seqs), device=device), [[] for _ in range(len(seqs))]
    expanded = batch.repeat(nb)
    rows = torch.arange(B, device=device).repeat_interleave(nb)
    encoded = p.encoded.select(rows) if p.encoded is not None else None
    history = History(cfg, expanded.prompts, model.config.vocab_size, device)
    cache = new_cache(model, p, B * nb)
    eos = p.eos
    K = max(2, 1 + (len(eos) if eos is not None else 0)) * nb
    top_mask = torch.arange(K, device=device) < nb

    running_seq = torch.full((B, nb, max_new), p.pad_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = NEG  # only the first beam's continuations count at step 0
    seqs = running_seq.clone()
    scores = torch.full((B, nb), NEG, device=device)
    lengths = torch.zeros(B, nb, dtype=torch.long, device=device)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    offsets = (torch.arange(B, device=device) * nb)[:, None]

    t0 = time.perf_counter()
    logits = prefill(model, cache, expanded.ids, expanded.positions, expanded.keep, encoded)
    stats["prefill_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(max_new):
        log_probs = process(torch.log_softmax(logits.float(), dim=-1), cfg, history)
        V = log_probs.shape[-1]
        acc = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if cfg.sampling:
            idx = torch.multinomial(torch.softmax(acc, dim=-1), K, generator=generator)
            top_lp = torch.gather(acc, 1, idx)
            top_lp, order = top_lp.sort(dim=-1, descending=True)
            idx = idx.gather(1, order)
        else:
            top_lp, idx = torch.topk(acc, K)
        origin, tokens = idx // V, idx % V  # (B, K)
        top_seq = _gather(running_seq, origin)
        top_seq[:, :, step] = tokens
        last = step == max_new - 1
        hits = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
        if last:
            hits = torch.ones_like(hits)

        # the best num_beams unfinished continuations keep running
        run_lp = top_lp + hits.float() * NEG
        keep = torch.topk(run_lp, nb).indices
        running_seq, running_scores = _gather(top_seq, keep), _gather(run_lp, keep)
        running_origin = _gather(origin, keep)

        # finished ones (only among the top num_beams) compete for the n-best list
        just = hits & top_mask[None]
        fin_lp = top_lp / ((step + 1) ** lp)
        full = finished.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
        fin_lp = fin_lp + full.float() * NEG + (~improvable).float() * NEG + (~just).float() * NEG
        merged = torch.cat((scores, fin_lp), dim=1)
        best = torch.topk(merged, nb).indices
        seqs = _gather(torch.cat((seqs, top_seq), dim=1), best)
        scores = _gather(merged, best)
        lengths = _gather(torch.cat((lengths, torch.full_like(tokens, step + 1)), dim=1), best)
        finished = _gather(torch.cat((finished, just), dim=1), best)

        if last:
            break
        flat = (running_origin + offsets).view(-1)
        cache.reorder(flat)
        if history.active:
            history.reorder(flat)
            history.append(running_seq[:, :, step].reshape(-1))

        # can a running beam still beat the worst finished one? (HF heuristic)
        horizon = max_new if (cfg.early_stopping == "never" and lp > 0) else step + 1
        best_possible = running_scores[:, :1] / (horizon ** lp)
        worst = torch.where(finished, scores.min(dim=1, keepdim=True).values, torch.full_like(scores, NEG))
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        done_all = bool(finished.all()) and cfg.early_stopping is True
        if not bool(improvable.any()) or done_all or bool(hits.all()):
            break
        if cache.end + 1 > cache.capacity:
            trim_cache(model, cache, p.keep_n, cfg.trim, encoded)
        logits = decode_one(model, cache, running_seq[:, :, step].reshape(-1), encoded)
    stats["decode_s"] = time.perf_counter() - t1

    seqs, scores, lengths = seqs[:, :n_ret], scores[:, :n_ret], lengths[:, :n_ret]
    width = int(lengths.max())
    gen = seqs[:, :, :width].reshape(B * n_ret, width)
    lengths = lengths.reshape(-1).tolist()
    for r, n in enumerate(lengths):
        gen[r, n:] = p.pad_id
    prefix = batch.ids if p.encoded is None else batch.ids[:, :1]
    sequences = torch.cat((prefix.repeat_interleave(n_ret, 0), gen), dim=1)
    new_tokens = [gen[r, :n].tolist() for r, n in enumerate(lengths)]
    return sequences, scores.reshape(-1), new_tokens
