"""QLoRA (Dettmers et al. 2023): LoRA on a base whose linear layers are quantized (NF4, INT8).

The quantizer is ``neoformer.quantize`` (its quantized linears expose ``in_features``,
``out_features``, ``forward`` and ``dequantize()``, all LoRA needs); it is imported when asked.
The base is never saved: an adapter checkpoint records the scheme and group size, and loading
quantizes the (hash-verified) float base again, which is deterministic.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from ..config import ConfigError
from ..model.weights import mark_like

# quantize_model's skip words: the token embedding stays float (as in QLoRA); the output head is
# quantized with the base unless asked to stay float (--qlora-float-head)
SKIP_EMBEDDING = ("embed",)
SKIP_HEAD_AND_EMBEDDING = ("lm_head", "embed")  # also what adapters written before the head was quantized used


def _quantize_package():
    try:
        return importlib.import_module("neoformer.quantize")
    except ImportError:
        raise ConfigError("--qlora needs neoformer.quantize, which this neoformer lacks; use plain LoRA") from None


def quantize_base(model: nn.Module, scheme: str, group_size: int | None = None,
                  skip: tuple[str, ...] | list[str] = SKIP_EMBEDDING) -> nn.Module:
    """``model`` with its linear layers quantized by ``neoformer.quantize`` (in place). By default
    the output head is quantized too and the embedding stays float; ``skip`` lists the name words
    left float. A head tied to the embedding stays float with it. ``group_size``: nf4 (default 64)."""
    quantized = _quantize_package().quantize_model(model, scheme=scheme, group_size=group_size, skip=tuple(skip))
    return model if quantized is None else quantized


def quantization_settings(model: nn.Module) -> dict | None:
    """{"scheme", "group_size", "skip"} of a base :func:`quantize_base` quantized, or None."""
    settings = _quantize_package().quantization_of(model)
    if settings is None:
        return None
    return {"scheme": settings["scheme"], "group_size": settings.get("group_size"), "skip": list(settings["skip"])}


@torch.no_grad()
def dequantize_base(model: nn.Module) -> nn.Module:
    """Replace every quantized linear left in ``model`` by an fp32 nn.Linear holding its dequantized
    weight (in place): after merging a QLoRA adapter, the layers it did not adapt."""
    quantize = _quantize_package()
    for name, layer in list(quantize.quantized_modules(model).items()):
        weight = layer.dequantize(torch.float32)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, mark_like(linear, layer))
    # a float model again: nothing may take it for a quantized one (save_quantized, quantize_model)
    vars(model).pop(quantize.swap.QUANTIZATION_ATTR, None)
    return model


__all__ = ["SKIP_EMBEDDING", "SKIP_HEAD_AND_EMBEDDING", "dequantize_base", "quantization_settings", "quantize_base"]
