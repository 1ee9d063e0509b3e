"""The CPU kernels' copy of a quantized linear weight (int8, int8-dynamic, int4, nf4), for small batches.

Schemes: int8, int8-dynamic, int4, nf4. A :class:`KernelLayout` is built from a QuantizedLinear's stored tensors on its first small-batch forward;
it holds the same values rearranged (ops.py), so the module drops the stored tensors it replaces and
rebuilds them from the layout when they are needed again (prefill, saving, dequantizing): the weight is
held once. Activations: ``int8`` keeps them fp32 (weight-only); ``int8-dynamic`` quantizes each row to
int8 exactly as its prefill path does (the integer dot products are exact, so both agree);
``int4`` quantizes them to int8 per block of 32 inputs for the VNNI dot products (llama.cpp's Q4_0
decode does the same), which its tests and benchmark measure against fp32; ``nf4`` runs the same
kernel with each code's NF4 level looked up as an int8 (round(127 level): at most 1/254 of the group's
absmax off the exact level, the way llama.cpp's IQ4_NL decodes its non-linear 4-bit levels). Prefill
(more rows) dequantizes the exact levels from the layout into one bf16 GEMM.
"""
from __future__ import annotations

import torch

from ..kernels import build, ops
from .kernels import nf4_levels, pack_nibbles, unpack_nibbles

KERNEL_SCHEMES = ("int8", "int8-dynamic", "int4", "nf4")


def supported(scheme: str, in_features: int, group_size: int | None) -> bool:
    if scheme == "int8":
        return True
    if scheme == "int8-dynamic":
        return in_features % 16 == 0
    return scheme in ("int4", "nf4") and group_size is not None and group_size % ops.ACT_BLOCK == 0 and in_features % group_size == 0


class KernelLayout:
    """One quantized weight in the kernels' layout; ``layout(x2)`` -> fp32 (rows, out)."""

    def __init__(self, scheme: str, out_features: int, group_size: int | None, tensors: dict[str, torch.Tensor],
                 replaces: tuple[str, ...]):
        self.scheme, self.out_features, self.group_size = scheme, out_features, group_size
        self.tensors, self.replaces = tensors, replaces

    @classmethod
    def build(cls, scheme: str, stored: dict[str, torch.Tensor], in_features: int,
              group_size: int | None) -> "KernelLayout | None":
        """None where the kernels cannot run here (not loaded, or this shape is not supported)."""
        if scheme not in KERNEL_SCHEMES or not supported(scheme, in_features, group_size) or not build.load():
            return None
        q = stored["qweight"]
        out = q.shape[0]
        if scheme == "int8":
            tiles, scales = ops.pack_int8(q, stored["scales"])
            return cls(scheme, out, None, {"tiles": tiles, "scales": scales}, ("qweight",))
        if scheme == "int8-dynamic":
            tiles, scales = ops.pack_int8_vnni(q, stored["scales"])
            return cls(scheme, out, None, {"tiles": tiles, "scales": scales}, ("qweight",))
        if scheme == "nf4":
            tiles, absmax = ops.pack_nf4_vnni(unpack_nibbles(q), stored["absmax"], group_size)
            table = ops.nf4_table(nf4_levels())
            return cls(scheme, out, group_size, {"tiles": tiles, "absmax": absmax, "table": table}, ("qweight", "absmax"))
        tiles, scales, zeros = ops.pack_int4_vnni(unpack_nibbles(q), stored["scales"], stored["zeros"], group_size)
        return cls(scheme, out, group_size, {"tiles": tiles, "scales": scales, "zeros": zeros},
                   ("qweight", "scales", "zeros"))

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors this layout replaces, rebuilt bit for bit."""
        t, out = self.tensors, self.out_features
        if self.scheme == "int8":
            return {"qweight": ops.dense_int8(t["tiles"], out)}
        if self.scheme == "int8-dynamic":
            return {"qweight": ops.dense_int8_vnni(t["tiles"], out)}
        if self.scheme == "nf4":
            return {"qweight": pack_nibbles(ops.codes_int4_vnni(t["tiles"], out)),
                    "absmax": ops.untile_groups(t["absmax"], out)}
        return {"qweight": pack_nibbles(ops.codes_int4_vnni(t["tiles"], out)),
                "scales": ops.untile_groups(t["scales"], out), "zeros": ops.untile_groups(t["zeros"], out)}

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (rows, in) -> fp32 (rows, out). int8-dynamic and int4 quantize the activations inside the
        kernel, bit-identically to quantize/kernels.py's quantize_rows_int8 and ops.quantize_blocks."""
        t = self.tensors
        if self.scheme == "int8":
            y = ops.gemv_int8(t["tiles"], t["scales"], x2.float().contiguous())
        elif self.scheme == "int8-dynamic":
            y = ops.gemv_int8_vnni_f32(t["tiles"], t["scales"], x2.float().contiguous())
        elif self.scheme == "nf4":
            y = ops.gemv_nf4_vnni(t["tiles"], t["absmax"], t["table"], x2.float().contiguous(), self.group_size)
        else:
            y = ops.gemv_int4_vnni(t["tiles"], t["scales"], t["zeros"], x2.float().contiguous(), self.group_size)
        return y if y.shape[1] == self.out_features else y[:, :self.out_features]

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """int4 / nf4: the (out, in) weight in ``dtype`` straight from the layout (prefill: one GEMM); nf4 with
        its exact levels."""
        t = self.tensors
        if self.scheme == "nf4":
            return ops.dense_nf4_vnni(t["tiles"], t["absmax"], nf4_levels(), self.out_features, dtype)
        return ops.dense_int4_vnni(t["tiles"], t["scales"], t["zeros"], self.out_features, dtype)
