"""Llama and Mistral (``LlamaForCausalLM``, ``MistralForCausalLM``) <-> neoformer decoders.

Both are pre-norm RMSNorm + gated FFN + RoPE in the half-split (rotate_half) layout, which is
ours too, so weights are a pure rename. Mistral adds a uniform sliding window.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from .common import HFWeights, take_lm_head

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

# HF hidden_act of the gate -> our gated activation
_ACT_IN = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "sigmoid": "glu"}
_ACT_OUT = {"swiglu": "silu", "geglu": "gelu", "glu": "sigmoid"}

# per-layer names: ours -> HF (below model.layers.{i}.)
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{n}_proj.{k}": f"self_attn.{n}_proj.{k}" for n in "qkvo" for k in ("weight", "bias")},
    **{f"ffn.{n}.{k}": f"mlp.{n}_proj.{k}" for n in ("gate", "up", "down") for k in ("weight", "bias")},
}


def _rope(hf: dict[str, Any]) -> tuple[float, str | None, float]:
    """rope_theta, our rope_scaling, factor; from v5 ``rope_parameters`` or legacy rope_theta/rope_scaling."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if float(params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None, 1.0
    if kind == "linear":
        return theta, "linear", float(params["factor"])
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear)")


def config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    act = hf.get("hidden_act", "silu")
    if act not in _ACT_IN:
        raise ValueError(f"{arch}: hidden_act {act!r} is not supported (supported: {', '.join(_ACT_IN)})")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(f"{arch}: attention_bias ({attn_bias}) != mlp_bias ({mlp_bias}); neoformer has one "
                         "`bias` switch for both")
    theta, scaling, factor = _rope(hf)
    head_dim = hf.get("head_dim") or d // heads
    pad = hf.get("pad_token_id")
    window = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
    return dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=None if head_dim * heads == d else head_dim,
        ffn_hidden=hf["intermediate_size"], activation=_ACT_IN[act], norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), bias=attn_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < hf["vocab_size"] else None,
        position="rope", rope_base=theta, rope_scaling=scaling, rope_scaling_factor=factor,
        sliding_window=window, attn_dropout=float(hf.get("attention_dropout") or 0.0),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def weights_from_hf(w: HFWeights, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict with separate q/k/v projections."""
    w.prefix = "model." if any(k.startswith("model.") for k in w.tensors) else ""
    sd = {"embed.tokens.weight": w.take("embed_tokens.weight"), "decoder.norm.weight": w.take("norm.weight")}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER.items():
            if cfg.bias or not ours.endswith("bias"):
                sd[f"decoder.blocks.{i}.{ours}"] = w.take(f"layers.{i}.{theirs}")
    take_lm_head(sd, w, cfg)
    return sd


# ---- export ---------------------------------------------------------------------------------
def check_exportable(cfg: ModelConfig) -> str:
    """Architecture name for a rope decoder, or a ValueError naming the first feature HF lacks."""
    if cfg.norm != "rmsnorm":
        raise ValueError(f"to_hf: a rope model exports as Llama, which needs norm='rmsnorm' (got {cfg.norm!r})")
    if cfg.activation not in _ACT_OUT:
        raise ValueError(f"to_hf: a rope model exports as Llama, which needs a gated activation "
                         f"({', '.join(_ACT_OUT)}); got {cfg.activation!r}")
    if cfg.sliding_window is not None:
        if cfg.bias:
            raise ValueError("to_hf: sliding_window exports as Mistral, which has no bias; got bias=True")
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def config_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    theta = cfg.rope_base
    rope: dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling == "ntk":  # static NTK-aware scaling is just a larger base: exact as plain RoPE
        theta = cfg.rope_base * cfg.rope_scaling_factor ** (cfg.resolved_head_dim / (cfg.resolved_head_dim - 2))
    elif cfg.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    out = {
        "architectures": [arch], "model_type": "mistral" if arch == "MistralForCausalLM" else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.resolved_ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.resolved_n_kv_heads, "head_dim": cfg.resolved_head_dim,
        "hidden_act": _ACT_OUT[cfg.activation],
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": theta, "rope_parameters": {**rope, "rope_theta": theta},
        "attention_dropout": cfg.attn_dropout, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "pad_token_id": cfg.pad_token_id,
        "bos_token_id": None, "eos_token_id": None, "use_cache": True,
    }
    if cfg.rope_scaling == "linear":
        out["rope_scaling"] = dict(rope)  # transformers 4.x reads this key
    if arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    else:
        out["attention_bias"] = out["mlp_bias"] = cfg.bias
    return out


def weights_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["embed.tokens.weight"], "model.norm.weight": sd["decoder.norm.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER.items():
            if f"decoder.blocks.{i}.{ours}" in sd:
                out[f"model.layers.{i}.{theirs}"] = sd[f"decoder.blocks.{i}.{ours}"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out
