"""One cast of a shared input under autocast, instead of one per projection.

Under ``torch.autocast`` every ``nn.Linear`` casts its fp32 input to the autocast dtype and keeps that
copy for its weight gradient, so the q, k and v projections of one normed input keep three bf16 copies
of it and the FFN's gate and up two (lumi-tiny, 16 x 1024: 8 MiB each, per layer). Casting once before
the projections gives the same values and one saved copy.
"""
from __future__ import annotations

import torch


def cast_once(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on, x is fp32 and autograd will save it; else ``x``."""
    device = x.device.type
    if x.dtype != torch.float32 or not torch.is_grad_enabled() or not torch.is_autocast_enabled(device):
        return x
    return x.to(torch.get_autocast_dtype(device))


def exporting() -> bool:
    """Compiling or tracing (TorchScript, ONNX): the graph gets plain ops; the compiler's partitioner does
    its own recomputation, and a custom autograd.Function cannot be exported."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


__all__ = ["cast_once", "exporting"]
