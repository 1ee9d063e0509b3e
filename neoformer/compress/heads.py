"""Attention heads: importance and pruning that respects grouped-query attention.

Importance (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?"): put a gate
xi_h = 1 on each head's output and accumulate |dL/dxi_h| over calibration batches; a head the loss
is insensitive to can go. The gate multiplies the head's slice of the ``o_proj`` input, so the
model's forward is untouched.

``entropy``: 1 - the mean normalised entropy of each head's attention distribution over
calibration tokens (a head spreading attention evenly is taken as less specific, a common
heuristic, cheaper than gradients: forward only).

GQA: query heads share K/V groups. The student keeps ``kv`` whole groups (the most important by
summed head scores) and the ``heads / kv`` best query heads inside each kept group, in order.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .calibrate import Batch, blocks, require_plain_decoder, run
from .plan import CompressPlan, check_heads
from .surgery import block_items, config_with, rebuild, state_of


def head_importance(model: nn.Module, batches: list[Batch]) -> list[list[float]]:
    """|dL/d gate| per layer and query head, summed over batches (Michel et al. 2019)."""
    cfg = model.config
    H, Dh = cfg.n_heads, cfg.resolved_head_dim
    gates = [torch.ones(H, requires_grad=True) for _ in blocks(model)]
    handles = []
    for layer, block in enumerate(blocks(model)):
        def gate_heads(module, args, gate=gates[layer]):
            x = args[0]  # (B, L, H * Dh)
            return (x.view(*x.shape[:-1], H, Dh) * gate.to(x.dtype)[:, None]).reshape(x.shape),
        handles.append(block.attn.o_proj.register_forward_pre_hook(gate_heads))
    scores = torch.zeros(len(gates), H)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            loss, _ = model.loss(x, y)
            grads = torch.autograd.grad(loss, gates)
            scores += torch.stack([g.abs() for g in grads])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return scores.tolist()


@contextlib.contextmanager
def _eager_attention_probe(model: nn.Module, record):
    """Run every attention layer through the eager reference, handing ``record(layer, probs)`` the
    (B, H, Lq, Lk) attention probabilities; restores the backends afterwards."""
    from ..model import attention as attn_module

    original = attn_module.BACKENDS["eager"]
    layers = [block.attn for block in blocks(model)]
    saved = [a.backend for a in layers]

    def probing(q, k, v, ctx, window, scale, dropout_p, training):
        groups = q.shape[1] // k.shape[1]
        keys = k.repeat_interleave(groups, dim=1).float()
        scores = torch.matmul(q.float(), keys.transpose(-2, -1)) * scale
        mask = ctx.mask(window)
        if ctx.bias is not None:
            scores = scores + ctx.bias.float()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        record(probing.layer, torch.softmax(scores, dim=-1), mask)
        return original(q, k, v, ctx, window, scale, dropout_p, training)

    hooks_ = [a.register_forward_pre_hook(lambda m, args, i=i: setattr(probing, "layer", i))
              for i, a in enumerate(layers)]
    attn_module.BACKENDS["eager"] = probing
    for a in layers:
        a.backend = "eager"
    try:
        yield
    finally:
        attn_module.BACKENDS["eager"] = original
        for a, backend in zip(layers, saved):
            a.backend = backend
        for h in hooks_:
            h.remove()


def entropy_importance(model: nn.Module, batches: list[Batch]) -> list[list[float]]:
    """1 - mean normalised attention entropy per layer and query head (forward passes only)."""
    cfg = model.config
    totals = torch.zeros(cfg.n_layers, cfg.n_heads)
    counts = torch.zeros(cfg.n_layers)

    def record(layer, probs, mask):
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # (B, H, Lq)
        visible = mask.sum(-1).float() if mask is not None else torch.full(entropy.shape[-1:], probs.shape[-1] * 1.0)
        visible = visible.expand_as(entropy)
        choice = visible > 1  # a query that sees one key has no choice to measure
        normalised = entropy / visible.clamp_min(2).log()  # 1 = uniform over what the query may see
        totals[layer] += (normalised * choice).sum(dim=(0, 2)) / choice.sum(dim=(0, 2)).clamp_min(1)
        counts[layer] += 1

    with _eager_attention_probe(model, record):
        run(model, batches)
    return (1 - totals / counts.clamp_min(1)[:, None]).tolist()


HEAD_SCORERS = {"gradient": head_importance, "entropy": entropy_importance}


def choose_heads(scores: list[float], groups: int, n_heads: int, n_kv: int, uniform: bool) -> list[int]:
    """Query heads to keep in one layer, grouped by their (kept) KV group in order."""
    per_group = len(scores) // groups
    group_of = [list(range(g * per_group, (g + 1) * per_group)) for g in range(groups)]
    if uniform:
        kept_groups = list(range(n_kv))
    else:
        totals = [sum(scores[h] for h in heads) for heads in group_of]
        kept_groups = sorted(sorted(range(groups), key=lambda g: (-totals[g], g))[:n_kv])
    keep = []
    for g in kept_groups:
        ranked = group_of[g] if uniform else sorted(group_of[g], key=lambda h: (-scores[h], h))
        keep.extend(sorted(ranked[:n_heads // n_kv]))
    return keep


def prune_heads(model: nn.Module, plan: CompressPlan, scores: list[list[float]] | None) -> tuple[nn.Module, list]:
    """A student with ``plan.heads`` query heads (and ``plan.kv_heads`` KV heads) in every layer."""
    cfg = model.config
    require_plain_decoder(cfg, "head pruning")
    n_heads, n_kv = check_heads(plan, cfg)
    groups, Dh = cfg.resolved_n_kv_heads, cfg.resolved_head_dim
    per_group = cfg.n_heads // groups
    uniform = plan.by == "uniform" or scores is None
    kept = [choose_heads(scores[i] if scores else [0.0] * cfg.n_heads, groups, n_heads, n_kv, uniform)
            for i in range(cfg.n_layers)]

    def rows(heads: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * Dh, (h + 1) * Dh) for h in heads])

    state = state_of(model)
    for layer, name, key, tensor in list(block_items(state)):
        q_rows = rows(kept[layer])
        kv_rows = rows(sorted({h // per_group for h in kept[layer]}))
        if name in ("attn.q_proj.weight", "attn.q_proj.bias"):
            state[key] = tensor[q_rows]
        elif name.startswith(("attn.k_proj.", "attn.v_proj.")):
            state[key] = tensor[kv_rows]
        elif name == "attn.o_proj.weight":
            state[key] = tensor[:, q_rows]
    student_cfg = config_with(cfg, n_heads=n_heads, n_kv_heads=n_kv if cfg.n_kv_heads is not None or n_kv != n_heads
                              else None)
    return rebuild(student_cfg, state), kept


__all__ = ["head_importance", "entropy_importance", "HEAD_SCORERS", "choose_heads", "prune_heads"]
