"""Run llama.cpp itself on a written GGUF and check its greedy text against neoformer's.

Optional part of ``--format gguf`` verification: given a folder with llama.cpp's ``llama-completion``
binary (``--llama-cpp DIR`` or ``$NEOFORMER_LLAMA_CPP_DIR``), the GGUF is run with greedy decoding
(``--temp 0``, f32 KV cache, one thread, ``--no-repack``: the AMX weight repacking of this llama.cpp
build segfaults on Q8_0/Q4_0 files on an AMX machine here, and only changes the kernels) on a prompt, and

* llama.cpp's tokens for the prompt (``--verbose-prompt``) must equal neoformer's tokenizer's, which
  checks the tokenizer metadata (``tokenizer.ggml.*``) as llama.cpp reads it;
* the generated text must equal neoformer's greedy text from the same weights (the read-back,
  dequantized GGUF tensors, so a quantized file is compared with what it holds).

The comparison rule. llama.cpp's arithmetic differs from PyTorch's: a different summation order in
F32, and for quantized weights it also quantizes the activations (Q8_0 / Q8_1 blocks) before each
dot product. A step whose top-1 / top-2 logit gap (neoformer's) is below ``MARGIN[type]`` is a
near tie that either runtime may break either way, so the texts are compared exactly up to the first
such step (all ``n`` tokens when there is none); the report says how many tokens were compared.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch

from .common import ExportError

ENV = "NEOFORMER_LLAMA_CPP_DIR"
BINARY = "llama-completion"
DEFAULT_PROMPT = "def main("
NEW_TOKENS = 32
# per GGUF weight type: a top-1/top-2 logit gap below this is a near tie (see module docstring)
MARGIN = {"F32": 1e-3, "F16": 0.02, "BF16": 0.1, "Q8_0": 0.1, "Q4_0": 0.3}
_PROMPT_TOKEN = re.compile(r"^\s*(\d+) -> '")


def llama_cpp_binary(directory: str | os.PathLike | None) -> Path | None:
    """``DIR/llama-completion`` from the argument or ``$NEOFORMER_LLAMA_CPP_DIR``; None when neither is set."""
    directory = directory or os.environ.get(ENV)
    if not directory:
        return None
    binary = Path(directory) / BINARY
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ExportError(f"--llama-cpp {directory}: no executable {BINARY} there; pass llama.cpp's build/bin "
                          "folder (make llama-cpp builds it)")
    return binary


@torch.no_grad()
def greedy_with_margins(model, prompt: list[int], n: int, eos: int | None) -> tuple[list[int], list[float]]:
    """neoformer's greedy tokens (stopping after EOS) and each step's top-1 minus top-2 logit."""
    logits, past, _ = model(torch.tensor([prompt]), use_cache=True)
    tokens, margins = [], []
    for _ in range(n):
        top = logits[0, -1].float().topk(2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        if tokens[-1] == eos:
            break
        logits, past, _ = model(torch.tensor([[tokens[-1]]]), past, use_cache=True)
    return tokens, margins


def run_llama_cpp(binary: Path, gguf: Path, prompt: str, n: int, timeout: float = 300) -> tuple[list[int], str]:
    """(llama.cpp's prompt token ids, its greedy continuation as text)."""
    command = [str(binary), "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0", "-s", "0", "-t", "1",
               "-ctk", "f32", "-ctv", "f32", "-no-cnv", "--no-warmup", "--no-repack", "--no-display-prompt", "--verbose-prompt",
               "--no-escape"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExportError(f"llama.cpp check: {binary.name} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if " E " in line or "error" in line.lower()]
        raise ExportError(f"llama.cpp could not run the GGUF: {(errors or ['exit code %d' % done.returncode])[0].strip()}")
    lines = done.stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if "number of tokens in prompt" in line), None)
    ids = []
    for line in lines[start + 1:] if start is not None else []:
        match = _PROMPT_TOKEN.match(line.split(" I ", 1)[-1])
        if not match:
            break
        ids.append(int(match.group(1)))
    # completion.cpp logs every piece to stdout, " [end of text]\n" at EOS and "\n\n" when it exits
    return ids, done.stdout.removesuffix("\n\n").removesuffix(" [end of text]\n")


def check_llama_cpp(binary: Path, gguf: Path, model, tokenizer, weight_type: str, prompt: str = DEFAULT_PROMPT,
                    n: int = NEW_TOKENS) -> dict:
    """Compare llama.cpp with ``model`` (neoformer on the GGUF's weights); raise ExportError on a mismatch.

    Returns ``{"compared": tokens that had to agree, "generated": n, "whole": whether all n texts agree,
    "min_margin": ...}``.
    """
    if tokenizer is None:
        raise ExportError("the llama.cpp check needs the checkpoint's tokenizer (llama.cpp takes text)")
    ours = tokenizer.encode(prompt)
    theirs, text = run_llama_cpp(binary, gguf, prompt, n)
    if theirs != ours:
        raise ExportError(f"llama.cpp tokenizes {prompt!r} as {theirs}, neoformer as {ours}: the GGUF's tokenizer "
                          "metadata is read differently")
    tokens, margins = greedy_with_margins(model, ours, n, tokenizer.eos_id)
    limit = MARGIN[weight_type]
    compared = next((i for i, m in enumerate(margins) if m < limit), len(tokens))
    visible = [t for t in tokens if t != tokenizer.eos_id]
    expected = tokenizer.decode(visible[:compared])
    whole = text == tokenizer.decode(visible)
    # up to the first near tie; a cut inside a multi-byte character decodes as U+FFFD
    agrees = whole or (compared < len(tokens) and text.startswith(expected.rstrip("\ufffd")))
    if not agrees:
        raise ExportError(f"llama.cpp's greedy text differs from neoformer's within the first {compared} tokens "
                          f"({weight_type}): llama.cpp {text[:80]!r}, neoformer {expected[:80]!r}")
    return {"compared": len(tokens) if whole else compared, "generated": len(tokens), "whole": whole,
            "min_margin": min(margins[:compared], default=None)}
