"""Build and load the CPU kernels (``gemv_cpu.cpp`` and ``decode_attention_cpu.cpp``: decode; ``loss_cpu.cpp``: the training loss and dropout;
``attention_cpu.cpp``: the chunked attention's softmax passes) once per machine, on first use.

The C++ files are compiled by ``torch.utils.cpp_extension`` (g++ and ninja) into a cache folder keyed by
the source, the torch version and the compiler flags, so later processes only load the ``.so``
(~20 s to compile once on 2 cores; ``make install`` builds it ahead). Anything missing -- a CPU without
AVX-512 VNNI, no compiler, no ninja, ``NEOFORMER_CPU_KERNELS=0`` -- makes :func:`load` return False
with the reason in :func:`unavailable_reason`; callers then keep PyTorch's own ops.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemv_cpu.cpp", "decode_attention_cpu.cpp",
                                                                      "loss_cpu.cpp", "attention_cpu.cpp"))
HEADERS = (Path(__file__).with_name("simd.h"),)  # part of the cache key: a changed header rebuilds
# the instruction sets the kernels use; checked against /proc/cpuinfo before building or loading
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma")
# the bf16 kernel also needs avx512_bf16 (has_bf16); the library is built with it and that kernel is not called without
# -fopenmp: at::parallel_for is a header template whose OpenMP pragma is ignored without it; the kernels then ran
# on one thread whatever torch.get_num_threads() said (measured: the same us per call at 1 and 2 threads)
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16", "-mfma",
          "-fopenmp")
LIBRARY = "neoformer_cpu"  # the torch.ops namespace the C++ file registers

_state: dict = {"loaded": None, "reason": None}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cache_dir() -> Path:
    root = os.environ.get("NEOFORMER_KERNEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                            "neoformer", "kernels")
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(sources + torch.__version__.encode() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    return Path(root, key)


def _why_not() -> str | None:
    if os.environ.get("NEOFORMER_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no"):
        return "turned off by NEOFORMER_CPU_KERNELS=0"
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    venv_bin = Path(sys.executable).parent  # the `ninja` package installs its binary next to python
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("ninja") is None:
        return "ninja is not on PATH (pip install ninja, or apt-get install ninja-build)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (apt-get install g++)"
    return None


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the kernels; True when ``torch.ops.neoformer_cpu`` is ready."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    reason = _why_not()
    if reason is None:
        try:
            from torch.utils.cpp_extension import load as load_extension

            build = cache_dir()
            build.mkdir(parents=True, exist_ok=True)
            load_extension(f"{LIBRARY}_{build.name}", sources=[str(s) for s in SOURCES], extra_cflags=list(CFLAGS),
                           extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False,
                           verbose=verbose)
            from ..model import attention, chunked_attention, dropout, head_loss
            from .ops import cross_entropy_rows, register_fakes, small_query_attention, zero_dropped

            register_fakes()
            if small_query_attention not in attention.SMALL_QUERY_KERNELS:
                attention.SMALL_QUERY_KERNELS.append(small_query_attention)
            for hook, kernel in ((head_loss.CROSS_ENTROPY_KERNELS, cross_entropy_rows),
                                 (dropout.DROPOUT_KERNELS, zero_dropped)):
                if kernel not in hook:
                    hook.append(kernel)
            if has_bf16():  # bf16 chunks only
                chunked_attention.FUSED_SOFTMAX.update(forward=torch.ops.neoformer_cpu.softmax_forward_,
                                                       backward=torch.ops.neoformer_cpu.softmax_backward_)
        except Exception as error:  # a failed build must not stop generation: PyTorch's ops still work
            names = ", ".join(source.name for source in SOURCES)
            reason = f"building {names} failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            warnings.warn(f"neoformer CPU kernels unavailable: {reason}", stacklevel=2)
    _state.update(loaded=reason is None, reason=reason)
    return reason is None


def has_bf16() -> bool:
    """The bf16 kernel runs here (AVX512-BF16); bf16 weights stay unpacked elsewhere."""
    return "avx512_bf16" in cpu_flags()


def unavailable_reason() -> str | None:
    """Why :func:`load` returned False (None when the kernels are loaded or not tried yet)."""
    return _state["reason"]
