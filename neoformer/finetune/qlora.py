"""QLoRA (Dettmers et al. 2023): LoRA on a base whose linear layers are quantized (NF4, INT8).

The quantizer is ``neoformer.quantize`` (its quantized linears expose ``in_features``,
``out_features``, ``forward`` and ``dequantize()``, all LoRA needs); it is imported when asked.
"""
from __future__ import annotations

import importlib

from torch import nn

from ..config import ConfigError


def quantize_base(model: nn.Module, scheme: str) -> nn.Module:
    """``model`` with its linear layers quantized by ``neoformer.quantize`` (in place where it can)."""
    try:
        quantize = importlib.import_module("neoformer.quantize")
    except ImportError:
        raise ConfigError("--qlora needs neoformer.quantize, which this neoformer lacks; use plain LoRA") from None
    quantized = quantize.quantize_model(model, scheme=scheme)
    return model if quantized is None else quantized


__all__ = ["quantize_base"]
