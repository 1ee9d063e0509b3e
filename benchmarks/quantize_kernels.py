"""Which kernel each quantization scheme uses on this CPU: one Linear, batch-1 decode and batch-16 prefill.

    PYTHONPATH=$PWD python benchmarks/quantize_kernels.py [--threads 1] [--rounds 5] [--rows 1,16,512]

Times every candidate for 768x768 and 768x2048 (in x out) weights, interleaved over rounds, and
prints microseconds per call (median, with min-max) and the ratio to fp32 F.linear.
Candidates: pure-PyTorch dequantize+matmul (the reference), torch's own packed ops
(_weight_int8pack_mm, _weight_int4pack_mm_for_cpu, _int_mm), neoformer's CPU kernels (neoformer/kernels,
through TiledLinear / QuantizedLinear: up to 16 rows the kernel, beyond that the GEMM path), bitsandbytes
and torchao.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")

from neoformer.quantize import kernels as K  # noqa: E402


def candidates(w: torch.Tensor, dtype: torch.dtype):
    """name -> (scheme, callable(x)) for weight ``w`` (out, in) at activation dtype ``dtype``."""
    out = {"fp32 F.linear": ("float", lambda x, w=w: F.linear(x, w))}
    wb = w.to(torch.bfloat16)
    out["bf16 F.linear"] = ("float", lambda x: F.linear(x.to(torch.bfloat16), wb))
    q8 = K.quantize_int8(w)
    out["int8 pure (linear on int8->float, scale after)"] = ("int8", lambda x: K.int8_linear_reference(x, q8))
    s8 = q8.scales.to(dtype)
    out["int8 aten._weight_int8pack_mm"] = ("int8", lambda x: torch.ops.aten._weight_int8pack_mm(x, q8.qweight, s8))
    out["int8-dynamic pure (_int_mm)"] = ("int8-dynamic", lambda x: K.int8_dynamic_linear(x, q8))
    for g in (64,):
        n4 = K.quantize_nf4(w, g)
        out[f"nf4 g{g} pure (LUT dequantize + linear)"] = ("nf4", lambda x, n4=n4: F.linear(x, K.dequantize_nf4(n4, x.dtype)))
        i4 = K.quantize_int4(w, g)
        out[f"int4 g{g} pure (dequantize + linear)"] = ("int4", lambda x, i4=i4: F.linear(x, K.dequantize_int4(i4, x.dtype)))
        packed, sz = K.int4_cpu_pack(i4)
        szd = sz.to(dtype)
        out[f"int4 g{g} aten._weight_int4pack_mm_for_cpu"] = (
            "int4", lambda x, p=packed, s=szd, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, s))
        if K.int4_cpu_layout_holds(packed, i4):  # prefill: the kernel layout block-dequantized, one GEMM
            out[f"int4 g{g} kernel layout -> {dtype_name(dtype)} blocks + GEMM"] = (
                "int4", lambda x, p=packed, i4=i4: K.int4_cpu_gemm(x, p, i4.scales, i4.zeros, i4.group_size))
    from neoformer.kernels import TiledLinear, build

    if build.load():  # neoformer's CPU kernels, through the modules that use them (eager: one op call each)
        from neoformer.quantize import QuantizedLinear

        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data.copy_(w)
        out["fp32 neoformer tiled kernel"] = ("float", TiledLinear.from_linear(layer))
        if build.has_bf16():
            bf16 = TiledLinear.from_linear(torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16))
            bf16.load_state_dict({"weight": wb})
            out["bf16 neoformer tiled kernel"] = ("float", lambda x, m=bf16: m(x.to(torch.bfloat16)))
        for scheme, group in (("int8", None), ("int8-dynamic", None), ("int4", 64)):
            q = QuantizedLinear.from_linear(layer, scheme, group)
            q.prepare_small_batches()
            out[f"{scheme}{f' g{group}' if group else ''} neoformer kernel (QuantizedLinear)"] = (scheme, q)
    else:
        print(f"neoformer CPU kernels: {build.unavailable_reason()}")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF

        qw, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        out["nf4 g64 bitsandbytes.matmul_4bit"] = ("nf4", lambda x: bnb.matmul_4bit(x, qw.t(), quant_state=state))
        lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=0.0)
        lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        lin = lin.to("cpu")
        out["int8-dynamic bitsandbytes Linear8bitLt"] = ("int8-dynamic", lambda x: lin(x))
    except Exception as err:  # noqa: BLE001 - a missing or broken library is a row, not a crash
        print(f"bitsandbytes: {type(err).__name__}: {str(err)[:120]}")
    try:
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, quantize_)

        for name, scheme, config in (("int8 torchao Int8WeightOnly", "int8", Int8WeightOnlyConfig()),
                                     ("int8-dynamic torchao Int8DynamicActivationInt8Weight", "int8-dynamic",
                                      Int8DynamicActivationInt8WeightConfig()),
                                     ("int4 g64 torchao Int4WeightOnly (opaque/cpu)", "int4",
                                      Int4WeightOnlyConfig(group_size=64, int4_packing_format="opaque"))):
            try:
                layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(dtype)
                layer.weight.data.copy_(w)
                quantize_(layer, config)
                layer(torch.randn(1, w.shape[1], dtype=dtype))
                out[name] = (scheme, layer)
            except Exception as err:  # noqa: BLE001
                print(f"torchao {name}: {type(err).__name__}: {str(err)[:120]}")
    except ImportError as err:
        print(f"torchao: {err}")
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def time_call(fn, x, iters: int) -> float:
    with torch.inference_mode():
        fn(x)
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rows", default="1,16", help="comma-separated activation rows (1: decode; 16, 512: prefill)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"load {os.getloadavg()[0]:.2f}, threads {args.threads}, activations {args.dtype}, torch {torch.__version__}")
    for shape in ((768, 768), (2048, 768)):
        w = torch.randn(*shape) * 0.02
        cands = candidates(w, dtype)
        for batch in (int(r) for r in args.rows.split(",")):
            x = torch.randn(batch, shape[1], dtype=dtype)
            iters = max(3, 200 // batch)
            times = {name: [] for name in cands}
            for _ in range(args.rounds):
                for name, (_, fn) in cands.items():
                    try:
                        times[name].append(time_call(fn, x, iters))
                    except Exception as err:  # noqa: BLE001
                        times[name] = None
                        print(f"{name}: {type(err).__name__}: {str(err)[:100]}")
                        cands[name] = (None, None)
                        break
            base = statistics.median(times["fp32 F.linear"])
            print(f"\nweight {shape[1]}x{shape[0]} (in x out), batch {batch}: us/call median [min-max], speed vs fp32")
            for name, t in times.items():
                if t:
                    m = statistics.median(t)
                    print(f"  {name:58s} {m:8.1f} [{min(t):.1f}-{max(t):.1f}]  {base / m:5.2f}x")


if __name__ == "__main__":
    main()
