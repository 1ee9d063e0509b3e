"""Model core. Components are picked from small registries by serialisable names."""
from __future__ import annotations

import torch

from .. import kinds
from ..config import ModelConfig
from ..presets import get_preset
from .head_loss import chunked_cross_entropy, chunked_head_loss
from .transformer import DecoderLM, EncoderDecoderLM, EncoderMLM, NeoFormerModel, Past


def build_model(config: ModelConfig | str, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, **overrides) -> NeoFormerModel:
    """Build a model from a config or a preset name (``overrides`` change config fields).

    ``device="meta"`` builds the module tree without allocating memory (for planning large presets).
    """
    cfg = get_preset(config) if isinstance(config, str) else config
    if overrides:
        cfg = cfg.replace(**overrides)
    with torch.device(device or "cpu"):
        model = kinds.get(cfg.kind).build(cfg)  # the kind's registered model class
    return model.to(dtype) if dtype is not None else model


__all__ = ["build_model", "chunked_head_loss", "chunked_cross_entropy", "DecoderLM", "EncoderMLM", "EncoderDecoderLM", "NeoFormerModel", "Past"]
