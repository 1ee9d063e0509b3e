"""Packed weight formats, their pure-PyTorch reference (quantize / dequantize / matmul) and the fast ops.

Formats (the bytes a quantized checkpoint stores; ``out x in`` is the nn.Linear weight shape):

- int8 (weight-only and dynamic): ``qweight`` int8 (out, in), symmetric per output row,
  ``scales`` fp32 (out,): w = q * scale.
- nf4: ``qweight`` uint8 (out, in/2), two 4-bit codes per byte (even column in the high nibble, as
  bitsandbytes packs them, so the bytes are the same as ``bitsandbytes.functional.quantize_4bit``'s),
  ``absmax`` fp32 (out, in/group): w = NF4[code] * absmax (the QLoRA code book, Dettmers et al. 2023;
  bitsandbytes' blocksize-64 layout without double quantisation).
- int4: ``qweight`` uint8 (out, in/2) as nf4, asymmetric per group (gpt-fast's scheme),
  ``scales`` / ``zeros`` bf16 (out, in/group): w = (q - 8) * scale + zero.

Which op runs each scheme (measured; the figures are in :mod:`neoformer.quantize.modules`).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] (bitsandbytes' table, exact digits)
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 (out, in)
    scales: torch.Tensor  # fp32 (out,)


@dataclass
class NF4Weight:
    qweight: torch.Tensor  # uint8 (out, in/2)
    absmax: torch.Tensor  # fp32 (out, in/group)
    group_size: int


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # uint8 (out, in/2)
    scales: torch.Tensor  # bf16 (out, in/group)
    zeros: torch.Tensor  # bf16 (out, in/group)
    group_size: int


# ---- 4-bit packing ---------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) integers in [0, 15] -> uint8 (out, in/2): even columns high nibble, odd columns low."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 (out, in/2) -> uint8 (out, in)."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).flatten(-2)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, n_in = w.shape
    if n_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {n_in}")
    return w.float().reshape(out, n_in // group_size, group_size)


# ---- int8 ------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8: scale = absmax / 127, q = round(w / scale)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scales)


def dequantize_int8(q: Int8Weight, dtype=torch.float32) -> torch.Tensor:
    return (q.qweight.float() * q.scales[:, None]).to(dtype)


def int8_linear_reference(x: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """x @ (q * scale)^T computed as (x @ q^T) * scale: the scale is per output, so it factors out."""
    return F.linear(x, q.qweight.to(x.dtype)) * q.scales.to(x.dtype)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric int8 of activations: (int8 values, fp32 scales (rows, 1))."""
    scales = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(x.float() / scales).clamp(-127, 127).to(torch.int8), scales


def int8_dynamic_linear(x: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """int8 activations x int8 weights with an int32 accumulator (torch._int_mm), both scales after."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_rows_int8(x2)
    acc = torch._int_mm(xq, q.qweight.t())
    y = acc.float() * xs * q.scales
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def int8_dynamic_reference(x: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """The same arithmetic in float64 (test reference for :func:`int8_dynamic_linear`)."""
    xq, xs = quantize_rows_int8(x.reshape(-1, x.shape[-1]))
    y = (xq.double() @ q.qweight.double().t()) * xs.double() * q.scales.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


# ---- nf4 -------------------------------------------------------------------------------------
def nf4_levels(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def quantize_nf4(w: torch.Tensor, group_size: int = 64) -> NF4Weight:
    """Per-group absmax scaling to [-1, 1], then the nearest NF4 level."""
    groups = _groups(w, group_size)
    absmax = groups.abs().amax(dim=-1).clamp(min=1e-12)
    normed = groups / absmax[..., None]
    levels = nf4_levels(w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normed, midpoints).reshape(w.shape)
    return NF4Weight(pack_nibbles(codes), absmax, group_size)


def dequantize_nf4(q: NF4Weight, dtype=torch.float32) -> torch.Tensor:
    codes = unpack_nibbles(q.qweight).long()
    values = nf4_levels(codes.device)[codes]
    out, n_in = values.shape
    w = values.reshape(out, n_in // q.group_size, q.group_size) * q.absmax[..., None]
    return w.reshape(out, n_in).to(dtype)


# ---- int4 ------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int = 64) -> Int4Weight:
    """Asymmetric per group: 16 levels spanning [min, max]; zero is the value of code 8 (gpt-fast)."""
    groups = _groups(w, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    s = scales.float()
    zeros = (lo + 8 * s).to(torch.bfloat16)  # stored rounded; the codes are chosen against the stored values
    q = torch.round((groups - zeros.float()[..., None]) / s[..., None] + 8).clamp(0, 15)
    return Int4Weight(pack_nibbles(q.reshape(w.shape)), scales, zeros, group_size)


def dequantize_int4(q: Int4Weight, dtype=torch.float32) -> torch.Tensor:
    codes = unpack_nibbles(q.qweight).float()
    out, n_in = codes.shape
    g = codes.reshape(out, n_in // q.group_size, q.group_size)
    w = (g - 8) * q.scales.float()[..., None] + q.zeros.float()[..., None]
    return w.reshape(out, n_in).to(dtype)


_malloc_trim = None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS. glibc keeps freed blocks in its arenas: the one-off
    repack of every int4 weight into the kernel's layout (first forward) left ~360 MB of a 162M
    model's RSS behind (measured: 498 MB growth -> 138 MB after malloc_trim). No-op off glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def int4_cpu_pack(q: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight in the CPU kernel's opaque layout, scales_and_zeros (in/group, out, 2)) for
    ``torch.ops.aten._weight_int4pack_mm_for_cpu``. The layout depends on the CPU build, so it is
    made on load and never stored."""
    codes = unpack_nibbles(q.qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    scales_zeros = torch.stack((q.scales.t(), q.zeros.t()), dim=-1).contiguous()
    return packed, scales_zeros


# The CPU kernel's layout (torch 2.x, AVX-512 and AVX2 builds; found by packing index patterns): output
# rows in blocks of 64; a block's bytes, read as (in, 32), hold row 32 * nibble + j of the block at
# column k in byte (k, j), low nibble first. int4_cpu_layout_holds checks it on the real weight before
# anything relies on it (another build would keep the stored copy instead).
INT4_CPU_BLOCK = 64


def int4_cpu_blocks(packed: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel layout as two uint8 code tensors (out/64, in, 32): rows 0-31 and 32-63 of each block,
    transposed (in x rows), so a block's weight is ready to right-multiply activations."""
    b = packed.reshape(-1, n_in, INT4_CPU_BLOCK // 2)
    return b & 0x0F, b >> 4


def int4_cpu_unpack(packed: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """The codes (out, in) of the kernel layout (uint8 0-15): the stored nibbles, repacked."""
    low, high = int4_cpu_blocks(packed, n_in)
    return torch.cat((low, high), dim=-1).transpose(1, 2).reshape(n_out, n_in)


def int4_cpu_layout_holds(packed: torch.Tensor, q: Int4Weight) -> bool:
    n_out, n_in = q.qweight.shape[0], q.qweight.shape[1] * 2
    return (n_out % INT4_CPU_BLOCK == 0 and packed.numel() * 2 == n_out * n_in
            and torch.equal(int4_cpu_unpack(packed, n_out, n_in), unpack_nibbles(q.qweight)))


def int4_cpu_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group: int) -> torch.Tensor:
    """x (rows, in) @ W^T for many rows (prefill): the kernel layout is dequantized to x's dtype as W^T
    itself (in, out) -- each 64-row block's nibbles, read as (in, 32) pairs, are already transposed
    -- in one pass (w = code * scale + (zero - 8 * scale)), then one GEMM; _weight_int4pack_mm_for_cpu
    is a GEMV kernel whose time grows with every row."""
    n_out, n_in = scales.shape[0], x.shape[-1]
    blocks, half = n_out // INT4_CPU_BLOCK, INT4_CPU_BLOCK // 2

    def per_column(t):  # (out, in/group) -> (in/group, 1, blocks, 64): lined up with W^T's groups of rows
        return t.to(x.dtype).t().reshape(n_in // group, 1, blocks, INT4_CPU_BLOCK)

    scale = per_column(scales)
    offset = per_column(zeros) - 8 * scale
    low, high = int4_cpu_blocks(packed, n_in)  # (blocks, in, 32) each
    w = torch.empty(n_in, blocks, INT4_CPU_BLOCK, dtype=x.dtype)
    w[..., :half] = low.permute(1, 0, 2)
    w[..., half:] = high.permute(1, 0, 2)
    grouped = w.view(n_in // group, group, blocks, INT4_CPU_BLOCK)
    torch.addcmul(offset, grouped, scale, out=grouped)
    return x @ w.view(n_in, n_out)
