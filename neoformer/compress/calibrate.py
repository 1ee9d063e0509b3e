"""Calibration: run a model over a few batches of the user's data and read what its modules see.

Every importance score in this package (block influence, head gradients, channel and neuron
activations, PCA covariances) is a statistic gathered here with forward hooks, so the scoring
code never edits a model's forward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import ModelConfig
from .plan import CompressError

Batch = tuple[torch.Tensor, torch.Tensor]  # (input ids, targets), both (B, L)


def require_plain_decoder(cfg: ModelConfig, what: str) -> None:
    """The weight surgery knows the Llama/GPT block: pre-norm RMSNorm, dense FFN, separate Q/K/V."""
    from ..kinds import get

    problems = []
    if not get(cfg.kind).causal or get(cfg.kind).encoder_layers:
        problems.append(f"kind {cfg.kind!r} (decoder only)")
    if cfg.norm_position != "pre":
        problems.append("post-norm")
    if cfg.ngpt:
        problems.append("ngpt")
    if cfg.moe_experts:
        problems.append("mixture of experts")
    if cfg.rmc or cfg.nsb:
        problems.append("the RMC/NSB memory layer")
    if cfg.fused_qkv:
        problems.append("fused_qkv")
    if problems:
        raise CompressError(f"{what} is not supported for this teacher: {', '.join(problems)}")


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.decoder.blocks


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean next-token cross-entropy per target over ``batches`` (eval mode, fp32)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in batches:
            loss, _ = model.loss(x, y)
            n = int((y >= 0).sum())
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


@contextlib.contextmanager
def hooks(modules: dict[str, nn.Module], record: Callable[[str, tuple, object], None], *, pre: bool = False):
    """Call ``record(name, inputs, output)`` (output None for pre-hooks) on every forward of each module."""
    handles = []
    for name, module in modules.items():
        if pre:
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: record(name, args, None)))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: record(name, args, out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run(model: nn.Module, batches: Iterable[Batch]) -> None:
    """Forward every batch (eval mode); the hooks collect what they need."""
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            model(x, use_cache=False)
    finally:
        model.train(was_training)


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm that reads the residual stream: each block's attn/ffn norm and the final norm."""
    out = {}
    for i, block in enumerate(blocks(model)):
        out[f"{i}.attn_norm"] = block.attn_norm
        out[f"{i}.ffn_norm"] = block.ffn_norm
    out["final"] = model.decoder.norm
    return out


__all__ = ["Batch", "require_plain_decoder", "blocks", "mean_loss", "hooks", "run", "norm_modules"]
