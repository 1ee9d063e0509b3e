"""GPT-2 (``GPT2LMHeadModel``) <-> neoformer decoders.

GPT-2 is pre-norm LayerNorm with bias, learned absolute positions, a plain FFN and (usually)
tied embeddings. Its linears are ``Conv1D`` modules that store weights as (in, out), the
transpose of ``nn.Linear``, and Q, K, V live in one ``c_attn`` (out dim ordered q | k | v).
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from .common import HFWeights, take_lm_head

ARCHITECTURES = ("GPT2LMHeadModel",)
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel"}

_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
           "silu": "silu", "swish": "silu"}
_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_LINEAR = {"attn.o_proj": "attn.c_proj", "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}  # Conv1D, transposed
_NORMS = {"attn_norm": "ln_1", "ffn_norm": "ln_2"}


def config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                     ("add_cross_attention", True)):
        if hf.get(key, not bad) == bad:
            raise ValueError(f"{arch}: {key}={bad} is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACT_IN:
        raise ValueError(f"{arch}: activation_function {act!r} is not supported (supported: {', '.join(_ACT_IN)})")
    d, pad = hf["n_embd"], hf.get("pad_token_id")
    return dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        ffn_hidden=hf.get("n_inner") or 4 * d, activation=_ACT_IN[act], norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), max_seq_len=int(hf.get("n_positions", 1024)),
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < hf["vocab_size"] else None,
        position="learned", attn_dropout=float(hf.get("attn_pdrop", 0.1)),
        hidden_dropout=float(hf.get("resid_pdrop", 0.1)), embed_dropout=float(hf.get("embd_pdrop", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)), scaled_residual_init=True,
    )


def weights_from_hf(w: HFWeights, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict with separate q/k/v projections."""
    w.prefix = "transformer." if any(k.startswith("transformer.") for k in w.tensors) else ""
    sd = {"embed.tokens.weight": w.take("wte.weight"), "embed.positions.weight": w.take("wpe.weight"),
          "decoder.norm.weight": w.take("ln_f.weight"), "decoder.norm.bias": w.take("ln_f.bias")}
    for i in range(cfg.n_layers):
        ours, theirs = f"decoder.blocks.{i}.", f"h.{i}."
        for o, t in _NORMS.items():
            for kind in ("weight", "bias"):
                sd[f"{ours}{o}.{kind}"] = w.take(f"{theirs}{t}.{kind}")
        for o, t in _LINEAR.items():
            sd[f"{ours}{o}.weight"] = w.take(f"{theirs}{t}.weight").t()
            sd[f"{ours}{o}.bias"] = w.take(f"{theirs}{t}.bias")
        qkv_w = w.take(f"{theirs}attn.c_attn.weight").t().chunk(3, dim=0)
        qkv_b = w.take(f"{theirs}attn.c_attn.bias").chunk(3, dim=0)
        for n, weight, bias in zip("qkv", qkv_w, qkv_b):
            sd[f"{ours}attn.{n}_proj.weight"], sd[f"{ours}attn.{n}_proj.bias"] = weight, bias
    take_lm_head(sd, w, cfg)
    return sd


# ---- export ---------------------------------------------------------------------------------
def check_exportable(cfg: ModelConfig) -> str:
    """'GPT2LMHeadModel' for a learned-position decoder, or a ValueError naming what GPT-2 lacks."""
    problems = [
        (cfg.norm != "layernorm", f"norm='layernorm' (got {cfg.norm!r})"),
        (not cfg.bias, "bias=True (GPT-2 has bias on every linear and LayerNorm)"),
        (cfg.activation not in _ACT_OUT, f"activation in {', '.join(_ACT_OUT)} (got {cfg.activation!r})"),
        (cfg.resolved_n_kv_heads != cfg.n_heads,
         f"n_kv_heads == n_heads (got {cfg.resolved_n_kv_heads} K/V heads, GQA/MQA)"),
        (cfg.resolved_head_dim * cfg.n_heads != cfg.d_model,
         f"head_dim == d_model / n_heads (got {cfg.resolved_head_dim})"),
        (cfg.sliding_window is not None, "no sliding_window"),
        (cfg.learned_pos_offset != 0, f"learned_pos_offset=0 (got {cfg.learned_pos_offset})"),
    ]
    for bad, need in problems:
        if bad:
            raise ValueError(f"to_hf: a learned-position model exports as GPT-2, which needs {need}")
    return "GPT2LMHeadModel"


def config_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    return {
        "architectures": [arch], "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.resolved_ffn_hidden,
        "n_positions": cfg.max_seq_len,
        "activation_function": _ACT_OUT[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
        "attn_pdrop": cfg.attn_dropout, "resid_pdrop": cfg.hidden_dropout, "embd_pdrop": cfg.embed_dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "scale_attn_weights": True,
        "initializer_range": cfg.init_std, "pad_token_id": cfg.pad_token_id,
        "bos_token_id": None, "eos_token_id": None, "use_cache": True,
    }


def weights_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": sd["embed.tokens.weight"], "transformer.wpe.weight": sd["embed.positions.weight"],
           "transformer.ln_f.weight": sd["decoder.norm.weight"], "transformer.ln_f.bias": sd["decoder.norm.bias"]}
    for i in range(cfg.n_layers):
        ours, theirs = f"decoder.blocks.{i}.", f"transformer.h.{i}."
        for o, t in _NORMS.items():
            for kind in ("weight", "bias"):
                out[f"{theirs}{t}.{kind}"] = sd[f"{ours}{o}.{kind}"]
        for o, t in _LINEAR.items():
            out[f"{theirs}{t}.weight"] = sd[f"{ours}{o}.weight"].t()
            out[f"{theirs}{t}.bias"] = sd[f"{ours}{o}.bias"]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat([sd[f"{ours}attn.{n}_proj.weight"] for n in "qkv"]).t()
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([sd[f"{ours}attn.{n}_proj.bias"] for n in "qkv"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out
