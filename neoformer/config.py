"""Model configuration: one validated, serialisable dataclass for every architecture.

Every option is a plain value (str / int / float / bool / None / list), so a config round-trips
through JSON and YAML. Invalid combinations are rejected when the config is *built*, with one
line that names the field, e.g. ``n_heads (12) must be divisible by n_kv_heads (5)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

NORMS = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("relu", "relu2", "gelu", "gelu_tanh", "silu", "glu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("glu", "swiglu", "geglu")
POSITIONS = ("rope", "sinusoidal", "learned", "alibi", "relative", "none")
ROPE_SCALINGS = (None, "linear", "ntk")
ATTN_BACKENDS = ("auto", "flash", "sdpa", "eager")
INITS = ("normal", "xavier")
# label value the models' loss skips (padding, unmasked MLM positions); data/ writes it, train/ counts with it.
# It lives here, below model/ and data/, which may not import each other.
IGNORE_INDEX = -100


class ConfigError(ValueError):
    """A config value or combination is invalid. The message names the field."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or ``""``: the hint every unknown-name error adds."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require_finite(config: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """Each named field must be a finite number or None: NaN and inf slip through ``< 0`` checks."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{prefix}{name} ({value!r}) must be a finite number")


def _one_of(cfg, name: str, allowed) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{name} ({value!r}) must be one of: {', '.join(str(a) for a in allowed)}")


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} ({value!r}) must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model (immutable: change it with ``dataclasses.replace`` or ``.replace``).

    Every field, its default and its rules: docs/config.md.
    """

    name: str = "custom"
    kind: str = "decoder"  # decoder | encoder (MLM) | encoder_decoder (seq2seq); registry: neoformer/kinds.py
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4  # decoder layers (encoder layers for kind=encoder)
    n_encoder_layers: int = 0  # only for kind=encoder_decoder
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; in between = GQA
    head_dim: int | None = None  # None = d_model // n_heads
    ffn_hidden: int | None = None  # None = 4 * d_model
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    bias: bool = False  # bias on attention / FFN linears and LayerNorm
    fused_qkv: bool = False  # one Linear for Q, K and V (NeoBERT)
    tie_embeddings: bool = True
    max_seq_len: int = 1024
    pad_token_id: int | None = None

    # positions
    position: str = "rope"
    rope_base: float = 10000.0
    rope_scaling: str | None = None  # None | linear | ntk
    rope_scaling_factor: float = 1.0
    learned_pos_offset: int = 0  # NeoBERT: 1, position 0 is reserved for padding
    relative_buckets: int = 32  # T5 relative bias
    relative_max_distance: int = 128
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani et al.)
    embed_norm: bool = False  # a norm (cfg.norm) over the summed embeddings (BERT)

    # output head
    mlm_transform: bool = False  # encoders: dense + activation + norm before the output layer (BERT's MLM head)
    head_bias: bool = False  # a bias on the output layer (BERT's MLM decoder)

    # attention
    attn_backend: str = "auto"  # auto = flash (CUDA, installed) -> sdpa -> eager
    sliding_window: int | None = None  # tokens each query sees (itself included); None = global
    sliding_window_pattern: str | None = None  # e.g. "LLLG": L = local, G = global, repeated over layers
    # RMS-normalise each head's queries and keys (no gain) before RoPE: Dehghani et al. 2023 ("Scaling Vision
    # Transformers to 22B"), as in the modded-nanogpt speedrun (Jordan et al. 2024) and OLMo 2
    qk_norm: bool = False
    # logits -> cap * tanh(logits / cap) (Gemma 2, Team Gemma 2024; modded-nanogpt uses 15-30); None = off
    logit_softcap: float | None = None

    # regularisation and init
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0
    embed_dropout: float = 0.0
    init: str = "normal"  # normal(init_std) | xavier (Nima)
    init_std: float = 0.02
    scaled_residual_init: bool = False  # residual output projections std / sqrt(2 * n_layers) (GPT-2, Lumi)
    # residual output projections (attention o_proj, FFN down) start at zero, so every block starts as the
    # identity (modded-nanogpt, Jordan et al. 2024; cf. Fixup, Zhang et al. 2019); overrides scaled_residual_init
    zero_init_residual: bool = False

    # nGPT normalized transformer (Loshchilov et al. 2024)
    ngpt: bool = False

    # NeoFormer-X memory layer
    rmc: bool = False  # Recursive Memory Core
    rmc_mem_size: int = 32
    nsb: bool = False  # Neural-Symbolic Bridge
    nsb_rules: int = 32
    nsb_rule_dim: int = 32

    # Mixture of experts (replaces the dense FFN in every layer when moe_experts > 0)
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_aux_weight: float = 0.01

    gradient_checkpointing: bool = False

    # ---- derived values: the field's value, or its default when the field is None ------------
    @property
    def resolved_n_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_ffn_hidden(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    @property
    def gated_ffn(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def causal(self) -> bool:
        from .kinds import get

        return get(self.kind).causal

    def layer_window(self, layer_idx: int) -> int | None:
        """Sliding window of one layer (None = global attention)."""
        if self.sliding_window is None:
            return None
        pattern = self.sliding_window_pattern
        if not pattern:
            return self.sliding_window
        return self.sliding_window if pattern[layer_idx % len(pattern)] == "L" else None

    # ---- validation -----------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every rule, each failing with one line that names the field (docs/config.md lists them)."""
        require_finite(self, ("norm_eps", "rope_base", "rope_scaling_factor", "attn_dropout", "hidden_dropout",
                              "embed_dropout", "init_std", "moe_aux_weight", "logit_softcap"))
        from .kinds import get as model_kind

        kind = model_kind(self.kind)  # unknown: one line naming the registered kinds
        self._check_names_and_sizes()
        self._check_attention_and_positions()
        self._check_layers(kind)

    def _check_names_and_sizes(self) -> None:
        for name, allowed in (("norm", NORMS), ("norm_position", NORM_POSITIONS), ("activation", ACTIVATIONS),
                              ("position", POSITIONS), ("rope_scaling", ROPE_SCALINGS),
                              ("attn_backend", ATTN_BACKENDS), ("init", INITS)):
            _one_of(self, name, allowed)
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
        _positive(self, *(n for n in ("n_kv_heads", "head_dim", "ffn_hidden", "sliding_window")
                          if getattr(self, n) is not None))
        for name in ("attn_dropout", "hidden_dropout", "embed_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be in [0, 1)")
        for name in ("norm_eps", "init_std", "rope_base", "logit_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be positive")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})")

    def _check_attention_and_positions(self) -> None:
        if self.n_heads % self.resolved_n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.resolved_n_kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
        if self.position == "rope" and self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim ({self.resolved_head_dim}) must be even for rope")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"d_model ({self.d_model}) must be even for sinusoidal positions")
        if self.rope_scaling is not None and self.position != "rope":
            raise ConfigError(f"rope_scaling ({self.rope_scaling!r}) needs position='rope', not {self.position!r}")
        if self.rope_scaling is not None and self.rope_scaling_factor < 1.0:
            raise ConfigError(f"rope_scaling_factor ({self.rope_scaling_factor}) must be >= 1")
        if self.learned_pos_offset < 0:
            raise ConfigError(f"learned_pos_offset ({self.learned_pos_offset}) must be >= 0")
        if self.learned_pos_offset and self.position != "learned":
            raise ConfigError(f"learned_pos_offset ({self.learned_pos_offset}) needs position='learned'")
        if self.position == "relative":
            _positive(self, "relative_buckets", "relative_max_distance")
        if self.sliding_window_pattern is not None:
            if self.sliding_window is None:
                raise ConfigError("sliding_window_pattern needs sliding_window (the local window size)")
            if not self.sliding_window_pattern or set(self.sliding_window_pattern) - {"L", "G"}:
                raise ConfigError(
                    f"sliding_window_pattern ({self.sliding_window_pattern!r}) must be letters L (local) and G (global)")

    def _check_layers(self, kind) -> None:
        """Rules that depend on the model kind: encoder layers, MoE, the memory layer, nGPT."""
        if kind.encoder_layers:
            _positive(self, "n_encoder_layers")
            if self.position == "learned" and self.learned_pos_offset:
                raise ConfigError("learned_pos_offset is only for encoder/decoder-only models")
        elif self.n_encoder_layers:
            raise ConfigError(f"n_encoder_layers ({self.n_encoder_layers}) is only for kind='encoder_decoder'")
        if self.moe_experts < 0:
            raise ConfigError(f"moe_experts ({self.moe_experts}) must be >= 0 (0 = dense FFN)")
        if self.moe_experts:
            _positive(self, "moe_top_k")
            if self.moe_top_k > self.moe_experts:
                raise ConfigError(f"moe_top_k ({self.moe_top_k}) must be <= moe_experts ({self.moe_experts})")
            if self.moe_aux_weight < 0:
                raise ConfigError(f"moe_aux_weight ({self.moe_aux_weight}) must be >= 0")
        if self.rmc or self.nsb:
            if not kind.memory_layer:
                raise ConfigError(f"rmc/nsb (the NeoFormer-X memory layer) need kind='decoder', not {self.kind!r}")
            _positive(self, *(["rmc_mem_size"] if self.rmc else []), *(["nsb_rules", "nsb_rule_dim"] if self.nsb else []))
        if self.ngpt:
            if self.norm_position != "pre":
                raise ConfigError("ngpt=True replaces norms with normalisation; set norm_position='pre'")
            if self.moe_experts:
                raise ConfigError("ngpt=True is not supported with moe_experts > 0")
            if self.bias or self.head_bias:
                raise ConfigError("ngpt=True needs bias=False and head_bias=False (normalized weights have no bias)")
            if self.embed_norm or self.mlm_transform:
                raise ConfigError("ngpt=True normalises on its own: set embed_norm=False and mlm_transform=False")
            if self.qk_norm:
                raise ConfigError("ngpt=True normalizes queries and keys already; set qk_norm=False")
        if self.mlm_transform and self.kind != "encoder":
            raise ConfigError(f"mlm_transform (BERT's masked-LM head) is for kind='encoder', not {self.kind!r}")

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a mapping of fields, got {type(data).__name__}")
        check_field_names(cls, data, "model config")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again); unknown names get a "did you mean"."""
        check_field_names(type(self), changes, "model config")
        return dataclasses.replace(self, **changes)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
        return cls.from_dict(data.get("model", data))


def check_field_names(cls, data: dict[str, Any], what: str) -> None:
    """Refuse a key that is not a field of the dataclass ``cls``, naming the closest field."""
    known = [f.name for f in fields(cls) if f.init]
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown {what} field {key!r}{did_you_mean(key, known)}")


def coerce_value(value: Any) -> Any:
    """A value typed on the command line (or a YAML string): int, float, else YAML (bools, null, lists),
    else the string. ``3e-4`` becomes a float (YAML 1.1 would read it as a string)."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


__all__ = ["ModelConfig", "ConfigError", "IGNORE_INDEX", "coerce_value", "check_field_names", "did_you_mean", "field"]
