"""BERT (``BertForMaskedLM``) <-> neoformer encoders.

BERT is post-norm LayerNorm with bias everywhere, learned absolute positions from 0, a plain FFN,
a LayerNorm over the summed embeddings (``embed_norm``) and a dense + activation + LayerNorm
transform before a biased output layer (``mlm_transform``, ``head_bias``). BERT also adds a
token-type embedding; neoformer has no token types, so an import folds type 0's vector into every
position embedding (exact for the default ``token_type_ids`` = 0, which is what neoformer feeds)
and an export writes one all-zero type.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from .common import HFWeights

ARCHITECTURES = ("BertForMaskedLM",)
MODEL_TYPES = {"bert": "BertForMaskedLM"}

_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# ours (per block) -> BERT's (per layer)
_LINEAR = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
           "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
           "ffn.up": "intermediate.dense", "ffn.down": "output.dense",
           "attn_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm"}
_ROOT = {"embed.tokens.weight": "bert.embeddings.word_embeddings.weight",
         "embed.norm.weight": "bert.embeddings.LayerNorm.weight", "embed.norm.bias": "bert.embeddings.LayerNorm.bias",
         "mlm_transform.dense.weight": "cls.predictions.transform.dense.weight",
         "mlm_transform.dense.bias": "cls.predictions.transform.dense.bias",
         "mlm_transform.norm.weight": "cls.predictions.transform.LayerNorm.weight",
         "mlm_transform.norm.bias": "cls.predictions.transform.LayerNorm.bias",
         "lm_head.bias": "cls.predictions.bias"}
DECODER_BIAS = "cls.predictions.decoder.bias"  # what BERT's forward adds; the same tensor as cls.predictions.bias
# unless the checkpoint unties them (tie_word_embeddings=False in transformers 5)


def config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{arch}: position_embedding_type {hf['position_embedding_type']!r} is not supported "
                         "(only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError(f"{arch}: a BERT decoder (is_decoder / add_cross_attention) is not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_IN:
        raise ValueError(f"{arch}: hidden_act {act!r} is not supported (supported: {', '.join(_ACT_IN)})")
    pad = hf.get("pad_token_id")
    return dict(
        kind="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], ffn_hidden=hf["intermediate_size"], activation=_ACT_IN[act],
        norm="layernorm", norm_position="post", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), bias=True,
        embed_norm=True, mlm_transform=True, head_bias=True, position="learned",
        max_seq_len=int(hf.get("max_position_embeddings", 512)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < hf["vocab_size"] else None,
        attn_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
        hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        embed_dropout=float(hf.get("hidden_dropout_prob", 0.1)), init_std=float(hf.get("initializer_range", 0.02)),
    )


def weights_from_hf(w: HFWeights, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    for buffer in ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids"):
        if buffer in w.tensors:  # index buffers some checkpoints store
            w.take(buffer)
    sd = {ours: w.take(theirs) for ours, theirs in _ROOT.items()}
    token_type = w.take("bert.embeddings.token_type_embeddings.weight")
    sd["embed.positions.weight"] = w.take("bert.embeddings.position_embeddings.weight") + token_type[0]
    for i in range(cfg.n_layers):
        for ours, theirs in _LINEAR.items():
            for part in ("weight", "bias"):
                sd[f"encoder.blocks.{i}.{ours}.{part}"] = w.take(f"bert.encoder.layer.{i}.{theirs}.{part}")
    if DECODER_BIAS in w.tensors:
        sd["lm_head.bias"] = w.take(DECODER_BIAS)
    if not cfg.tie_embeddings or "cls.predictions.decoder.weight" in w.tensors:  # a tied copy may be stored
        sd["lm_head.weight"] = w.take("cls.predictions.decoder.weight")
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.tokens.weight"]
    return sd


# ---- export ---------------------------------------------------------------------------------
def check_exportable(cfg: ModelConfig) -> str:
    """'BertForMaskedLM' for a BERT-shaped encoder, or a ValueError naming what BERT would need."""
    problems = [
        (cfg.kind != "encoder", f"kind='encoder' (got {cfg.kind!r})"),
        (cfg.position != "learned" or cfg.learned_pos_offset, "learned absolute positions from 0"),
        (cfg.norm != "layernorm" or cfg.norm_position != "post", "post-norm LayerNorm"),
        (not (cfg.bias and cfg.head_bias), "bias=True and head_bias=True"),
        (not (cfg.embed_norm and cfg.mlm_transform), "embed_norm=True and mlm_transform=True"),
        (cfg.activation not in _ACT_OUT, f"activation in {', '.join(_ACT_OUT)} (got {cfg.activation!r})"),
        (cfg.resolved_n_kv_heads != cfg.n_heads or cfg.resolved_head_dim * cfg.n_heads != cfg.d_model,
         "plain multi-head attention (n_kv_heads == n_heads, head_dim == d_model / n_heads)"),
        (cfg.fused_qkv or cfg.ngpt or cfg.moe_experts or cfg.embed_scale or cfg.sliding_window is not None,
         "no fused qkv, nGPT, MoE, embed_scale or sliding window"),
    ]
    for bad, need in problems:
        if bad:
            raise ValueError(f"to_hf: an encoder exports as BERT, which needs {need}")
    return "BertForMaskedLM"


def config_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    return {
        "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.resolved_ffn_hidden, "hidden_act": _ACT_OUT[cfg.activation],
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": 1, "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_dropout_prob": cfg.hidden_dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "initializer_range": cfg.init_std, "pad_token_id": cfg.pad_token_id, "is_decoder": False,
    }


def weights_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {theirs: sd[ours] for ours, theirs in _ROOT.items()}
    out["bert.embeddings.position_embeddings.weight"] = sd["embed.positions.weight"]
    out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros_like(sd["embed.positions.weight"][:1])
    for i in range(cfg.n_layers):
        for ours, theirs in _LINEAR.items():
            for part in ("weight", "bias"):
                out[f"bert.encoder.layer.{i}.{theirs}.{part}"] = sd[f"encoder.blocks.{i}.{ours}.{part}"]
    out["cls.predictions.decoder.weight"] = sd["lm_head.weight"]
    out[DECODER_BIAS] = sd["lm_head.bias"]
    return out
