"""TiledLinear: an inference-only nn.Linear whose weight lives in the CPU kernels' row tiles.

``pack_linears(model)`` swaps every nn.Linear of a model (fp32 or bf16 weights) in place. Small batches
(decode steps, speculative verification, serving's rows) go through the tiled kernel; larger ones
(prefill) rebuild the dense weight for one BLAS GEMM. The state dict keeps nn.Linear's ``weight`` /
``bias`` keys, so a packed model saves and loads like the original.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.weights import mark_like
from . import build
from .ops import dense_float, gemv_float, pack_float

# up to this many rows (tokens) per call run the tiled kernel; beyond, one GEMM on the rebuilt weight wins
# (measured: 162M linears, 1 thread; see BENCHMARKS.md "Decode kernels")
KERNEL_ROWS = 16


class TiledLinear(nn.Module):
    """y = x W^T + b, W kept as fp32 (16-row) or bf16 (32-row) tiles. Frozen: no parameters."""

    def __init__(self, tiles: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("tiles", tiles)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "TiledLinear":
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return mark_like(cls(pack_float(linear.weight.detach()), linear.in_features, linear.out_features, bias), linear)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight (a copy), for code that reads ``.weight``."""
        return dense_float(self.tiles, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > KERNEL_ROWS or x.requires_grad or x.device.type != "cpu":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        y = gemv_float(self.tiles, x.reshape(rows, self.in_features))
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.to(self.tiles.dtype)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        self.tiles = pack_float(state_dict[key].to(self.tiles.dtype))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias = state_dict[prefix + "bias"].to(self.bias.dtype).clone()
            else:
                missing_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tiles={self.tiles.dtype}, "
                f"bias={self.bias is not None}")


def pack_linears(model: nn.Module) -> int:
    """Swap the model's fp32 / bf16 nn.Linear modules (CPU) for TiledLinear, in place; returns how many
    (bf16 ones where the CPU has AVX512-BF16).
    Does nothing (0) when the kernels cannot load here (``build.unavailable_reason()`` says why)."""
    if not build.load():
        return 0
    dtypes = (torch.float32, torch.bfloat16) if build.has_bf16() else (torch.float32,)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in dtypes
               and (m.weight.dtype != torch.bfloat16 or m.in_features % 2 == 0)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, TiledLinear.from_linear(linear))
    return len(targets)
