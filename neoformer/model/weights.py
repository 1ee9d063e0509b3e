"""Weight init and nGPT normalisation, with residual output projections marked where they are built.

A projection whose output is added to the residual stream (attention ``o_proj``, FFN ``down``,
NSB ``fuse_out``) gets a smaller init under ``scaled_residual_init`` and, under nGPT, unit-norm
*columns* (its columns live in d_model). Such a projection is marked by ``residual_projection``
when its module is built, not recognised by its name, so a LoRA wrapper (the marked Linear
becomes ``o_proj.base_layer``) or a quantized/renamed replacement cannot silently lose it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .norms import unit_norm

RESIDUAL_MARK = "writes_residual"


def residual_projection(module: nn.Module) -> nn.Module:
    """Mark ``module`` as writing into the residual stream; returns it (use where it is built).
    A module that replaces it should copy the mark: ``mark_like(new, old)``."""
    setattr(module, RESIDUAL_MARK, True)
    return module


def writes_residual(module: nn.Module) -> bool:
    return bool(getattr(module, RESIDUAL_MARK, False))


def mark_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Carry the residual mark over when ``new`` replaces ``old`` (quantized or adapted module)."""
    if writes_residual(old):
        residual_projection(new)
    return new


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.ndim == 2


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """normal(init_std) or Xavier for matrices, normal(init_std) for embeddings, zero biases;
    zeros for the residual output projections under ``zero_init_residual``.

    A head tied to the token embedding is initialised as the embedding it shares, normal(init_std):
    a Xavier head init used to overwrite the tied embedding (std 0.0063 instead of 0.02)."""
    n_layers = cfg.n_layers + cfg.n_encoder_layers
    residual_std = cfg.init_std / math.sqrt(2 * n_layers) if cfg.scaled_residual_init else cfg.init_std
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and id(module.weight) in embedding_weights):
            nn.init.normal_(module.weight, 0.0, cfg.init_std)
        elif isinstance(module, nn.Linear):
            residual = writes_residual(module)
            if residual and cfg.zero_init_residual:
                nn.init.zeros_(module.weight)
            elif cfg.init == "xavier":
                nn.init.xavier_uniform_(module.weight, gain=residual_std / cfg.init_std if residual else 1.0)
            else:
                nn.init.normal_(module.weight, 0.0, residual_std if residual else cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


@torch.no_grad()
def normalize_weights_(model: nn.Module) -> None:
    """nGPT: every matrix unit-norm along the embedding dimension: the columns of residual
    projections (D, in), the rows of everything else (out, D) and of the embeddings (V, D)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and _has_weight(module):
            module.weight.copy_(unit_norm(module.weight, dim=0 if writes_residual(module) else 1))
