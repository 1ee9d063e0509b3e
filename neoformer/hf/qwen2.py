"""Qwen2 (``Qwen2ForCausalLM``) -> neoformer decoders (import only).

Qwen2 is Llama with a bias on q/k/v only. neoformer has one ``bias`` switch for every linear,
so the import sets ``bias=True`` and gives o_proj and the FFN zero biases: the same function,
exactly. (Exported back, such a model is a Llama with attention_bias = mlp_bias = True.)
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from . import llama
from .common import HFWeights, take_lm_head

ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM"}
_ZERO_BIAS = ("attn.o_proj.bias", "ffn.gate.bias", "ffn.up.bias", "ffn.down.bias")


def config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise ValueError(f"{arch}: use_sliding_window=True (per-layer windows) is not supported")
    return {**llama.config_from_hf({**hf, "attention_bias": True, "mlp_bias": True}, "LlamaForCausalLM"),
            "bias": True}


def weights_from_hf(w: HFWeights, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    w.prefix = "model." if any(k.startswith("model.") for k in w.tensors) else ""
    sd = {"embed.tokens.weight": w.take("embed_tokens.weight"), "decoder.norm.weight": w.take("norm.weight")}
    for i in range(cfg.n_layers):
        for ours, theirs in llama._LAYER.items():
            if ours in _ZERO_BIAS:
                continue
            sd[f"decoder.blocks.{i}.{ours}"] = w.take(f"layers.{i}.{theirs}")
        for ours in _ZERO_BIAS:
            weight = sd[f"decoder.blocks.{i}.{ours.replace('bias', 'weight')}"]
            sd[f"decoder.blocks.{i}.{ours}"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    take_lm_head(sd, w, cfg)
    return sd
