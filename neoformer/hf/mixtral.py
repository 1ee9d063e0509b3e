"""Mixtral (``MixtralForCausalLM``) <-> neoformer decoders with a mixture of experts.

Mixtral is Llama with every FFN replaced by top-k routed SwiGLU experts whose top-k softmax
weights are renormalised to sum to one, exactly neoformer's ``MixtureOfExperts``. Checkpoints
come in two layouts: per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` (transformers 4.x, what
we write) and fused ``mlp.experts.gate_up_proj`` / ``down_proj`` (transformers 5 in memory);
both are read.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from . import llama
from .common import HFWeights, take_lm_head

ARCHITECTURES = ("MixtralForCausalLM",)
MODEL_TYPES = {"mixtral": "MixtralForCausalLM"}
_ATTN_AND_NORMS = {k: v for k, v in llama._LAYER.items() if not k.startswith("ffn.")}


def config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{arch}: hidden_act {hf['hidden_act']!r} is not supported (supported: silu)")
    fields = llama.config_from_hf({**hf, "attention_bias": False, "mlp_bias": False}, "LlamaForCausalLM")
    if hf.get("sliding_window"):
        fields["sliding_window"] = hf["sliding_window"]
    return {**fields, "moe_experts": hf["num_local_experts"], "moe_top_k": hf.get("num_experts_per_tok", 2),
            "moe_aux_weight": float(hf.get("router_aux_loss_coef", 0.01))}


def weights_from_hf(w: HFWeights, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    w.prefix = "model." if any(k.startswith("model.") for k in w.tensors) else ""
    sd = {"embed.tokens.weight": w.take("embed_tokens.weight"), "decoder.norm.weight": w.take("norm.weight")}
    fused = any(".mlp.experts.gate_up_proj" in k for k in w.tensors)
    for i in range(cfg.n_layers):
        ours, theirs = f"decoder.blocks.{i}.", f"layers.{i}."
        for o, t in _ATTN_AND_NORMS.items():
            if not o.endswith("bias"):
                sd[ours + o] = w.take(theirs + t)
        moe = theirs + ("mlp." if fused else "block_sparse_moe.")
        sd[ours + "ffn.router.weight"] = w.take(moe + "gate.weight")
        if fused:
            gate_up, down = w.take(moe + "experts.gate_up_proj"), w.take(moe + "experts.down_proj")
        for e in range(cfg.moe_experts):
            expert = f"{ours}ffn.experts.{e}."
            if fused:
                sd[expert + "gate.weight"], sd[expert + "up.weight"] = gate_up[e].chunk(2, dim=0)
                sd[expert + "down.weight"] = down[e]
            else:
                for name, hf_name in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
                    sd[f"{expert}{name}.weight"] = w.take(f"{moe}experts.{e}.{hf_name}.weight")
    take_lm_head(sd, w, cfg)
    return sd


# ---- export ---------------------------------------------------------------------------------
def check_exportable(cfg: ModelConfig) -> str:
    problems = [(cfg.norm != "rmsnorm", f"norm='rmsnorm' (got {cfg.norm!r})"),
                (cfg.activation != "swiglu", f"activation='swiglu' (got {cfg.activation!r})"),
                (cfg.bias, "bias=False"), (cfg.rope_scaling is not None, "no rope_scaling")]
    for bad, need in problems:
        if bad:
            raise ValueError(f"to_hf: a mixture of experts exports as Mixtral, which needs {need}")
    return "MixtralForCausalLM"


def config_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    out = llama.config_to_hf(cfg, "LlamaForCausalLM")
    for key in ("attention_bias", "mlp_bias", "head_dim"):
        out.pop(key, None)
    return {**out, "architectures": [arch], "model_type": "mixtral", "num_local_experts": cfg.moe_experts,
            "num_experts_per_tok": cfg.moe_top_k, "router_aux_loss_coef": cfg.moe_aux_weight,
            "head_dim": cfg.resolved_head_dim, "sliding_window": cfg.sliding_window, "output_router_logits": False}


def weights_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["embed.tokens.weight"], "model.norm.weight": sd["decoder.norm.weight"]}
    for i in range(cfg.n_layers):
        ours, theirs = f"decoder.blocks.{i}.", f"model.layers.{i}."
        for o, t in _ATTN_AND_NORMS.items():
            if ours + o in sd:
                out[theirs + t] = sd[ours + o]
        out[theirs + "block_sparse_moe.gate.weight"] = sd[ours + "ffn.router.weight"]
        for e in range(cfg.moe_experts):
            for name, hf_name in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
                out[f"{theirs}block_sparse_moe.experts.{e}.{hf_name}.weight"] = sd[f"{ours}ffn.experts.{e}.{name}.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out
