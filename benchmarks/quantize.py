"""Quantized vs fp32 on the trained teacher: quality (val perplexity ratio, KL, top-1), decode speed, bytes, RSS.

    PYTHONPATH=$PWD \
        python benchmarks/quantize.py [--batches 16] [--rounds 3] [--tokens 48] [--big]

Quality: every val window of the teacher's corpus (up to --batches), fp32 activations, no autocast:
perplexity ratio to fp32, mean KL(fp32 || quantized) per token, top-1 agreement.
Speed: batch-1 greedy decode (eager, static cache) with 1 and 2 threads, schemes interleaved over
--rounds; median tokens/s with min-max, and the 16 x 128-token prefill time.
Bytes: tensor bytes of the written quantized checkpoint. RSS: a fresh process loads the checkpoint
and decodes; its resident-set growth over the bare interpreter, against weight bytes + KV cache.
--big adds a random 162M Llama-shaped model (768 wide, 12 layers, vocab 32000) for speed, bytes and
memory; with --llama-cpp DIR (llama.cpp's build/bin, `make llama-cpp`) the same weights are written as
GGUF F32 / Q8_0 / Q4_0 with neoformer's exporter and llama-bench runs on them in the same rounds.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
warnings.filterwarnings("ignore")

from neoformer import ModelConfig, build_model  # noqa: E402
from neoformer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from neoformer.generate import generate  # noqa: E402
from neoformer.planner import kv_cache_bytes  # noqa: E402
from neoformer.quantize import quantize_checkpoint, tensor_bytes  # noqa: E402
from llama_cpp import llama_bench  # noqa: E402

DEFAULT_SKIP = ("lm_head", "embed")
SCHEMES = [("int8", None, DEFAULT_SKIP), ("int8-dynamic", None, DEFAULT_SKIP), ("nf4", 64, DEFAULT_SKIP),
           ("int4", 64, DEFAULT_SKIP), ("int4", 32, DEFAULT_SKIP), ("int8", None, ()), ("nf4", 64, ()),
           ("int4", 64, ())]  # 192 wide: no g128; skip () quantizes the embedding and head too ("all")


def label(scheme, group):
    return f"{scheme} g{group}" if group else scheme


def val_batches(checkpoint, tokenizer, config, limit):
    from neoformer.train.batches import build_eval_batches
    from neoformer.train.run_config import RunConfig, TrainConfig
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    run = RunConfig.from_dict({"model": config["model"], "train": {k: v for k, v in config["train"].items() if k in fields},
                               "data": config.get("data") or {}})
    batches = []
    for number, batch in enumerate(build_eval_batches(run, tokenizer, "val")()):
        if number >= limit:
            break
        batches.append(batch)
    return batches


@torch.no_grad()
def quality(model, reference_logits, batches):
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for (x, y), ref in zip(batches, reference_logits):
        logits = model(x)[0].float()
        logp = F.log_softmax(logits, -1)
        ref_logp = F.log_softmax(ref, -1)
        nll += F.nll_loss(logp.flatten(0, 1), y.flatten(), reduction="sum").item()
        kl += (ref_logp.exp() * (ref_logp - logp)).sum(-1).sum().item()
        agree += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
        count += y.numel()
    return {"ppl": math.exp(nll / count), "kl": kl / count, "top1": agree / count}


@torch.no_grad()
def decode_quality(model, reference_logits, batches, windows: int = 8) -> dict:
    """The same measures on the decode path: the first ``windows`` validation windows fed one token at a
    time through the KV cache (batch 1), where the CPU decode kernels run (int4: int8 activations)."""
    from neoformer.generate.cache import StaticKVCache
    from neoformer.generate.engine import decode_one, prefill

    nll, kl, agree, count = 0.0, 0.0, 0, 0
    rows = [(x[i:i + 1], y[i], ref[i]) for (x, y), ref in zip(batches, reference_logits) for i in range(x.shape[0])]
    for x, y, ref in rows[:windows]:
        cache = StaticKVCache.for_model(model, 1, x.shape[1])
        steps = [prefill(model, cache, x[:, :1], torch.zeros(1, 1, dtype=torch.long))]
        for t in range(1, x.shape[1]):
            steps.append(decode_one(model, cache, x[:, t]))
        logits = torch.cat(steps).float()
        logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
        nll += F.nll_loss(logp, y, reduction="sum").item()
        kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        agree += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
        count += y.numel()
    return {"ppl": math.exp(nll / count), "kl": kl / count, "top1": agree / count}


def decode_rate(model, prompt, tokens, compile=False):
    """Decode tokens/s of greedy batch-1 generation (the engine's decode timer: prefill excluded, as
    llama-bench's tg figure excludes it)."""
    with torch.inference_mode():
        generate(model, [prompt], max_new_tokens=2, eos_token_id=[], compile=compile)  # warm: layouts, compiles
        out = generate(model, [prompt], max_new_tokens=tokens, eos_token_id=[], compile=compile, return_dict=True)
    return (out.sequences.shape[1] - len(prompt) - 1) / out.stats["decode_s"]


def prefill_ms(model, vocab, batch=16):
    x = torch.randint(0, vocab, (batch, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        return (time.perf_counter() - start) * 1e3


RSS_PROBE = r"""
import sys, resource, torch, warnings
warnings.filterwarnings("ignore")
from neoformer.checkpoint import load_checkpoint
from neoformer.generate import generate
import neoformer.quantize, neoformer.quantize.modules
try:
    import bitsandbytes  # counted in the baseline: a library, not the model
except ImportError:
    pass
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
base = rss()
model, _, _ = load_checkpoint(sys.argv[1])
generate(model, [[1, 2, 3]], max_new_tokens=int(sys.argv[2]), eos_token_id=[])
print(rss() - base)
"""


def rss_growth(path, tokens):
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), str(tokens)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def speed_table(models, prompt, tokens, rounds, vocab, prefill_batch=16, thread_counts=(1, 2)):
    rates = {(name, t): [] for name in models for t in thread_counts}
    prefill = {name: [] for name in models}
    for _ in range(rounds):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for name, model in models.items():
                rates[(name, threads)].append(decode_rate(model, prompt, tokens))
        torch.set_num_threads(1)
        for name, model in models.items():
            prefill[name].append(prefill_ms(model, vocab, prefill_batch))
    return rates, prefill


def teacher_section(args, work):
    from teacher import teacher_checkpoint

    path = teacher_checkpoint("small")
    fp32, tokenizer, config = load_checkpoint(path)
    batches = val_batches(path, tokenizer, config, args.batches)
    with torch.no_grad():
        reference = [fp32(x)[0].float() for x, _ in batches]
    base_q = quality(fp32, reference, batches)
    base_dq = decode_quality(fp32, reference, batches)
    models, rows = {"fp32": fp32}, {}
    fp32_bytes = tensor_bytes(path)
    for scheme, group, skip in SCHEMES:
        name = big_name(scheme, group, skip)
        written, _, _ = quantize_checkpoint(path, work / name.replace(" ", "-"), scheme, group, skip)
        model, _, _ = load_checkpoint(written)
        models[name] = model
        rows[name] = {**quality(model, reference, batches), "bytes": tensor_bytes(written), "path": written,
                      "decode": decode_quality(model, reference, batches)}
    prompt = tokenizer.encode("def main(")
    rates, prefill = speed_table(models, prompt, args.tokens, args.rounds, fp32.config.vocab_size)
    windows = sum(x.shape[0] for x, _ in batches)
    print(f"\nteacher {path.name}: {fp32.num_parameters():,} parameters, {windows} val windows x "
          f"{batches[0][0].shape[1]} tokens; fp32 val ppl {base_q['ppl']:.4f}")
    print("quality: whole windows in one forward (the prefill / GEMM path); 'decode': the first 8 windows one token at "
          "a time through the cache (the decode kernels), each against fp32's whole-window logits")
    print(f"{'scheme':14s} {'ppl ratio':>9s} {'mean KL':>9s} {'top-1':>7s} {'decode: ppl ratio, KL, top-1':>30s} "
          f"{'bytes':>11s} {'RSS growth':>11s}  {'decode tok/s, 1 thread':>27s}  {'2 threads':>27s}  prefill 16x128 ms")
    for name in models:
        r = rows.get(name, {**base_q, "bytes": fp32_bytes, "path": path, "decode": base_dq})
        d = r["decode"]
        rss = rss_growth(r["path"], args.tokens)
        print(f"{name:14s} {r['ppl'] / base_q['ppl']:9.4f} {r['kl']:9.5f} {r['top1']:7.2%} "
              f"{d['ppl'] / base_dq['ppl']:12.4f} {d['kl']:9.5f} {d['top1']:7.2%} {r['bytes']:11,} "
              f"{rss:11,}  {fmt_rates(rates[(name, 1)], statistics.median(rates[('fp32', 1)])):>27s}  "
              f"{fmt_rates(rates[(name, 2)], statistics.median(rates[('fp32', 2)])):>27s}  "
              f"{statistics.median(prefill[name]):7.1f} [{min(prefill[name]):.1f}-{max(prefill[name]):.1f}]")


BIG_VARIANTS = [("int8", None, ("lm_head", "embed")), ("int8", None, ()), ("int8-dynamic", None, ()), ("int4", 64, ()),
                ("nf4", 64, ())]


def big_name(scheme, group, skip):
    return label(scheme, group) + ("" if skip else " all")  # "all": embedding and head quantized too


def big_section(args, work):
    """Random 162M Llama shape, speed / bytes / memory only, with llama.cpp on the same weights side by side."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, ffn_hidden=3072, max_seq_len=512,
                      norm="rmsnorm", activation="swiglu", position="rope", bias=False, tie_embeddings=False)
    model = build_model(cfg).eval()
    path = save_checkpoint(work / "big", 0, model)
    ggufs = llama_cpp_files(args, model, work)
    del model
    models, paths = {"fp32": load_checkpoint(path)[0]}, {"fp32": path}
    for scheme, group, skip in BIG_VARIANTS:
        name = big_name(scheme, group, skip)
        written, _, _ = quantize_checkpoint(path, work / name.replace(" ", "-"), scheme, group, skip)
        models[name], paths[name] = load_checkpoint(written)[0], written
    threads = (1, 2) if args.big_threads == 2 else (1,)
    rounds, tokens = max(1, args.rounds), args.tokens
    rates = {(name, t): [] for name in [*models, *ggufs] for t in threads}
    prefill = {name: [] for name in [*models, *ggufs]}
    for _ in range(rounds):  # ours and llama.cpp's interleaved, round by round
        for t in threads:
            torch.set_num_threads(t)
            for name, m in models.items():
                rates[(name, t)].append(decode_rate(m, [1, 2, 3, 4], tokens, compile=args.compile))
            for name, gguf in ggufs.items():
                rates[(name, t)].append(llama_bench(args.binaries, gguf, threads=t, tokens=tokens))
        torch.set_num_threads(1)
        for name, m in models.items():
            prefill[name].append(4 * 128 / prefill_ms(m, 32000, 4) * 1e3)
        for name, gguf in ggufs.items():
            prefill[name].append(llama_bench(args.binaries, gguf, threads=1, prompt=128))
    print(f"\nrandom 162M Llama-shaped ({sum(p.numel() for p in models['fp32'].parameters()):,} parameters), speed only; "
          f"decode ({'compiled' if args.compile else 'eager'}): batch 1, {tokens} new tokens, tokens/s median [min-max] over {rounds} rounds (llama.cpp: "
          "llama-bench -n, mean of each round); prefill: tokens/s of 4 x 128 tokens (ours) / one 128-token batch "
          "(llama-bench -p 128), 1 thread; 'all': the token embedding and the LM head are quantized too")
    base = {t: statistics.median(rates[("fp32", t)]) for t in threads}
    for name in [*models, *ggufs]:
        cells = [f"{t} thread(s) {fmt_rates(rates[(name, t)], base[t])}" for t in threads]
        cells.append(f"prefill {fmt_rates(prefill[name], statistics.median(prefill['fp32']))}")
        if name in paths:
            weights = tensor_bytes(paths[name])
            rss = rss_growth(paths[name], 8)
            kv = kv_cache_bytes(cfg, batch=1, seq=cfg.max_seq_len, dtype_bytes=4)
            cells.append(f"bytes {weights:,}   RSS growth {rss:,} = {rss / (weights + kv):.2f}x (bytes + KV {kv:,})")
        else:
            cells.append(f"bytes {ggufs[name].stat().st_size:,} (file)")
        print(f"{name:18s} " + "   ".join(cells))


def llama_cpp_files(args, model, work) -> dict[str, Path]:
    """'llama.cpp Q8_0' -> model.gguf of the same weights (neoformer's exporter), or {} without --llama-cpp."""
    if not args.llama_cpp:
        return {}
    from llama_cpp import bench_dir, write_gguf
    from teacher import teacher_checkpoint

    args.binaries = bench_dir(args.llama_cpp)
    _, tokenizer, _ = load_checkpoint(teacher_checkpoint("small"))  # llama.cpp wants a vocabulary; ids are random
    return {f"llama.cpp {(quant or 'f32').upper()}": write_gguf(model, work / f"gguf-{quant or 'f32'}", tokenizer,
                                                                 quant=quant)
            for quant in (None, "q8_0", "q4_0")}


def fmt_rates(values, base):
    """Median [min-max] and ratio to ``base`` of tokens/s figures; a llama.cpp failure is shown as its reason."""
    failed = [v for v in values if isinstance(v, str)]
    if failed:
        return f"failed: {failed[0]}"
    values = [v[0] if isinstance(v, tuple) else v for v in values]
    m = statistics.median(values)
    return f"{m:6.1f} [{min(values):.1f}-{max(values):.1f}] {m / base:4.2f}x"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--big", action="store_true", help="add the random 162M model (speed only)")
    parser.add_argument("--big-only", action="store_true", help="only the 162M model")
    parser.add_argument("--big-threads", type=int, choices=(1, 2), default=1, help="threads for the 162M model")
    parser.add_argument("--compile", action="store_true", help="162M: decode with the compiled step (compile=True)")
    parser.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp's build/bin (make llama-cpp): llama-bench on "
                        "the 162M model's weights as GGUF F32 / Q8_0 / Q4_0, side by side")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} (2 vCPUs), torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.big_only:
            teacher_section(args, Path(tmp))
        if args.big or args.big_only:
            big_section(args, Path(tmp))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
