"""Char-level Tiny Shakespeare: final val loss and wall time of ~0.8M-parameter models, 2000 steps.

The setting of nanoGPT's ``shakespeare_char`` CPU run (4 layers, 4 heads, 128 wide, context
64, batch 12, 2000 iterations; nanoGPT reports val loss ~1.88 there): first 90% of the text
for training, last 10% for validation, random windows (nanoGPT sampling). Two recipes run side
by side through ``neoformer.train.fit``:

* ``gpt2``: nanoGPT's own: GPT-2 block (LayerNorm, GELU MLP, learned positions, tied head),
  AdamW lr 1e-3 (beta2 0.99), 100 warmup steps, cosine to 1e-4.
* ``llama``: neoformer's default decoder (RMSNorm, SwiGLU, RoPE, untied head) at a higher lr
  (1.5e-3, cosine to 1e-4; 2e-3 gave 1.693, 3e-3 1.705, 4e-3 1.712).

Val loss is measured every ``--eval-every`` steps on a fixed subset of the validation windows
(for the time-to-1.886 column) and on the whole validation split at the end. Usage::

    python benchmarks/shakespeare.py path/to/tinyshakespeare.txt [--steps 2000] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from neoformer import ModelConfig, build_model
from neoformer.data import CausalWindows, make_sampler, sequential_batches
from neoformer.tokenizer import CharTokenizer
from neoformer.train import TrainConfig, causal_lm, evaluate, fit

B, T = 12, 64
TARGET = 1.886

RECIPES = {
    "gpt2": (dict(norm="layernorm", activation="gelu", position="learned", bias=True, tie_embeddings=True,
                  ffn_hidden=512), dict(lr=1e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1)),
    "llama": (dict(norm="rmsnorm", activation="swiglu", position="rope", bias=False, tie_embeddings=False,
                   ffn_hidden=344), dict(lr=1.5e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1)),
}


def load(path: Path):
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    tok = CharTokenizer.from_texts([text])
    train = np.asarray(tok.encode(text[:cut]), dtype=np.int64)
    val = np.asarray(tok.encode(text[cut:]), dtype=np.int64)
    return tok, train, val


def run(name: str, tok, train, val, steps: int, eval_every: int, eval_batches: int, precision: str) -> dict:
    model_fields, train_fields = RECIPES[name]
    cfg = ModelConfig(name=f"shakespeare-{name}", vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=4,
                      max_seq_len=T, **model_fields)
    torch.manual_seed(1337)
    model = build_model(cfg)
    windows, val_windows = CausalWindows(train, T), CausalWindows(val, T)
    sampler = make_sampler(windows, B, "random", seed=1337)
    history: list[tuple[int, float, float]] = []
    started = time.perf_counter()

    def on_event(event, info):
        if event == "eval":
            history.append((info["step"], info["val_loss"], time.perf_counter() - started))

    train_cfg = TrainConfig(max_steps=steps, batch_size=B, seq_len=T, warmup_steps=100, grad_clip=1.0,
                            eval_every=eval_every, eval_batches=eval_batches, progress=False, plot=False,
                            save_every=0, log_every=10**9, precision=precision, **train_fields)
    result = fit(model, causal_lm, sampler, train_cfg, val_batches=lambda: sequential_batches(val_windows, B),
                 callbacks=[on_event], log=lambda *_: None)
    wall = time.perf_counter() - started
    full_val = evaluate(model, causal_lm, sequential_batches(val_windows, B))
    reached = next(((step, seconds) for step, loss, seconds in history if loss <= TARGET), None)
    return {"params": model.num_parameters(), "val": full_val, "subset_val": result.val_loss, "wall": wall,
            "reached": reached, "steps": result.step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="tinyshakespeare.txt (1,115,394 bytes)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=40, help="validation batches per periodic eval")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--recipes", default="gpt2,llama", help="comma-separated: gpt2, llama")
    args = parser.parse_args()
    if not args.path.is_file():
        parser.error(f"{args.path} not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, train, val = load(args.path)
    print(f"tinyshakespeare: {len(train):,} train / {len(val):,} val characters, vocab {tok.vocab_size}; "
          f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.precision}")
    results = {name: run(name, tok, train, val, args.steps, args.eval_every, args.eval_batches, args.precision)
               for name in args.recipes.split(",")}
    print(f"| recipe | params | steps | wall time | final val loss (full split) | time to val {TARGET} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        reached = f"{r['reached'][1]:.0f} s (step {r['reached'][0]})" if r["reached"] else "not reached"
        print(f"| {name} | {r['params']:,} | {r['steps']} | {r['wall']:.0f} s | {r['val']:.4f} | {reached} |")
    if len(results) == 2 and all(r["reached"] for r in results.values()):
        a, b = results["gpt2"], results["llama"]
        print(f"llama vs gpt2: val loss {b['val'] - a['val']:+.3f}, time to {TARGET}: "
              f"{a['reached'][1] / b['reached'][1]:.2f}x faster")


if __name__ == "__main__":
    main()
