"""Named presets for the five seed systems. Each is a few lines derived from a family base.

``PRESET_CLAIMS`` keeps the parameter counts the seed documents state, so ``neoformer info``
can show them next to the true count (several are wrong, e.g. Nexus and Lumi).
``PRESET_RUN_DEFAULTS``: the training settings a preset brings (only the demo has any); they are
printed wherever they apply (``neoformer info PRESET``, the ``neoformer train`` header).
"""
from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig, did_you_mean

# NeoFormer-X (seed 000): decoder, GQA, RoPE, RMC + NSB, tied embeddings, cl100k_base vocabulary
_NEOFORMER_X = ModelConfig(
    name="neoformer-x", vocab_size=100277, norm="layernorm", activation="swiglu", position="rope",
    tie_embeddings=True, max_seq_len=2048, rmc=True, rmc_mem_size=32, nsb=True, nsb_rules=32, nsb_rule_dim=32)
# Nima (seed 001): GPT-style decoder, sinusoidal positions, pre-norm LayerNorm, Xavier init
_NIMA = ModelConfig(
    name="nima", vocab_size=50257, norm="layernorm", activation="relu", position="sinusoidal", bias=True,
    init="xavier", tie_embeddings=True, max_seq_len=1024)
# NeoBERT (seed 002): encoder, fused QKV, RoPE, RMSNorm, SwiGLU
_NEOBERT = ModelConfig(
    name="neobert", kind="encoder", vocab_size=30522, norm="rmsnorm", activation="swiglu", position="rope",
    fused_qkv=True, tie_embeddings=True, max_seq_len=4096, pad_token_id=0)
# Lumi (seed 003): Llama-style, no bias, untied, SentencePiece 32K, dropout 0.1, scaled residual init
_LUMI = ModelConfig(
    name="lumi", vocab_size=32768, norm="rmsnorm", activation="swiglu", position="rope", bias=False,
    tie_embeddings=False, attn_dropout=0.1, hidden_dropout=0.1, embed_dropout=0.1, scaled_residual_init=True,
    max_seq_len=1024)
# Nexus Core (seed 004): Llama-style decoder with GQA, untied output layer
_NEXUS = ModelConfig(
    name="nexus", vocab_size=32000, norm="rmsnorm", activation="swiglu", position="rope", bias=False,
    tie_embeddings=False, max_seq_len=2048)


def _p(base: ModelConfig, name: str, **changes) -> ModelConfig:
    return base.replace(name=name, **changes)


PRESETS: dict[str, ModelConfig] = {
    "neoformer-x-125m": _p(_NEOFORMER_X, "neoformer-x-125m", d_model=768, n_heads=12, n_kv_heads=3, n_layers=12),
    "neoformer-x-350m": _p(_NEOFORMER_X, "neoformer-x-350m", d_model=1024, n_heads=16, n_kv_heads=4, n_layers=24),
    "neoformer-x-760m": _p(_NEOFORMER_X, "neoformer-x-760m", d_model=1536, n_heads=16, n_kv_heads=4, n_layers=32),
    # trained by `make demo` on 2 CPU cores in a few minutes (vocabulary set by the tokenizer)
    "neoformer-x-demo": _p(_NEOFORMER_X, "neoformer-x-demo", vocab_size=4096, d_model=192, n_heads=6,
                           n_kv_heads=2, n_layers=4, ffn_hidden=512, max_seq_len=256, rmc_mem_size=16,
                           nsb_rules=16, nsb_rule_dim=32),
    "nima-tiny": _p(_NIMA, "nima-tiny", d_model=256, n_layers=4, n_heads=4, ffn_hidden=1024),
    "nima-small": _p(_NIMA, "nima-small", d_model=768, n_layers=12, n_heads=12, ffn_hidden=3072),
    "nima-medium": _p(_NIMA, "nima-medium", d_model=1024, n_layers=24, n_heads=16, ffn_hidden=4096),
    "nima-transformer": _p(_NIMA, "nima-transformer", kind="encoder_decoder", d_model=512, n_encoder_layers=6,
                           n_layers=6, n_heads=8, ffn_hidden=2048, activation="relu", embed_scale=True,
                           hidden_dropout=0.1, attn_dropout=0.1, max_seq_len=512),
    "neobert-base": _p(_NEOBERT, "neobert-base", d_model=768, n_layers=12, n_heads=12, ffn_hidden=3072),
    "neobert-tiny": _p(_NEOBERT, "neobert-tiny", d_model=256, n_layers=4, n_heads=4, ffn_hidden=1024,
                       max_seq_len=512),
    "lumi-tiny": _p(_LUMI, "lumi-tiny", n_layers=6, d_model=256, n_heads=4, ffn_hidden=1024),
    "lumi-small": _p(_LUMI, "lumi-small", n_layers=12, d_model=512, n_heads=8, ffn_hidden=2048),
    "lumi-base": _p(_LUMI, "lumi-base", n_layers=24, d_model=768, n_heads=12, ffn_hidden=3072, max_seq_len=2048),
    # the seed says "GQA" for Nexus without a K/V head count; 8 K/V heads is the Llama-3 choice
    "nexus-base": _p(_NEXUS, "nexus-base", n_layers=96, d_model=8192, n_heads=128, n_kv_heads=8, ffn_hidden=32768,
                     vocab_size=128000, max_seq_len=128000),
    "nexus-standard": _p(_NEXUS, "nexus-standard", n_layers=32, d_model=2048, n_heads=32, ffn_hidden=8192,
                         vocab_size=50000, max_seq_len=8192),
    "nexus-nano": _p(_NEXUS, "nexus-nano", n_layers=12, d_model=768, n_heads=12, ffn_hidden=3072,
                     vocab_size=32000, max_seq_len=2048),
    # the modern recipe at nanoGPT's Tiny Shakespeare size (~0.8M): Llama block + QK-norm, trained with Muon in
    # bf16 (run defaults below); the switches that measurably helped here (BENCHMARKS.md, issue 15)
    "modern-shakespeare": _p(_NEXUS, "modern-shakespeare", vocab_size=70, d_model=128, n_layers=4, n_heads=4,
                             ffn_hidden=344, qk_norm=True, max_seq_len=64),
}

# tiny debug preset of every family, for tests and smoke runs
_DEBUG = dict(d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, vocab_size=128, max_seq_len=64)
PRESETS.update({
    "neoformer-x-debug": _p(_NEOFORMER_X, "neoformer-x-debug", n_kv_heads=2, rmc_mem_size=8, nsb_rules=8,
                            nsb_rule_dim=16, **_DEBUG),
    "nima-debug": _p(_NIMA, "nima-debug", **_DEBUG),
    "nima-transformer-debug": _p(PRESETS["nima-transformer"], "nima-transformer-debug", n_encoder_layers=2,
                                 hidden_dropout=0.0, attn_dropout=0.0, **_DEBUG),
    "neobert-debug": _p(_NEOBERT, "neobert-debug", **_DEBUG),
    "lumi-debug": _p(_LUMI, "lumi-debug", attn_dropout=0.0, hidden_dropout=0.0, embed_dropout=0.0, **_DEBUG),
    "nexus-debug": _p(_NEXUS, "nexus-debug", n_kv_heads=2, **_DEBUG),
})

# Run defaults of presets meant to be trained as they are (`make demo`). `neoformer train --preset`
# applies them beneath the user's config and flags; `neoformer info PRESET` and the train header
# print them, so no preset changes a training setting out of sight. Other presets have none.
PRESET_RUN_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "neoformer-x-demo": {
        # ~3 min on 2 CPU cores: the time budget sets the cosine horizon (docs/training.md)
        "train": dict(lr=2e-3, min_lr=2e-4, warmup_steps=50, max_steps=100_000, time_budget=180.0, batch_size=16,
                      seq_len=128, eval_every=100, eval_batches=8, log_every=10, save_every=200, samples=3,
                      sample_tokens=80, weight_decay=0.1),
        # a 4,096-token BPE trains in seconds and sets the model's vocabulary
        "tokenizer": dict(kind="bpe", vocab_size=4096),
    },
    # benchmarks/shakespeare.py's `modern` recipe: val 1.57 after 2,000 steps of 12 x 64 characters, and
    # nanoGPT's final val loss in ~0.22 of nanoGPT's wall time
    "modern-shakespeare": {
        "train": dict(optimizer="muon", lr=3e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1, warmup_steps=100,
                      grad_clip=1.0, precision="bf16", batch_size=12, seq_len=64, max_steps=2000, eval_every=100),
        "tokenizer": dict(kind="char"),
    },
}

# parameter counts as the seed documents state them (shown beside the truth by `neoformer info`)
PRESET_CLAIMS: dict[str, float] = {
    "neoformer-x-125m": 125e6, "neoformer-x-350m": 350e6, "neoformer-x-760m": 760e6,
    "nima-tiny": 10e6, "nima-small": 125e6, "nima-medium": 350e6,
    "lumi-tiny": 6e6, "lumi-small": 42e6, "lumi-base": 124e6,
    "nexus-base": 405e9, "nexus-standard": 13e9, "nexus-nano": 1.5e9,
}
# what a wrong claim would take, shown after the planner's "N layers x D wide is ~X, not Y"
PRESET_CLAIM_HINTS: dict[str, str] = {
    "nexus-base": "405B needs e.g. Llama-3.1's 126 layers x 16384",
}


def run_defaults(name: str | None) -> dict[str, dict[str, Any]]:
    """The run config sections a preset sets (``{"train": {...}, "tokenizer": {...}}``; {} for most)."""
    return {section: dict(values) for section, values in PRESET_RUN_DEFAULTS.get(name or "", {}).items()}


def format_run_defaults(name: str | None) -> str | None:
    """One line naming every run default of a preset, or None when it has none."""
    defaults = run_defaults(name)
    if not defaults:
        return None
    values = " ".join(f"{section}.{key}={value:g}" if isinstance(value, float) else f"{section}.{key}={value}"
                      for section, fields in defaults.items() for key, value in fields.items())
    return f"preset {name} sets: {values} (your config and flags override them)"


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; run `neoformer info --list` to see all presets")
    return PRESETS[name]
