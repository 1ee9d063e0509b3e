"""CPU decode kernels: small-batch matrix-vector products on weights repacked into row tiles.

    from neoformer.kernels import pack_linears, kernels_available
    pack_linears(model)   # nn.Linear (fp32 / bf16) -> TiledLinear, in place; decode steps use the kernels

Quantized checkpoints (int8, int8-dynamic, int4) use the same kernels through QuantizedLinear. The C++
source (``gemv_cpu.cpp``) is compiled on first use; see :mod:`.build` for what it needs.
"""
from __future__ import annotations

from .build import load as kernels_available
from .build import unavailable_reason
from .linear import KERNEL_ROWS, TiledLinear, pack_linears

__all__ = ["KERNEL_ROWS", "TiledLinear", "kernels_available", "pack_linears", "unavailable_reason"]
