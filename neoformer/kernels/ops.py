"""The tiled layouts of ``gemv_cpu.cpp`` (pack / unpack), the op wrappers and their pure-PyTorch references.

Every op takes x as (rows, in) and returns y (rows, out); a weight whose row count is not a multiple of
the tile is padded with zero rows (sliced off the output). The ``*_reference`` functions compute the same
arithmetic with PyTorch (the tests compare them in float64); ``dense_*`` turn a packed weight back into
the (out, in) matrix, for prefill (one GEMM) and for state dicts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

F32_TILE, BF16_TILE, INT8_TILE, VNNI_TILE = 16, 32, 32, 16
ACT_BLOCK = 32  # int4 decode: activations are int8 per block of this many inputs


def _tile(w: torch.Tensor, rows: int) -> torch.Tensor:
    """(out, in) -> (ceil(out / rows), in, rows) with tile[t, i, r] = w[t * rows + r, i] (zero-padded rows)."""
    out, n_in = w.shape
    pad = -out % rows
    if pad:
        w = torch.cat((w, w.new_zeros(pad, n_in)))
    return w.reshape(-1, rows, n_in).transpose(1, 2).contiguous()


def _untile(tiles: torch.Tensor, out: int) -> torch.Tensor:
    return tiles.transpose(1, 2).reshape(-1, tiles.shape[1])[:out]


def _pad(v: torch.Tensor, rows: int) -> torch.Tensor:
    pad = -v.shape[0] % rows
    return torch.cat((v, v.new_zeros(pad, *v.shape[1:]))) if pad else v.contiguous()


# ---- float weights -------------------------------------------------------------------------------
def pack_float(w: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp32 tiles (out/16, in, 16); bf16 -> bf16 tiles of 32 rows x 2 columns (out/32, in/2, 64)."""
    if w.dtype != torch.bfloat16:
        return _tile(w.float(), F32_TILE)
    if w.shape[1] % 2:
        raise ValueError(f"the bf16 kernel needs an even input width (got {w.shape[1]})")
    w = _pad(w, BF16_TILE)
    out, n_in = w.shape
    return w.view(out // 32, 32, n_in // 2, 2).permute(0, 2, 1, 3).reshape(out // 32, n_in // 2, 64).contiguous()


def dense_float(tiles: torch.Tensor, out: int) -> torch.Tensor:
    if tiles.dtype != torch.bfloat16:
        return _untile(tiles, out)
    t, pairs, _ = tiles.shape
    return tiles.view(t, pairs, 32, 2).permute(0, 2, 1, 3).reshape(t * 32, pairs * 2)[:out]


def gemv_float(tiles: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (rows, in) -> fp32 (rows, out_padded); fp32 tiles take fp32 x, bf16 tiles bf16 x (exact products,
    fp32 sums)."""
    if tiles.dtype == torch.bfloat16:
        return torch.ops.neoformer_cpu.gemv_bf16(tiles, x.to(torch.bfloat16).contiguous())
    return torch.ops.neoformer_cpu.gemv_f32(tiles, x.float().contiguous())


# ---- int8 weight-only: per output row scale, fp32 activations ---------------------------------------------
def pack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _tile(qweight, INT8_TILE), _pad(scales.float(), INT8_TILE)


def dense_int8(tiles: torch.Tensor, out: int) -> torch.Tensor:
    return _untile(tiles, out)


def gemv_int8(tiles: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.neoformer_cpu.gemv_int8(tiles, scales, x)


# ---- int8 x int8 (VNNI): per output row weight scale, per row (token) activation scale --------------------
def pack_int8_vnni(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (out, in) -> uint8 (out/16, in/4, 64) holding q + 128 (16 rows x 4 inputs per 64 bytes)."""
    u = _pad((qweight.to(torch.int16) + 128).to(torch.uint8), VNNI_TILE)
    out, n_in = u.shape
    if n_in % 16:
        raise ValueError(f"the int8 kernel needs an input width divisible by 16 (got {n_in})")
    tiles = u.view(out // 16, 16, n_in // 4, 4).permute(0, 2, 1, 3).reshape(out // 16, n_in // 4, 64).contiguous()
    return tiles, _pad(scales.float(), VNNI_TILE)


def dense_int8_vnni(tiles: torch.Tensor, out: int) -> torch.Tensor:
    t, quads, _ = tiles.shape
    u = tiles.view(t, quads, 16, 4).permute(0, 2, 1, 3).reshape(t * 16, quads * 4)[:out]
    return (u.to(torch.int16) - 128).to(torch.int8)


def gemv_int8_vnni(tiles: torch.Tensor, scales: torch.Tensor, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """xq int8 (rows, in) with one fp32 scale per row (the int8-dynamic scheme's activations) -> fp32 (rows, out_p):
    the int32 dot products are exact, so this equals torch._int_mm's path."""
    return torch.ops.neoformer_cpu.gemv_int8x8(tiles, scales, xq, x_scale.reshape(-1))


def gemv_int8_vnni_f32(tiles: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """fp32 x (rows, in), quantized per row inside the kernel exactly as quantize/kernels.py's
    quantize_rows_int8 does -> fp32 (rows, out_p); equal to gemv_int8_vnni(tiles, scales, *quantize_rows_int8(x))."""
    return torch.ops.neoformer_cpu.gemv_int8x8_f32(tiles, scales, x)


# ---- int4 x int8 (VNNI): w = (q - 8) * scale + zero per group, activations int8 per block of 32 -----------
def pack_nibbles_vnni(codes: torch.Tensor, group: int) -> torch.Tensor:
    """codes uint8 (out, in) in [0, 15] -> uint8 (out/16, in/8, 64): the 4-bit kernels' tiles (int4 and nf4)."""
    c = _pad(codes, VNNI_TILE)
    out, n_in = c.shape
    if group % ACT_BLOCK or n_in % group:
        raise ValueError(f"the 4-bit kernels need a group size that is a multiple of {ACT_BLOCK} and divides {n_in}")
    c = c.view(out // 16, 16, n_in // 8, 8)
    return (c[..., :4] | (c[..., 4:] << 4)).permute(0, 2, 1, 3).reshape(out // 16, n_in // 8, 64).contiguous()


def pack_int4_vnni(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int):
    """codes uint8 (out, in) in [0, 15], bf16 scales / zeros (out, in/group) -> (uint8 (out/16, in/8, 64),
    scales and zeros tiled (out/16, in/group, 16)); the same values, rearranged."""
    return (pack_nibbles_vnni(codes, group), _tile(scales.to(torch.bfloat16), VNNI_TILE),
            _tile(zeros.to(torch.bfloat16), VNNI_TILE))


def codes_int4_vnni(tiles: torch.Tensor, out: int) -> torch.Tensor:
    """The uint8 codes (out, in) of packed 4-bit tiles (int4 and nf4)."""
    t, octets, _ = tiles.shape
    v = tiles.view(t, octets, 16, 4)
    return torch.cat((v & 0x0F, v >> 4), dim=-1).permute(0, 2, 1, 3).reshape(t * 16, octets * 8)[:out]


def untile_groups(tiled: torch.Tensor, out: int) -> torch.Tensor:
    """(out/16, groups, 16) per-group values -> (out, groups)."""
    return _untile(tiled, out)


def dense_int4_vnni(tiles, scales, zeros, out: int, dtype=torch.float32) -> torch.Tensor:
    """The (out, in) weight q * scale + (zero - 8 scale) of the packed int4 tiles (the kernel's arithmetic)."""
    codes = codes_int4_vnni(tiles, out)
    s, z = untile_groups(scales, out).to(dtype), untile_groups(zeros, out).to(dtype)
    w = codes.view(out, s.shape[1], -1).to(dtype) * s[..., None] + (z - 8 * s)[..., None]
    return w.reshape(out, -1)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, in) -> int8 per block of 32 inputs: (xq (rows, in), scale (rows, in/32), sum of xq (rows, in/32))."""
    blocks = x.view(x.shape[0], -1, ACT_BLOCK)
    scale = blocks.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(blocks / scale[..., None]).clamp(-127, 127)
    return q.to(torch.int8).view(x.shape), scale, q.sum(dim=-1)


def gemv_int4_vnni(tiles, scales, zeros, x: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 x (rows, in), quantized per block of 32 inside the kernel exactly as :func:`quantize_blocks`."""
    return torch.ops.neoformer_cpu.gemv_int4x8_f32(tiles, scales, zeros, x, group)


def gemv_int4_vnni_prequantized(tiles, scales, zeros, x: torch.Tensor, group: int) -> torch.Tensor:
    """The same product with the activations quantized in Python (the kernel's quantizer's test reference)."""
    xq, scale, total = quantize_blocks(x.float())
    return torch.ops.neoformer_cpu.gemv_int4x8(tiles, scales, zeros, xq, scale, total, group)


def gemv_blocks_reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 4-bit kernels' arithmetic in ``weight``'s dtype: int8 activations per block of 32, dequantized, times
    the dequantized (out, in) ``weight``."""
    xq, scale, _ = quantize_blocks(x.float())
    xd = (xq.to(weight.dtype).view(x.shape[0], -1, ACT_BLOCK) * scale[..., None].to(weight.dtype)).view(x.shape)
    return F.linear(xd, weight)


# ---- nf4 x int8 (VNNI): w = NF4[q] * absmax per group, the int4 kernel with a 16-byte table lookup ----------
def nf4_table(levels: torch.Tensor) -> torch.Tensor:
    """The kernel's uint8 table: each of the 16 levels in [-1, 1] as round(127 level) + 128."""
    return (torch.round(levels.double() * 127) + 128).to(torch.uint8)


def pack_nf4_vnni(codes: torch.Tensor, absmax: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 (out, in), absmax fp32 (out, in/group) -> (tiles as int4's, absmax tiled (out/16, in/group, 16))."""
    return pack_nibbles_vnni(codes, group), _tile(absmax.float(), VNNI_TILE)


def gemv_nf4_vnni(tiles, absmax, table, x: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 x (rows, in), quantized per block of 32 inside the kernel exactly as :func:`quantize_blocks`."""
    return torch.ops.neoformer_cpu.gemv_nf4x8_f32(tiles, absmax, table, x, group)


def dense_nf4_vnni(tiles, absmax, levels: torch.Tensor, out: int, dtype=torch.float32) -> torch.Tensor:
    """The (out, in) weight levels[q] * absmax of packed nf4 tiles (``levels``: fp32 NF4 levels for the exact
    weight, ``(nf4_table(levels) - 128) / 127`` for the kernel's rounded ones)."""
    codes = codes_int4_vnni(tiles, out).long()
    a = untile_groups(absmax, out).to(dtype)
    w = levels.to(dtype)[codes].view(out, a.shape[1], -1) * a[..., None]
    return w.reshape(out, -1)


# ---- attention for a few queries -------------------------------------------------------------------
SMALL_QUERY_ROWS = 16  # up to this many query rows per head take the kernel (decode, speculative verification)


def small_query_attention(q, k, v, mask, is_causal: bool, scale: float):
    """softmax(scale * q k^T + mask) v for q (B, H, L <= 16, D) against k / v (B, Hkv, keys, D); fp32 / bf16.
    ``mask``: None or bool broadcastable as (B|1, 1, L, keys). Returns None where the kernel does not apply
    (the caller then runs PyTorch's attention)."""
    if (q.shape[2] > SMALL_QUERY_ROWS or q.shape[-1] % 16 or q.shape[-1] > 256 or q.requires_grad
            or q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != v.dtype or k.dtype not in (torch.float32, torch.bfloat16)
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1):
        return None
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
            return None
        mask = mask[:, 0].expand(mask.shape[0], q.shape[2], k.shape[2])
    return torch.ops.neoformer_cpu.small_query_attention(q, k, v, mask, is_causal, scale)


# ---- torch.compile: shapes of the ops' outputs ------------------------------------------------------------
def register_fakes() -> None:
    """Output shapes for torch.compile; called once the C++ library is loaded (build.load)."""
    lib = "neoformer_cpu::"

    def rows_by(tile_rows):
        return lambda packed, *args: args[-1].new_empty((args[-1].shape[0], packed.shape[0] * tile_rows),
                                                        dtype=torch.float32)

    torch.library.register_fake(lib + "gemv_f32")(rows_by(F32_TILE))
    torch.library.register_fake(lib + "gemv_bf16")(rows_by(BF16_TILE))
    torch.library.register_fake(lib + "gemv_int8")(rows_by(INT8_TILE))
    torch.library.register_fake(lib + "gemv_int8x8")(
        lambda packed, w_scale, xq, x_scale: x_scale.new_empty((xq.shape[0], packed.shape[0] * VNNI_TILE)))
    torch.library.register_fake(lib + "small_query_attention")(  # contiguous, as the kernel returns it
        lambda q, k, v, mask, causal, scale: q.new_empty(q.shape))
    torch.library.register_fake(lib + "gemv_int4x8")(
        lambda packed, scales, zeros, xq, xs, xsum, group: xs.new_empty((xq.shape[0], packed.shape[0] * VNNI_TILE)))
    torch.library.register_fake(lib + "gemv_int8x8_f32")(
        lambda packed, w_scale, x: x.new_empty((x.shape[0], packed.shape[0] * VNNI_TILE)))
    torch.library.register_fake(lib + "gemv_int4x8_f32")(
        lambda packed, scales, zeros, x, group: x.new_empty((x.shape[0], packed.shape[0] * VNNI_TILE)))
    torch.library.register_fake(lib + "gemv_nf4x8_f32")(
        lambda packed, absmax, table, x, group: x.new_empty((x.shape[0], packed.shape[0] * VNNI_TILE)))



# ---- training: token cross-entropy of one chunk of head logits, dropout (loss_cpu.cpp) -------------------------
def _trainable_here(x: torch.Tensor) -> bool:
    """The training kernels take contiguous CPU fp32 / bf16 tensors (bf16 only with AVX512-BF16)."""
    from .build import has_bf16

    return (x.device.type == "cpu" and x.is_contiguous()
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and has_bf16())))


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool) -> torch.Tensor | None:
    """Summed cross-entropy of the rows of ``logits`` (rows, V) against ``targets`` (IGNORE_INDEX rows count 0);
    ``logits`` becomes d loss / d logits in place when ``write_grad``. None where the kernel does not apply:
    the caller uses PyTorch's ops."""
    from ..config import IGNORE_INDEX

    if not _trainable_here(logits):
        return None
    return torch.ops.neoformer_cpu.cross_entropy_rows_(logits, targets.long(), IGNORE_INDEX, write_grad).sum()


def zero_dropped(x: torch.Tensor, key: int, threshold: int, scale: float) -> bool:
    """Zero in place the elements of ``x`` that model/dropout.py's ``dropped`` names and multiply the others by
    ``scale``; False (nothing done) where the kernel does not apply."""
    if not _trainable_here(x):
        return False
    torch.ops.neoformer_cpu.zero_dropped_(x, key, threshold, scale)
    return True
