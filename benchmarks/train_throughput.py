"""Training throughput: a neoformer training step vs transformers' LlamaForCausalLM, same shape.

Both models: 4 layers, 4 heads, d_model 128, SwiGLU FFN 344, RMSNorm, RoPE, no bias, untied
head, vocab 65; batch 12 x 64 random tokens; AdamW (the same fused kernel for both), grad
clipping 1.0. The neoformer side runs the real loop, ``neoformer.train.fit`` (objective, clip,
NaN check, optimizer step, schedule, logging), so per-step overheads are counted. HF runs the
minimal loop (forward with labels, backward, clip, step, zero_grad).

Variants are measured in interleaved rounds in one process; the table reports the median
tokens/s of each and the ratio. Usage::

    python benchmarks/train_throughput.py [--rounds 5] [--steps 20] [--threads 2] [--compile] [--nanogpt PATH]

``--compile`` adds torch.compile'd variants of both (about 30 s of compilation each).
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from pathlib import Path

import torch

B, T, V = 12, 64, 65
SHAPE = dict(d_model=128, n_layers=4, n_heads=4, ffn=344)


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, V, (B, T + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def build_ours():
    from neoformer import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=V, d_model=SHAPE["d_model"], n_layers=SHAPE["n_layers"], n_heads=SHAPE["n_heads"],
                      ffn_hidden=SHAPE["ffn"], norm="rmsnorm", activation="swiglu", position="rope", bias=False,
                      tie_embeddings=False, max_seq_len=T)
    torch.manual_seed(0)
    return build_model(cfg)


def build_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=SHAPE["d_model"], num_hidden_layers=SHAPE["n_layers"],
                      num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_heads"],
                      intermediate_size=SHAPE["ffn"], max_position_embeddings=T, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


class Ours:
    """Runs ``steps`` optimizer steps of neoformer's fit() and reports tokens/s."""

    def __init__(self, precision: str, compile: bool):
        from neoformer.train import TrainConfig, causal_lm

        self.model, self.objective = build_ours(), causal_lm
        self.data = batches()
        self.cfg = dict(lr=1e-3, warmup_steps=0, batch_size=B, seq_len=T, precision=precision, compile=compile,
                        progress=False, plot=False, eval_every=0, save_every=0, log_every=10**9)
        self.TrainConfig = TrainConfig

    def run(self, steps: int) -> float:
        from neoformer.train import fit

        cfg = self.TrainConfig(max_steps=steps, **self.cfg)
        start = time.perf_counter()
        fit(self.model, self.objective, self.data, cfg, log=lambda *_: None)
        return steps * B * T / (time.perf_counter() - start)


class HF:
    def __init__(self, precision: str, compile: bool):
        self.model = build_hf()
        self.model.train()
        self.forward = torch.compile(self.model) if compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        self.data = batches()
        self.amp = precision == "bf16"

    def step(self):
        x, y = next(self.data)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            logits = self.forward(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        loss.item()
        return steps * B * T / (time.perf_counter() - start)


class NanoGPT:
    """nanoGPT's own model and optimizer from the user's checkout (``--nanogpt PATH``; nothing of it is copied
    here): its GPT at the same width and depth (its GPT-2 block: LayerNorm, GELU MLP 4x, learned positions, tied
    head, no bias as in its train.py), configure_optimizers (AdamW, betas 0.9/0.99 as its shakespeare config;
    not fused on CPU, as nanoGPT chooses), and its step: forward with targets, backward, clip 1.0, step,
    zero_grad(set_to_none=True). fp32 only: nanoGPT's train.py runs CPU in fp32 (no autocast)."""

    def __init__(self, checkout: Path):
        import importlib.util

        spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.GPTConfig(block_size=T, vocab_size=V, n_layer=SHAPE["n_layers"], n_head=SHAPE["n_heads"],
                               n_embd=SHAPE["d_model"], dropout=0.0, bias=False)
        torch.manual_seed(0)
        with contextlib.redirect_stdout(None):  # its constructor and optimizer print parameter counts
            self.model = module.GPT(cfg)
            self.opt = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        self.model.train()
        self.data = batches()

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            x, y = (t.contiguous() for t in next(self.data))  # its get_batch gives contiguous tensors
            _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        loss.item()
        return steps * B * T / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also compare torch.compile'd steps (slow start)")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: its model and optimizer step side by side")
    args = parser.parse_args()
    if args.nanogpt and not (args.nanogpt / "model.py").is_file():
        parser.error(f"{args.nanogpt} is not a nanoGPT checkout (no model.py)")
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = {}
    for precision in ("fp32", "bf16"):
        variants[f"eager {precision}"] = (Ours(precision, False), HF(precision, False))
    if args.compile:
        for precision in ("fp32", "bf16"):
            variants[f"compiled {precision}"] = (Ours(precision, True), HF(precision, True))
    n_ours = sum(p.numel() for p in variants["eager fp32"][0].model.parameters())
    n_hf = sum(p.numel() for p in variants["eager fp32"][1].model.parameters())
    assert n_ours == n_hf, (n_ours, n_hf)

    nano = NanoGPT(args.nanogpt) if args.nanogpt else None
    for ours, hf in variants.values():  # warm-up (and compilation)
        ours.run(3)
        hf.run(3)
    if nano:
        nano.run(3)
    results = {name: ([], []) for name in variants}
    nano_rates: list[float] = []
    for _ in range(args.rounds):
        for name, (ours, hf) in variants.items():
            results[name][0].append(ours.run(args.steps))
            results[name][1].append(hf.run(args.steps))
        if nano:
            nano_rates.append(nano.run(args.steps))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {n_ours:,} params, batch {B} x {T}; median of {args.rounds} rounds "
          f"x {args.steps} steps")
    print("| variant | neoformer tok/s | HF Llama tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, (ours, hf) in results.items():
        o, h = statistics.median(ours), statistics.median(hf)
        print(f"| {name} | {o:,.0f} | {h:,.0f} | {o / h:.2f}x |")
    spread = {name: f"{min(o):,.0f}-{max(o):,.0f} / {min(h):,.0f}-{max(h):,.0f}" for name, (o, h) in results.items()}
    print("spread (min-max over rounds), neoformer / HF: " + "; ".join(f"{k}: {v}" for k, v in spread.items()))
    if nano:
        n_nano = sum(p.numel() for p in nano.model.parameters())
        rate = statistics.median(nano_rates)
        ours_fp32 = statistics.median(results["eager fp32"][0])
        print(f"nanoGPT ({n_nano:,} params, its GPT-2 block), eager fp32: {rate:,.0f} tok/s "
              f"({min(nano_rates):,.0f}-{max(nano_rates):,.0f}); neoformer eager fp32 / nanoGPT: {ours_fp32 / rate:.2f}x")
    base = statistics.median(results["eager fp32"][1])
    best = max(results, key=lambda n: statistics.median(results[n][0]))
    best_hf = max(results, key=lambda n: statistics.median(results[n][1]))
    ours_best = statistics.median(results[best][0])
    print(f"best neoformer ({best}) vs HF eager fp32 (its default): {ours_best / base:.2f}x; "
          f"vs the best HF variant ({best_hf}): {ours_best / statistics.median(results[best_hf][1]):.2f}x")


if __name__ == "__main__":
    main()
