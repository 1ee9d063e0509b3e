"""QuantizedLinear: a frozen nn.Linear replacement holding packed weights (gpt-fast's module swap).

Every scheme keeps a pure-PyTorch path (dequantize, then F.linear) used for autograd (QLoRA:
gradients flow to the input, the packed base has no parameters), on non-CPU devices and by the
tests. On CPU inference:

- up to KERNEL_ROWS rows (decode steps, speculative verification, serving's batch) run neoformer's CPU
  kernels (neoformer/kernels: int8 weight-only, int8 x int8, int4 x int8 and nf4 x int8 on VNNI, nf4's
  levels by a byte-table lookup) on a layout made on the first small batch (kernel_layout.py), which then holds the weight;
- more rows (prefill) run one GEMM: int8 cast to bf16 (exact), int8-dynamic through torch._int_mm, int4 and
  nf4 dequantized to bf16 from the kernel layout;
- where neoformer's kernels cannot load (no AVX-512 VNNI, no compiler), PyTorch's own packed ops run as
  before: _weight_int8pack_mm and _weight_int4pack_mm_for_cpu on bf16 activations, torch._int_mm,
  bitsandbytes' matmul_4bit.

Per-op timings of every candidate: ``benchmarks/quantize_kernels.py`` and docs/quantize.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import KERNEL_ROWS
from . import kernels as K
from .kernel_layout import KernelLayout

SCHEMES = ("int8", "int8-dynamic", "nf4", "int4")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu takes; other groups run the pure path
# int8: above this many rows (tokens) the weight is cast to bf16 for one GEMM (exact: int8 fits bf16)
# (768x2048, 1 thread: 3.5x faster than fp32 at 512 rows, 1.7x at 64; the packed op is a GEMV kernel,
# 2.2x slower than fp32 for a 4 x 128-token prefill of the 162M model)
PACKED_ROWS = 8
# int4: from this many rows on, dequantize the kernel layout block-wise for one bf16 GEMM (its fixed cost
# beats the GEMV kernel's per-row cost; 768x2048, 1 thread: 0.67x the kernel's time at 512 rows, 1.4x at 128)
INT4_GEMM_ROWS = 256
GROUPED = ("nf4", "int4")  # schemes with a group size (int8 is per output row)
# buffers each scheme stores, in checkpoint order (bias is added when the Linear has one)
STORED = {"int8": ("qweight", "scales"), "int8-dynamic": ("qweight", "scales"),
          "nf4": ("qweight", "absmax"), "int4": ("qweight", "scales", "zeros")}


def _bitsandbytes():
    """bitsandbytes, or None. Its CPU backend warns on import that it cannot fetch a faster gemv from the
    Hugging Face hub (the `kernels` package, a download at run time we never make); that line is muted."""
    import logging

    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError:
        return None
    finally:
        quiet.setLevel(level)
    return bitsandbytes


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int | None = 64) -> dict[str, torch.Tensor]:
    """The stored tensors (:data:`STORED` names) of a float (out, in) weight; rows are the output
    features of a Linear or the tokens of an embedding, groups run along the input / embedding width."""
    if scheme in ("int8", "int8-dynamic"):
        q = K.quantize_int8(w)
        return {"qweight": q.qweight, "scales": q.scales}
    if scheme == "nf4":
        q = K.quantize_nf4(w, group_size)
        return {"qweight": q.qweight, "absmax": q.absmax}
    if scheme == "int4":
        q = K.quantize_int4(w, group_size)
        return {"qweight": q.qweight, "scales": q.scales, "zeros": q.zeros}
    raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")


def packed_weight(scheme: str, tensors, group_size: int | None):
    """The :mod:`.kernels` dataclass of stored tensors (a module or a dict of them)."""
    get = (lambda k: getattr(tensors, k)) if isinstance(tensors, nn.Module) else tensors.__getitem__
    if scheme in ("int8", "int8-dynamic"):
        return K.Int8Weight(get("qweight"), get("scales"))
    if scheme == "nf4":
        return K.NF4Weight(get("qweight"), get("absmax"), group_size)
    return K.Int4Weight(get("qweight"), get("scales"), get("zeros"), group_size)


def dequantize_weight(scheme: str, q, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if scheme == "nf4":
        return K.dequantize_nf4(q, dtype)
    if scheme == "int4":
        return K.dequantize_int4(q, dtype)
    return K.dequantize_int8(q, dtype)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored packed (see :mod:`.kernels` for the formats). Frozen: no parameters."""

    def __init__(self, scheme: str, in_features: int, out_features: int, tensors: dict[str, torch.Tensor],
                 group_size: int | None = None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
        self.scheme, self.in_features, self.out_features = scheme, in_features, out_features
        self.group_size = group_size if scheme in GROUPED else None
        for name in STORED[scheme]:
            self.register_buffer(name, tensors[name])
        self.register_buffer("bias", tensors.get("bias"))
        if scheme == "int8":  # the packed op takes bf16 scales; converting them inside a compiled graph
            # trips an Inductor lowering assertion (torch 2.13), so a bf16 copy is kept (2 bytes per row)
            self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16), persistent=False)
        self._kernel = None  # neoformer's CPU kernels' layout (kernel_layout.py), made on the first small batch
        self._int4_cpu = None  # (packed, scales_zeros) in PyTorch's int4 kernel layout: without neoformer's kernels
        self._layout_known = False  # the kernel layout is the one kernels.int4_cpu_unpack reads
        # a head tied to a QuantizedEmbedding shares its stored tensors: int4 then keeps its qweight too
        # (the embedding looks rows up in it), so the kernel layout is an extra copy of the 4-bit weight
        self.shares_storage = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = 64) -> "QuantizedLinear":
        tensors = quantize_weight(linear.weight.detach(), scheme, group_size)
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().clone()
        return cls(scheme, linear.in_features, linear.out_features, tensors, group_size)

    def packed(self):
        """The weight as a :mod:`.kernels` dataclass."""
        return packed_weight(self.scheme, self.stored(), self.group_size)

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors (:data:`STORED`), rebuilt from a kernel layout that replaced them."""
        tensors = {name: getattr(self, name) for name in STORED[self.scheme]}
        if self._kernel is not None and any(tensors[name] is None for name in self._kernel.replaces):
            tensors.update(self._kernel.stored())
        if self.scheme == "int4" and tensors["qweight"] is None:
            tensors["qweight"] = self._int4_recover()
        return tensors

    def _int4_recover(self) -> torch.Tensor:
        """The stored int4 bytes, read back from PyTorch's CPU kernel layout (once the kernel took over the
        weight, the stored copy is dropped so the 4-bit weight is held once; only where the layout was
        checked to be the known one, see kernels.int4_cpu_layout_holds)."""
        return K.pack_nibbles(K.int4_cpu_unpack(self._int4_cpu[0], self.out_features, self.in_features))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self.stored().items():  # dropped for a kernel layout: the stored bytes again
            destination[prefix + name] = tensor

    def _restore_stored(self) -> None:
        """Back to the stored tensors (before loading, moving or re-laying out the weight)."""
        for name, tensor in self.stored().items():
            setattr(self, name, tensor)
        self._kernel, self._int4_cpu = None, None

    def _load_from_state_dict(self, *args, **kwargs):
        self._restore_stored()
        super()._load_from_state_dict(*args, **kwargs)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) the packed one stands for."""
        return dequantize_weight(self.scheme, self.packed(), dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then F.linear: differentiable in x, any device; the tests' reference."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # do what autocast does for F.linear
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if (torch.is_grad_enabled() and x.requires_grad) or x.device.type != "cpu" and self.scheme != "nf4":
            return self.forward_reference(x)
        y = self._forward_fast(x.reshape(-1, self.in_features))
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _forward_fast(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= KERNEL_ROWS and self._kernel_layout() is not None:  # decode: neoformer's CPU kernels
            return self._kernel(x2)
        if self.scheme == "int8":
            xb = x2.to(torch.bfloat16)
            qweight = self.stored()["qweight"]
            if xb.shape[0] > PACKED_ROWS:  # prefill: the packed op is a GEMV kernel; a bf16 GEMM is faster
                return F.linear(xb, qweight.to(torch.bfloat16)) * self.scales_bf16
            return torch.ops.aten._weight_int8pack_mm(xb, qweight, self.scales_bf16)
        if self.scheme == "int8-dynamic":
            return K.int8_dynamic_linear(x2, self.packed())
        if self.scheme in ("int4", "nf4") and self._kernel_layout() is not None:
            # prefill from neoformer's kernel layout: dequantized, one bf16 GEMM
            return F.linear(x2.to(torch.bfloat16), self._kernel.dense(torch.bfloat16))
        if self.scheme == "int4":
            return self._int4_forward(x2)
        bnb = None if torch.compiler.is_compiling() else _bitsandbytes()  # nf4 (bitsandbytes' op does not trace)
        if bnb is None:
            return F.linear(x2, self.dequantize(x2.dtype))
        stored = self.stored()
        return bnb.matmul_4bit(x2, stored["qweight"].reshape(-1, 1).t(), quant_state=self._bnb_state(stored["absmax"]))

    def prepare_small_batches(self) -> None:
        """Build the kernel layout now (the generation engine calls this before compiling a decode step, so the
        layout is never made while tracing)."""
        if self.qweight is not None and self.qweight.device.type == "cpu":
            self._kernel_layout()

    def _kernel_layout(self):
        """neoformer's CPU kernel layout (None where it cannot run): built once, then it holds the weight."""
        if self._kernel is None and self._int4_cpu is None and not torch.compiler.is_compiling():
            self._kernel = KernelLayout.build(self.scheme, self.stored(), self.in_features, self.group_size)
            if self._kernel is not None:
                if not self.shares_storage:  # a tied head's tensors are also the embedding's lookup table
                    for name in self._kernel.replaces:
                        setattr(self, name, None)
                K.release_freed_memory()
        return self._kernel

    def _int4_forward(self, x2: torch.Tensor) -> torch.Tensor:
        if self.group_size not in INT4_KERNEL_GROUPS:
            return F.linear(x2, self.dequantize(x2.dtype))
        # PyTorch's own int4 op (machines without neoformer's kernels)
        if self._int4_cpu is None:
            packed, scales_zeros = K.int4_cpu_pack(self.packed())
            self._layout_known = K.int4_cpu_layout_holds(packed, self.packed())
            self._int4_cpu = (packed, scales_zeros.to(torch.bfloat16))
            if self._layout_known and not self.shares_storage:
                self.qweight = None  # held once, in the kernel's layout (see _int4_recover)
            K.release_freed_memory()  # the repack's temporaries, or RSS keeps them (kernels.py)
        packed, scales_zeros = self._int4_cpu
        xb = x2.to(torch.bfloat16)
        if xb.shape[0] >= INT4_GEMM_ROWS and self._layout_known:  # prefill
            return K.int4_cpu_gemm(xb, packed, self.scales, self.zeros, self.group_size)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, self.group_size, scales_zeros)

    def _bnb_state(self, absmax: torch.Tensor):
        from bitsandbytes.functional import QuantState, get_4bit_type

        device = absmax.device
        return QuantState(absmax=absmax.reshape(-1), shape=torch.Size((self.out_features, self.in_features)),
                          code=get_4bit_type("nf4", device=device), blocksize=self.group_size,
                          quant_type="nf4", dtype=torch.float32)

    def _apply(self, fn, recurse=True):  # .to()/.cuda(): back to the stored layout, rebuilt on first use
        self._restore_stored()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}, "
                f"bias={self.bias is not None}")
