"""The model-facing half of generation: prefill and one-token decode as small pure functions
over a static KV cache (gpt-fast style), plus prompt batching and context trimming.

``prefill(model, cache, ids, positions, keep)`` runs a (left-padded) prompt and returns the
logits of its last position; ``decode_one(model, cache, tokens)`` feeds one token per row at the
position the cache says comes next. Both work for decoder-only models (state the model owns,
such as the RMC running summary, travels as ``cache.model_state``, read and written by the model)
and, given the encoder output, for encoder-decoder models.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..model.attention import keep_mask
from ..model.transformer import CrossKV
from .cache import StaticKVCache


@dataclass
class Encoded:
    """Encoder-decoder: the encoder output every decoder step attends to."""

    memory: CrossKV  # per-layer cross-attention K/V of the encoder output (B, H_kv, S, Dh)
    src_mask: torch.Tensor | None  # (B, S) 1 = token

    def select(self, index: torch.Tensor) -> "Encoded":
        mask = self.src_mask.index_select(0, index) if self.src_mask is not None else None
        return Encoded(self.memory.index_select(0, index), mask)


@dataclass
class PromptBatch:
    """Prompts left-padded into one tensor. keep is None when no row is padded."""

    ids: torch.Tensor  # (B, T)
    keep: torch.Tensor | None  # (B, T) bool
    prompts: list[list[int]]

    @property
    def positions(self) -> torch.Tensor:
        """(B|1, T) per-row positions: 0 at each row's first real token."""
        if self.keep is None:
            return torch.arange(self.ids.shape[1], device=self.ids.device)[None]
        return (self.keep.long().cumsum(-1) - 1).clamp(min=0)

    def repeat(self, n: int) -> "PromptBatch":
        if n == 1:
            return self
        keep = self.keep.repeat_interleave(n, 0) if self.keep is not None else None
        return PromptBatch(self.ids.repeat_interleave(n, 0), keep, [p for p in self.prompts for _ in range(n)])


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> PromptBatch:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    keep = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        if p:
            ids[row, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            keep[row, T - len(p):] = True
    return PromptBatch(ids, None if bool(keep.all()) else keep, [list(p) for p in prompts])


def as_prompts(input_ids, attention_mask=None) -> list[list[int]]:
    """A tensor (T,) / (B, T) (+ mask, left or right padding), a list of ids or a list of lists -> lists."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids if input_ids.ndim == 2 else input_ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (T,) or (B, T), got shape {tuple(input_ids.shape)}")
        rows = ids.tolist()
        if attention_mask is not None:
            mask = keep_mask(torch.as_tensor(attention_mask).reshape(ids.shape)).tolist()
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask)]
        return rows
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a tensor of input_ids; pass a list of lists for ragged prompts")
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)]
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(r, (list, tuple)) for r in input_ids):
        return [[int(t) for t in r] for r in input_ids]
    raise ValueError("input_ids must be a tensor, a list of token ids or a list of such lists")


# ---- the two steps ---------------------------------------------------------------------------
def forward_tokens(model, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor,
                   keep: torch.Tensor | None = None, encoded: Encoded | None = None,
                   last_only: bool = True) -> torch.Tensor:
    """Run ids (B, L) at positions (B|1, L) against the cache -> logits (B, V) of the last
    position, or (B, L, V) with last_only=False (speculative verification)."""
    cache.record(ids)
    if encoded is not None:
        logits, _ = model.decode(ids, encoded.memory, encoded.src_mask, positions=positions, use_cache=False,
                                 kv_cache=cache)
        return logits[:, -1] if last_only else logits
    out = model.forward_hidden(ids, attention_mask=keep, positions=positions, use_cache=False, kv_cache=cache)
    hidden = out.hidden[:, -1] if last_only else out.hidden
    return model.logits(hidden)


def prefill(model, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor,
            keep: torch.Tensor | None = None, encoded: Encoded | None = None) -> torch.Tensor:
    """Prompt (B, T) -> logits (B, V) of its last position; fills cache slots [end, end + T)."""
    logits = forward_tokens(model, cache, ids, positions, keep, encoded)
    cache.sync()
    return logits


def decode_one(model, cache: StaticKVCache, tokens: torch.Tensor, encoded: Encoded | None = None) -> torch.Tensor:
    """One new token per row (B,) -> logits (B, V) of the next position."""
    logits = forward_tokens(model, cache, tokens[:, None], cache.next_pos[:, None], None, encoded)
    cache.sync()
    return logits


def decode_one_static(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """decode_one for a static-shape cache, with positions (B, 1) passed in: the function
    torch.compile captures (decoder-only)."""
    return forward_tokens(model, cache, tokens[:, None], positions)


# ---- torch.compile of the decode step ----------------------------------------------------------
class RowGemv(TorchFunctionMode):
    """Inside a compiled one-token step at batch 1, compute linear layers as a fused
    multiply-reduce, (W * x).sum(-1): inductor turns it into one vectorised pass over W at close to
    memory bandwidth (~35 GB/s here), where fp32 BLAS GEMV reaches 16-23 GB/s. (For 2-8 rows the
    same trick is 2.5x *slower* than BLAS inside the model graph, so it is kept to one row.)"""

    max_rows = 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1]
            if rows <= self.max_rows:
                # fp32 accumulation whatever the weight dtype (bf16/fp16 weights are upcast as they stream in)
                y = (w * x.reshape(1, -1)).sum(-1, dtype=torch.float32).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def decode_one_gemv(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """decode_one_static with small-batch linears as fused multiply-reduce (for compiling on CPU)."""
    with RowGemv():
        return decode_one_static(model, cache, tokens, positions)


def verify_static(model, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Speculative verification: ids (1, L) -> logits (1, L, V) (static-shape cache)."""
    return forward_tokens(model, cache, ids, positions, last_only=False)


def verify_gemv(model, cache: StaticKVCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with RowGemv():
        return verify_static(model, cache, ids, positions)


# CPU: inductor C++ kernels with the C++ wrapper (less Python per step); batch 1 uses RowGemv.
# CUDA: CUDA graphs remove the per-kernel launch overhead.
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True}
CUDA_COMPILE_OPTIONS = {"triton.cudagraphs": True}
_STEPS = {("decode", False): decode_one_static, ("decode", True): decode_one_gemv,
          ("verify", False): verify_static, ("verify", True): verify_gemv}
_compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_fingerprint(model) -> tuple:
    """What a compiled step assumes of the model: train/eval modes, and each parameter's and buffer's dtype,
    shape, device and storage. The compiled steps skip dynamo's per-call guards on module attributes
    (measured: 0.65 -> 0.19 ms of guard evaluation a token on the 162M model; the tensor guards stay);
    instead this is compared once per generate call, and a changed model is compiled again."""
    tensors = (*model.parameters(), *model.buffers())
    return (tuple(m.training for m in model.modules()),
            tuple((t.dtype, t.shape, t.device, t.data_ptr()) for t in tensors))


def _compile(model, kind: str, rows: int):
    """torch.compile of one step function, cached per model (and RowGemv or not)."""
    cuda = next(model.parameters()).is_cuda
    key = (kind, rows <= RowGemv.max_rows and not cuda)
    entry = _compiled.setdefault(model, {})
    fingerprint = model_fingerprint(model)
    if key not in entry or entry[key][0] != fingerprint:
        for module in model.modules():  # layouts a module makes on first use (quantized kernels): not while tracing
            prepare = getattr(module, "prepare_small_batches", None)
            if prepare is not None:
                prepare()
        fingerprint = model_fingerprint(model)
        options = dict(CUDA_COMPILE_OPTIONS if cuda else CPU_COMPILE_OPTIONS)
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        # isolate_recompiles: each model keeps its own compiled entries, so compiling many models in one
        # process neither hits the shared recompile limit nor makes every step try the others' guards
        entry[key] = (fingerprint, torch.compile(_STEPS[key], fullgraph=True, dynamic=False, isolate_recompiles=True,
                                                 options=options))
    return entry[key][1]


def compiled_decode_one(model, batch: int):
    """The one-token step compiled for this model (static-shape cache); same signature as decode_one_static."""
    return _compile(model, "decode", batch)


def compiled_verify(model, tokens: int):
    """The speculative verification forward of `tokens` tokens compiled for this model (batch 1)."""
    return _compile(model, "verify", tokens)


def bucket(n: int, window: int, step: int = 64) -> int:
    """Static-cache capacity rounded up (fewer distinct shapes -> fewer recompiles)."""
    return min(-(-n // step) * step, window)


# ---- context trimming ------------------------------------------------------------------------
def trim_cache(model, cache: StaticKVCache, keep_n: int, mode: str, encoded: Encoded | None = None) -> None:
    """Make room when the window is full: keep the last keep_n tokens.

    slice:  k[:, :, -keep_n:, :] (seed 000). The kept keys were computed with the dropped tokens
            in view; positions keep increasing, which is right under RoPE / ALiBi / T5 bias.
    refill: recompute the kept window from its tokens at the same positions (learned absolute
            positions restart at 0 so they stay inside the table): the cache then equals a
            fresh prefill of the window. Costs one keep_n-token prefill per trim.
    Model-owned state (the NeoFormer-X RMC summary) is not trimmed: it summarises everything read,
    so the refill must not count the window twice."""
    if mode == "slice" and model.config.position != "learned":
        cache.trim(keep_n)
        return
    if cache.tokens is None:
        raise ValueError("refill trimming needs a cache created with track_tokens=True")
    cache.sync()
    lo, hi = cache.end - keep_n, cache.end
    ids, pos, keep = cache.tokens[:, lo:hi].clone(), cache.pos[:, lo:hi].clone(), cache.keep[:, lo:hi].clone()
    if model.config.position == "learned":
        pos = (keep.long().cumsum(-1) - 1).clamp(min=0)
    state = cache.model_state
    cache.reset()
    forward_tokens(model, cache, ids, pos, None if bool(keep.all()) else keep, encoded)
    cache.model_state = state
