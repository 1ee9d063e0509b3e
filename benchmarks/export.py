"""Export formats x model kinds (verified max |Δlogit|, size, load+check time), and onnxruntime decode speed.

Sections (``--only`` picks some):
- ``table``: every debug preset family (BPE 300 tokenizer) exported to hf, onnx, torch-export,
  torchscript and gguf (fp32) through ``neoformer.export.export``; each row is the export's own
  verification (consumer library vs neoformer, prefill 5 + 3 cached steps) or its refusal.
- ``speed``: the trained small teacher (benchmarks/teacher.py) exported to ONNX; greedy decode of
  128 tokens from one prompt, onnxruntime (``OnnxDecoder``) vs neoformer's engine
  (``neoformer.generate``, no compile), both on 1 thread, interleaved rounds, median tok/s; the
  token sequences must be identical.
- ``speed162m``: the 162M Llama shape (768 wide, 12 layers, 12 heads, FFN 3072, vocab 32000, untied;
  random weights, speed only) exported to ONNX; greedy decode of ``--tokens`` tokens after a 16-token
  prompt, onnxruntime vs neoformer's compiled engine (``compile=True``, compiled once before timing),
  both on 1 thread, interleaved rounds; random weights have near ties, so the number of leading
  tokens on which the two agree is printed, not required.

Usage::

    python benchmarks/export.py [--only table,speed,speed162m] [--rounds 3] [--tokens 64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRESETS = ["nexus-debug", "lumi-debug", "neoformer-x-debug", "nima-debug", "neobert-debug", "nima-transformer-debug"]
FORMATS = ["hf", "onnx", "torch-export", "aoti", "torchscript", "gguf"]


def table() -> None:
    from neoformer import build_model
    from neoformer.export import export
    from neoformer.tokenizer import train_bpe

    tokenizer = train_bpe(["the cat sat on the mat, a tiny corpus for a tiny vocabulary. " * 50], vocab_size=300)
    print("| model (kind) | format | max abs dlogit | size | load + check |")
    print("|---|---|---|---|---|")
    for preset in PRESETS:
        torch.manual_seed(0)
        model = build_model(preset, vocab_size=tokenizer.vocab_size).eval()
        for fmt in FORMATS:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    result = export(model, Path(tmp) / "out", fmt, tokenizer=tokenizer)
                except ValueError as error:
                    print(f"| {preset} ({model.config.kind}) | {fmt} | refused: {str(error)[:90]} | | |")
                    continue
                seconds = result.checked.rsplit("in ", 1)[-1].rstrip(")")
                print(f"| {preset} ({model.config.kind}) | {fmt} | {result.max_diff:.1e} | "
                      f"{result.size_bytes / 1e6:.2f} MB | {seconds} |", flush=True)


def speed(rounds: int) -> None:
    from teacher import teacher_checkpoint

    from neoformer.checkpoint import load_checkpoint
    from neoformer.export import export
    from neoformer.export.onnx_format import OnnxDecoder, onnx_greedy
    from neoformer.generate.api import generate

    torch.set_num_threads(1)
    path = teacher_checkpoint("small")
    model, tokenizer, _ = load_checkpoint(path)
    n_new = 128
    prompt = tokenizer.encode("def main(argv):\n    parser = argparse.ArgumentParser(")
    with tempfile.TemporaryDirectory() as tmp:
        result = export(path, Path(tmp) / "onnx", "onnx")
        print(f"teacher {model.num_parameters():,} parameters; ONNX export verified max |dlogit| "
              f"{result.max_diff:.1e}, {result.size_bytes / 1e6:.1f} MB")
        decoder = OnnxDecoder(Path(tmp) / "onnx", threads=1)
        times = {"onnxruntime": [], "neoformer": []}
        tokens = {}
        for _ in range(rounds):
            start = time.perf_counter()
            tokens["onnxruntime"] = onnx_greedy(decoder, prompt, n_new)
            times["onnxruntime"].append(time.perf_counter() - start)
            start = time.perf_counter()
            out = generate(model, torch.tensor([prompt]), n_new, do_sample=False, eos_token_id=[])
            times["neoformer"].append(time.perf_counter() - start)
            tokens["neoformer"] = out[0, len(prompt):].tolist()
    assert tokens["onnxruntime"] == tokens["neoformer"], "greedy tokens differ"
    rates = {k: [n_new / t for t in v] for k, v in times.items()}
    for name, values in rates.items():
        print(f"{name:12s} {statistics.median(values):7.1f} tok/s (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratios = [o / n for o, n in zip(rates["onnxruntime"], rates["neoformer"])]
    print(f"onnxruntime / neoformer: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}); identical greedy tokens: yes; load {os.getloadavg()[0]:.1f}")


def speed_162m(rounds: int, n_new: int) -> None:
    from neoformer import build_model
    from neoformer.config import ModelConfig
    from neoformer.export import export
    from neoformer.export.onnx_format import OnnxDecoder, onnx_greedy
    from neoformer.generate.api import generate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(name="llama-162m", d_model=768, n_layers=12, n_heads=12, ffn_hidden=3072, vocab_size=32000,
                      tie_embeddings=False, max_seq_len=256)
    model = build_model(cfg).eval()
    prompt = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = export(model, Path(tmp) / "onnx", "onnx")
        print(f"162M: {model.num_parameters():,} parameters; ONNX export + verification {time.perf_counter() - start:.0f} s, "
              f"max |dlogit| {result.max_diff:.1e}, {result.size_bytes / 1e6:.0f} MB")
        decoder = OnnxDecoder(Path(tmp) / "onnx", threads=1)
        start = time.perf_counter()
        generate(model, prompt, n_new, do_sample=False, eos_token_id=[], compile=True)
        print(f"neoformer compile=True: first call (compiles the decode step) {time.perf_counter() - start:.0f} s")
        times = {"onnxruntime": [], "neoformer compile=True": []}
        tokens = {}
        for _ in range(rounds):
            start = time.perf_counter()
            tokens["onnxruntime"] = onnx_greedy(decoder, prompt[0].tolist(), n_new)
            times["onnxruntime"].append(time.perf_counter() - start)
            start = time.perf_counter()
            out = generate(model, prompt, n_new, do_sample=False, eos_token_id=[], compile=True)
            times["neoformer compile=True"].append(time.perf_counter() - start)
            tokens["neoformer compile=True"] = out[0, prompt.shape[1]:].tolist()
    a, b = tokens.values()
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    rates = {k: [n_new / t for t in v] for k, v in times.items()}
    for name, values in rates.items():
        print(f"{name:24s} {statistics.median(values):7.1f} tok/s (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratios = [o / n for o, n in zip(*rates.values())]
    print(f"onnxruntime / neoformer compiled: median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-"
          f"{max(ratios):.2f}); greedy tokens agree for the first {agree} of {n_new}; load {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="table,speed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per round in speed162m")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    if "table" in args.only:
        table()
    if "speed" in args.only.replace("speed162m", ""):
        speed(args.rounds)
    if "speed162m" in args.only:
        speed_162m(args.rounds, args.tokens)


if __name__ == "__main__":
    main()
