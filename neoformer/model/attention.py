"""Attention: one module for self- and cross-attention, MHA/GQA/MQA, with three backends.

Masks are described once per forward by an ``AttnContext`` (positions of queries and keys,
causality, padding, packed-document segments, additive position bias). Each backend turns the
context into what it needs: flash-attn takes causal/window/varlen metadata directly, SDPA and
the eager reference take a boolean mask built from positions (cached per window size, so all
layers of a forward share it).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .autocast import cast_once
from .chunked_attention import chunked_attention, use_chunked
from .norms import unit_norm
from .positions import apply_rope
from .weights import residual_projection

_FLASH_INSTALLED = importlib.util.find_spec("flash_attn") is not None
_CPU_HAS_AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()  # bf16 matrix tiles (Xeon 4th gen+)


def keep_mask(attention_mask) -> torch.Tensor:
    """Any padding-mask form -> bool (B, L), True = a real token. The one place masks are read.

    Accepted: bool (True = keep); 0/1 integers or floats (1 = keep, the Hugging Face tokenizer
    form); additive floats (0 = keep, -inf or a large negative number = masked, NeoBERT's training
    form). A float mask with a negative entry is additive; one of only 0s and 1s is 0/1 (all 0s:
    additive, since a 0/1 mask that masks every token means nothing)."""
    mask = torch.as_tensor(attention_mask)
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("an integer attention_mask must hold only 0 (padding) and 1 (token)")
        return mask != 0
    if bool(torch.isnan(mask).any()):
        raise ValueError("attention_mask contains NaN")
    if bool((mask < 0).any()) or not bool(mask.any()):  # additive: 0 keeps, negative masks
        if bool((mask > 0).any()):
            raise ValueError("attention_mask mixes 1s with negative values; pass 0/1 (1 = token) or "
                             "additive (0 = token, -inf = padding)")
        return mask == 0
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("a float attention_mask must be 0/1 (1 = token) or additive (0 = token, -inf = padding)")
    return mask != 0


@dataclass
class PackedInfo:
    """Metadata of documents packed into one row, prepared once per forward (flash varlen layout)."""

    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 cumulative lengths starting at 0
    max_seqlen: int
    positions: torch.Tensor  # (1, T) position inside each document
    segments: torch.Tensor  # (1, T) document index of each token

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int) -> "PackedInfo":
        cu = cu_seqlens.to(torch.int32)
        if cu.ndim != 1 or cu[0] != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}; got {cu.tolist()}")
        lengths = (cu[1:] - cu[:-1]).long()
        segments = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
        starts = torch.repeat_interleave(cu[:-1].long(), lengths)
        positions = torch.arange(total, device=cu.device) - starts
        return cls(cu, int(lengths.max()), positions[None], segments[None])


@dataclass
class AttnContext:
    """Everything the layers of one forward need to mask and bias attention."""

    q_pos: torch.Tensor  # (B|1, Lq) absolute position of each query
    k_pos: torch.Tensor  # (B|1, Lk) absolute position of each key (cache included)
    causal: bool
    key_keep: torch.Tensor | None = None  # (B, Lk) True = real token, False = padding
    segments: torch.Tensor | None = None  # (1, T) packed document ids (queries = keys)
    packed: PackedInfo | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin of the queries (B|1, 1, Lq, Dh)
    bias: torch.Tensor | None = None  # (B|1, H, Lq, Lk) additive ALiBi / relative bias
    alibi_slopes: list[float] | None = None  # flash-attn applies ALiBi itself
    _masks: dict = field(default_factory=dict)

    def needs_mask(self, window: int | None) -> bool:
        return bool(window) or self.key_keep is not None or self.segments is not None or (
            self.causal and self.q_pos.shape[-1] > 1)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """(B|1, 1, Lq, Lk) bool, True = may attend; None when everything may attend."""
        if not self.needs_mask(window):
            return None
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    def _build_mask(self, window: int | None) -> torch.Tensor:
        distance = self.q_pos[:, :, None] - self.k_pos[:, None, :]  # (B, Lq, Lk) query - key
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if self.causal:
            allowed &= distance >= 0
        if window:
            allowed &= (distance < window) if self.causal else (distance.abs() < window)
        if self.key_keep is not None:
            allowed = allowed & self.key_keep[:, None, :]
        if self.segments is not None:
            allowed = allowed & (self.segments[:, :, None] == self.segments[:, None, :])
        # a query with nothing to attend to (a padding row) would give NaN; let it see everything,
        # its output is ignored anyway
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        return allowed[:, None]


# ---- backends -------------------------------------------------------------------------------
def eager_attention(q, k, v, ctx: AttnContext, window, scale, dropout_p, training):
    """Reference: explicit softmax(QK^T * scale + bias + mask) V in fp32 (fp64 stays fp64)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, Lk, Dh)
    v = v.repeat_interleave(groups, dim=1)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if ctx.bias is not None:
        scores = scores + ctx.bias.to(compute)
    mask = ctx.mask(window)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs.to(v.dtype), v)


# A faster CPU kernel for attention with few query rows (decode steps) registers itself here -- neoformer.kernels
# does once its C++ library loads -- as fn(q, k, v, bool mask or None, is_causal, scale) -> out, or None where
# it does not apply. (model/ imports no feature package; the kernels package fills this hook.)
SMALL_QUERY_KERNELS: list = []


def _sdpa_mask(q, k, ctx: AttnContext, window):
    """(mask, is_causal) for SDPA: the fused causal flag where queries and keys are the same positions."""
    mask = ctx.mask(window)
    # a branch, not the comparison itself: with a symbolic key length (compiled decode) that is a SymBool
    same_length = True if q.shape[2] == k.shape[2] else False  # noqa: SIM210
    is_causal = ctx.causal and mask is not None and same_length and not window and ctx.key_keep is None \
        and ctx.segments is None and ctx.bias is None
    return (None if is_causal else mask), is_causal


def sdpa_attention(q, k, v, ctx: AttnContext, window, scale, dropout_p, training):
    if SMALL_QUERY_KERNELS and q.device.type == "cpu" and ctx.bias is None and not (training and dropout_p):
        out = SMALL_QUERY_KERNELS[0](q, k, v, *_sdpa_mask(q, k, ctx, window), scale)
        if out is not None:
            return out
    if q.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or v.dtype in (torch.bfloat16, torch.float16)) \
            and not (_CPU_HAS_AMX and q.dtype == k.dtype == v.dtype == torch.bfloat16):
        # measured: PyTorch's CPU attention kernels are ~4x slower (fwd + bwd) in bf16/fp16 than in fp32 on a CPU
        # without AMX (Zen 4); with AMX, bf16 is 1.7x faster (SDPA, causal fwd + bwd, 16 x 4 x 1024 x 64)
        with torch.autocast("cpu", enabled=False):
            out = sdpa_attention(q.float(), k.float(), v.float(), ctx, window, scale, dropout_p, training)
        return out.to(v.dtype)
    mask, is_causal = _sdpa_mask(q, k, ctx, window)
    if ctx.bias is not None:
        bias = ctx.bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    if use_chunked(q, mask, dropout_p, training):  # CPU SDPA has no dropout kernel: its math path keeps B*H*T*T
        return chunked_attention(q, k, v, mask, is_causal, scale, dropout_p)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0, is_causal=is_causal,
        scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flash_usable(q: torch.Tensor, ctx: AttnContext) -> bool:
    """flash-attn 2 handles causal, windows, ALiBi and packed varlen; padding masks and the T5
    bias need the mask-based backends."""
    return (_FLASH_INSTALLED and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and ctx.key_keep is None and (ctx.bias is None or ctx.alibi_slopes is not None))


def flash_attention(q, k, v, ctx: AttnContext, window, scale, dropout_p, training):  # pragma: no cover - CUDA only
    import flash_attn

    left = window - 1 if window else -1
    kwargs = dict(dropout_p=dropout_p if training else 0.0, softmax_scale=scale, causal=ctx.causal,
                  window_size=(left, 0 if ctx.causal else left))
    if ctx.alibi_slopes is not None:
        kwargs["alibi_slopes"] = torch.tensor(ctx.alibi_slopes, device=q.device, dtype=torch.float32)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, Dh)
    if ctx.packed is not None:
        cu, max_len = ctx.packed.cu_seqlens, ctx.packed.max_seqlen
        out = flash_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len, **kwargs)[None]
    else:
        out = flash_attn.flash_attn_func(q, k, v, **kwargs)
    return out.transpose(1, 2)


BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash": flash_attention}


def pick_backend(name: str, q: torch.Tensor, ctx: AttnContext):
    """Fallback chain flash -> sdpa -> eager; an explicit 'eager' or 'sdpa' is always honoured."""
    if name in ("auto", "flash") and flash_usable(q, ctx):
        return flash_attention
    if name == "eager":
        return eager_attention
    return sdpa_attention


# ---- the module ------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads. Self-attention when ``memory`` is None."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim
        self.layer_idx, self.cross = layer_idx, cross
        self.window = None if cross else cfg.layer_window(layer_idx)
        self.backend = cfg.attn_backend
        self.dropout_p = cfg.attn_dropout
        self.fused = cfg.fused_qkv and not cross
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.fused:
            self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.bias)
        else:
            self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.bias)
            self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
            self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = residual_projection(nn.Linear(q_dim, cfg.d_model, bias=cfg.bias))
        self.ngpt = cfg.ngpt
        self.qk_norm = cfg.qk_norm
        if cfg.ngpt:  # learned per-dimension scale of the normalized q and k (nGPT s_qk)
            self.qk_scale = nn.Parameter(torch.ones(self.head_dim))
        self.scale = math.sqrt(self.head_dim) if cfg.ngpt else 1.0 / math.sqrt(self.head_dim)

    def split_heads(self, t: torch.Tensor, n_heads: int) -> torch.Tensor:
        """(B, L, n_heads * Dh) -> (B, n_heads, L, Dh)."""
        return t.view(t.shape[0], t.shape[1], n_heads, self.head_dim).transpose(1, 2)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K, V of the encoder output (B, S, D) -> each (B, Hkv, S, Dh); computed
        once per source during generation instead of once per decoded token."""
        return self.split_heads(self.k_proj(memory), self.n_kv_heads), self.split_heads(self.v_proj(memory), self.n_kv_heads)

    def project(self, x: torch.Tensor, memory):
        """x (B, L, D) -> q (B, H, L, Dh), k, v (B, Hkv, Lk, Dh). ``memory``: encoder output
        (B, S, D), its precomputed (K, V), or None for self-attention."""
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        x = cast_once(x)
        memory = cast_once(memory) if isinstance(memory, torch.Tensor) else memory
        if self.fused:
            q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
            return self.split_heads(q, self.n_heads), self.split_heads(k, self.n_kv_heads), \
                self.split_heads(v, self.n_kv_heads)
        q = self.split_heads(self.q_proj(x), self.n_heads)
        if isinstance(memory, tuple):
            return (q, *memory)
        k, v = self.memory_kv(x if memory is None else memory)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: AttnContext, memory: torch.Tensor | None = None, cache=None):
        """x (B, L, D) -> out (B, L, D). ``cache`` (model/state.py) stores the new K, V and
        returns every cached one, each (B, Hkv, L_total, Dh)."""
        q, k, v = self.project(x, memory)
        if self.qk_norm:  # per head, before RoPE (RoPE rotates pairs: it keeps the norm)
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if ctx.rope is not None and not self.cross:
            cos, sin = ctx.rope
            # rotated in the angles' precision, kept in the projection's dtype (bf16 under autocast, as on GPU)
            q, k = apply_rope(q, cos, sin).to(q.dtype), apply_rope(k, cos, sin).to(k.dtype)
        if self.ngpt:
            q, k = unit_norm(q) * self.qk_scale, unit_norm(k) * self.qk_scale
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        attend = BACKENDS[self.backend] if self.backend in ("eager", "sdpa") else pick_backend(self.backend, q, ctx)
        out = attend(q, k, v, ctx, self.window, self.scale, self.dropout_p, self.training)  # (B, H, L, Dh)
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))
