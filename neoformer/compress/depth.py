"""Depth: which blocks to keep, and a student without the others.

Scores (higher = more important, kept first):
* ``influence`` -- Block Influence (Men et al. 2024, "ShortGPT"): 1 - cos(block input, block output)
  averaged over calibration tokens. A block that barely turns the residual stream scores ~0.
* ``skip-loss`` -- the calibration loss with the block skipped minus the full model's loss
  (the direct measure; one forward pass per block).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .calibrate import Batch, blocks, hooks, mean_loss, run
from .plan import CompressPlan, parse_layers
from .surgery import BLOCK_KEY, rebuild, state_of


def block_influence(model: nn.Module, batches: list[Batch]) -> list[float]:
    """ShortGPT Block Influence of every block (mean over tokens of 1 - cos(in, out))."""
    n = len(blocks(model))
    sums, counts = [0.0] * n, [0] * n

    def record(name, args, out):
        i = int(name)
        x, y = args[0].float(), out[0].float()
        cos = F.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
        sums[i] += float((1 - cos).sum())
        counts[i] += cos.numel()

    with hooks({str(i): b for i, b in enumerate(blocks(model))}, record):
        run(model, batches)
    return [s / max(c, 1) for s, c in zip(sums, counts)]


class _Skipped(nn.Module):
    """Stands in for a block: passes the residual stream through unchanged."""

    def forward(self, x, *args, **kwargs):
        return x, None


def skip_loss_increase(model: nn.Module, batches: list[Batch]) -> list[float]:
    """Calibration loss with each block skipped, minus the full model's loss."""
    base = mean_loss(model, batches)
    layers = blocks(model)
    scores = []
    for i in range(len(layers)):
        original = layers[i]
        layers[i] = _Skipped()
        try:
            scores.append(mean_loss(model, batches) - base)
        finally:
            layers[i] = original
    return scores


LAYER_SCORERS = {"influence": block_influence, "skip-loss": skip_loss_increase}


def choose_layers(plan: CompressPlan, model: nn.Module, batches: list[Batch]) -> tuple[list[int], list[float] | None]:
    """(kept layer indices in order, the scores used or None)."""
    n_layers = len(blocks(model))
    how, value = parse_layers(plan.layers, n_layers)
    if how == "keep":
        return value, None
    if plan.by == "uniform":  # evenly spaced, first and last included
        if value == 1:
            return [n_layers - 1], None
        return sorted({round(i * (n_layers - 1) / (value - 1)) for i in range(value)}), None
    scores = LAYER_SCORERS[plan.layer_score](model, batches)
    ranked = sorted(range(n_layers), key=lambda i: (-scores[i], i))
    return sorted(ranked[:value]), scores


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A student holding only the blocks ``keep`` (in that order); everything else is copied."""
    cfg: ModelConfig = model.config
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, tensor in state_of(model).items():
        match = BLOCK_KEY.match(key)
        if not match:
            state[key] = tensor
        elif int(match.group(1)) in new_index:
            state[f"decoder.blocks.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    return rebuild(cfg.replace(n_layers=len(keep)), state)


__all__ = ["block_influence", "skip_loss_increase", "choose_layers", "keep_layers", "LAYER_SCORERS"]
