"""Generation speed: neoformer's engine vs transformers' ``generate`` on the same random weights.

Both sides are the same Llama-shaped model: a random ``LlamaForCausalLM`` and a neoformer
model with its weights copied by ``neoformer.from_hf``; greedy decoding, batch 1, fp32. Each
case runs its variants in interleaved rounds in one process and reports the median, so a noisy
machine moves all columns together; the tokens of every variant are checked to be identical.

Sections (``--only`` picks some), each run once per ``--threads`` count:
- ``14m``:   384 wide, 6 layers, 6 heads, FFN 1536, vocab 65; 200 new tokens.
- ``162m``:  768 wide, 12 layers, 12 heads, FFN 3072, vocab 32000, untied; 64 new tokens.
  Both decode sections compare transformers, neoformer eager, neoformer compiled per weight dtype
  (``--dtypes fp32,bf16``) and, with ``--llama-cpp DIR``, llama.cpp's ``llama-bench`` on the same
  weights written as GGUF by neoformer's exporter (``--gguf F32,F16``), all in the same
  interleaved rounds. The memory-bandwidth floor is (bytes of the weights read per token) /
  (best read bandwidth of the run: a 1 GiB sum, best of 5 reads each round).
- ``batch``: 8 ragged prompts (4..60 tokens) in one call vs 8 sequential calls (162M).
- ``lookup``: prompt-lookup (n-gram) drafting on the cached trained teacher (``benchmarks/teacher.py``),
             repeated vs plain text, greedy and sampling.
- ``spec``:  speculative decoding on the 162M target with a 2-layer draft: an independent random
             one (random weights agree on almost nothing) and one made of the target's
             embedding, first 2 blocks, final norm and head (a "self-speculative" draft).
- ``spec-trained``: speculative decoding with trained models (``benchmarks/teacher.py``): the
             143.7M ``large`` target, the 3.9M ``small`` and 15.7M ``base`` teachers as drafts
             (not in the default ``--only``: it trains the teachers on first use).

Usage::

    python benchmarks/generate.py [--threads 1,2] [--rounds 3] [--only 14m,162m,batch,spec,lookup,spec-trained] [--no-compile]
        [--dtypes fp32,bf16] [--llama-cpp /path/to/llama.cpp/build/bin] [--gguf F32,F16]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT = 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def llama(width: int, layers: int, heads: int, ffn: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from neoformer import from_hf

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    return hf, from_hf(hf)


def bandwidth_gbs(gib: float = 1.0, tries: int = 5) -> float:
    """Read bandwidth: best of `tries` sums over a tensor far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


class Floor:
    """The memory-bandwidth floor of a decode step: bytes read per token / the best read bandwidth
    seen in the run. It is re-measured every round (best of several reads each time), so a busy
    moment cannot make the floor too low; a fraction above 1 would still mean the floor was
    measured badly, and is shown as such rather than as a figure."""

    def __init__(self):
        self.best_gbs = 0.0

    def measure(self) -> None:
        self.best_gbs = max(self.best_gbs, bandwidth_gbs())

    def ms(self, weight_bytes: int) -> float:
        return weight_bytes / self.best_gbs / 1e6

    def fraction(self, weight_bytes: int, ms_per_token: float) -> str:
        f = self.ms(weight_bytes) / ms_per_token
        return f"{f:.2f}" if f <= 1 else f"n/a (floor mismeasured: {f:.2f})"


def pack_linears(model) -> int:
    from neoformer.kernels import pack_linears as pack

    return pack(model)


def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token: all but the embedding table (one row per token)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("embed."))


# ---- llama.cpp side by side --------------------------------------------------------------------
# bytes per weight relative to fp32 (Q8_0: 32 int8 + an fp16 scale per block; Q4_0: 32 nibbles + a scale)
BYTES_VS_FP32 = {"fp32": 1, "generate": 1, "F32": 1, "bf16": 0.5, "fp16": 0.5, "F16": 0.5, "Q8_0": 34 / 128,
                 "Q4_0": 18 / 128}
GGUF_TYPES = {"F32": (torch.float32, None), "F16": (torch.float16, None), "Q8_0": (torch.float32, "q8_0"),
              "Q4_0": (torch.float32, "q4_0")}


def write_ggufs(model, types: list[str], folder) -> dict:
    """The same weights as GGUF files, written by neoformer's own exporter -> {type: path}."""
    from neoformer.export.common import Source
    from neoformer.export.gguf_format import write_gguf

    paths = {}
    for name in types:
        out = Path(folder) / name
        out.mkdir(parents=True, exist_ok=True)
        dtype, quant = GGUF_TYPES[name]
        write_gguf(Source(model), out, dtype, quant)
        paths[name] = out / "model.gguf"
    return paths


def llama_bench(binary_dir: str, gguf, n: int, threads: int) -> float:
    """llama.cpp's decode speed (tg tokens/s) from one `llama-bench -p 0 -n N -r 1` run (it warms up
    before it times), through the helper the quantization benchmark uses."""
    from llama_cpp import llama_bench as run_llama_bench

    result = run_llama_bench(Path(binary_dir), Path(gguf), threads=threads, tokens=n)
    if isinstance(result, str):
        raise SystemExit(f"llama-bench failed on {gguf}: {result}")
    return result[0]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def hf_generate(hf, ids, n):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           pad_token_id=0)


def ours_generate(model, ids, n, **kw):
    from neoformer.generate import generate

    return generate(model, ids, max_new_tokens=n, return_dict=True, **kw)


def rounds_raw(variants: dict, n_rounds: int) -> tuple[dict, dict, dict]:
    """variants: name -> fn() returning (seconds, tokens, extra), run interleaved round after round
    -> (seconds per round, last tokens, extras per round) by name."""
    times = {k: [] for k in variants}
    outs, extras = {}, {k: [] for k in variants}
    for _ in range(n_rounds):
        for name, fn in variants.items():
            sec, tokens, extra = fn()
            times[name].append(sec)
            outs[name] = tokens
            extras[name].append(extra)
    return times, outs, extras


def rounds(variants: dict, n_rounds: int) -> tuple[dict, dict, dict]:
    """rounds_raw reduced to medians over rounds (seconds, and every numeric stat)."""
    times, outs, extras = rounds_raw(variants, n_rounds)
    merged = {}
    for name, stats in extras.items():
        if stats[0] is None:
            merged[name] = None
            continue
        merged[name] = {key: statistics.median(s[key] for s in stats) for key, value in stats[0].items()
                        if isinstance(value, (int, float))}
    return {k: statistics.median(v) for k, v in times.items()}, outs, merged


def table(headers: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in r) + " |")
    print()


def same(outs: dict) -> bool:
    ref = next(iter(outs.values()))
    return all(torch.equal(o, ref) for o in outs.values())


# ---- sections --------------------------------------------------------------------------------
def case_decode(args, label: str, models, vocab: int, n: int):
    """Decode speed at batch 1 of one model, every column in the same interleaved rounds:
    transformers, neoformer eager / compiled (per --dtypes), llama.cpp (per --gguf). Tokens/s are
    decode-only (the prefill excluded): ours from the engine's timer, transformers from
    t(n tokens) - t(1 token), llama.cpp's tg figure (which starts from an empty context)."""
    import copy
    import tempfile

    hf, ours = models
    threads = torch.get_num_threads()
    ids = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    weights = {"fp32": ours}
    for name in args.dtypes:
        if name != "fp32":
            weights[name] = copy.deepcopy(ours).to(DTYPES[name])
    variants = {
        "transformers generate": lambda: (*timed(lambda: hf_generate(hf, ids, n)), None),
        "transformers, 1 token": lambda: (*timed(lambda: hf_generate(hf, ids, 1)), None),
        "neoformer eager fp32": lambda: _ours(ours, ids, n),
    }
    if args.compile:
        for name, model in weights.items():
            add_compiled(variants, model, ids, n, f"{label} {name}")
            if args.kernels:
                packed = copy.deepcopy(model)
                if pack_linears(packed):
                    add_compiled(variants, packed, ids, n, f"{label} {name} packed", prefix="neoformer kernels")
    floor = Floor()
    gguf_dir = tempfile.TemporaryDirectory()
    ggufs = write_ggufs(ours, args.gguf, gguf_dir.name) if args.llama_cpp else {}
    for kind, path in ggufs.items():
        variants[f"llama.cpp {kind}"] = lambda path=path: (None, None, {"tokens_per_s": llama_bench(
            args.llama_cpp, path, n, threads)})
    variants["(bandwidth)"] = lambda: (floor.measure(), None, None)
    times, outs, extras = rounds_raw(variants, args.rounds)
    hf_one = statistics.median(times.pop("transformers, 1 token"))
    for key in ("transformers, 1 token", "(bandwidth)"):
        outs.pop(key), times.pop(key, None), extras.pop(key)
    fp32 = {k: v for k, v in outs.items() if v is not None and k.split()[-1] in ("generate", "fp32")}
    print(f"### {label} model, batch 1, {threads} thread(s), {n} new tokens, {args.rounds} rounds "
          f"(identical fp32 tokens, neoformer and transformers: {same(fp32)})\n")
    for name in outs:
        if name.split()[-1] in ("bf16", "fp16"):  # random weights: next-token margins are tiny, so they drift
            agree = (outs[name] == outs["neoformer eager fp32"]).float().mean()
            print(f"{name}: {agree:.0%} of tokens equal to fp32's")
    print(f"read bandwidth, best of {5 * args.rounds} reads: {floor.best_gbs:.1f} GB/s\n")
    rows = []
    for name, spread in extras.items():
        if name == "transformers generate":
            rates = [(n - 1) / (sec - hf_one) for sec in times[name]]
        elif name.startswith("llama.cpp"):
            rates = [e["tokens_per_s"] for e in spread]
        else:
            rates = [(n - 1) / e["decode_s"] for e in spread]
        rate = statistics.median(rates)
        nbytes = round(weight_bytes(ours) * BYTES_VS_FP32[name.split()[-1]])
        fraction = floor.fraction(nbytes, 1e3 / rate)
        rows.append([name, rate, f"{min(rates):.3g}-{max(rates):.3g}", 1e3 / rate,
                     f"{floor.ms(nbytes):.2f}", fraction])
    table(["variant", "decode tokens/s (median)", "spread", "ms/token", "floor ms", "fraction of floor"], rows)
    ref = {r[0]: r[1] for r in rows}
    for name, rate in ref.items():
        if name.startswith(("neoformer compile", "neoformer kernels")):
            theirs = ", ".join(f"{rate / v:.2f}x {k}" for k, v in ref.items() if k.startswith("llama.cpp"))
            print(f"{name}: {theirs or '(no llama.cpp)'}")
    print()


def add_compiled(variants, model, ids, n, label, prefix="neoformer compile"):
    """Compile once (timed and reported), then add the compiled engine as a variant."""
    t, _ = timed(lambda: ours_generate(model, ids, n, compile=True))
    print(f"{label}: compiling the decode step took {t:.1f} s (once per model and batch size)")
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[model_dtype(model)]
    variants[f"{prefix} {dtype}"] = lambda: _ours(model, ids, n, compile=True)


def model_dtype(model) -> torch.dtype:
    """The weights' dtype (a packed model keeps them in buffers: the norms' parameters are fp32 there too)."""
    from neoformer.kernels import TiledLinear

    tiled = next((m for m in model.modules() if isinstance(m, TiledLinear)), None)
    return tiled.tiles.dtype if tiled is not None else next(model.parameters()).dtype


def _ours(model, ids, n, **kw):
    sec, out = timed(lambda: ours_generate(model, ids, n, **kw))
    return sec, out.sequences, out.stats


def case_batch(args, models):
    _, ours = models
    n = 64
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (int(L),), generator=g).tolist() for L in torch.linspace(4, 60, 8)]
    variants = {
        "8 sequential calls": lambda: _seq(ours, prompts, n),
        "one call, batch 8 (left-padded)": lambda: _batch(ours, prompts, n),
    }
    if args.compile:
        ours_generate(ours, prompts, n, compile=True)
        ours_generate(ours, prompts[0], n, compile=True)
        variants["8 sequential calls, compile=True"] = lambda: _seq(ours, prompts, n, compile=True)
        variants["one call, batch 8, compile=True"] = lambda: _batch(ours, prompts, n, compile=True)
    med, outs, _ = rounds(variants, args.rounds)
    base = med["8 sequential calls"]
    print(f"### 162M model, 8 ragged prompts (4..60 tokens), {n} new tokens each "
          f"(identical tokens: {same(outs)})\n")
    table(["variant", "aggregate tokens/s", "vs sequential"], [[k, 8 * n / v, base / v] for k, v in med.items()])


def _seq(model, prompts, n, **kw):
    t0 = time.perf_counter()
    rows = [ours_generate(model, p, n, **kw).new_tokens[0] for p in prompts]
    return time.perf_counter() - t0, torch.tensor(rows), None


def _batch(model, prompts, n, **kw):
    sec, out = timed(lambda: ours_generate(model, prompts, n, **kw))
    return sec, torch.tensor(out.new_tokens), None


def shared_draft(target, n_layers: int = 2):
    """The target's embedding, first n blocks, final norm and head as a smaller model."""
    from neoformer import build_model

    draft = build_model(target.config.replace(n_layers=n_layers)).eval()
    own = draft.state_dict()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in own})
    return draft


def case_spec(args, models):
    from neoformer import build_model

    _, target = models
    n, gamma = 64, args.gamma
    ids = torch.randint(0, 32000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    drafts = {"random 2-layer draft": build_model(target.config.replace(n_layers=2)).eval(),
              "target's first 2 layers + head": shared_draft(target)}
    compiles = [False, True] if args.compile else [False]
    for sampling in (False, True):
        opts = dict(temperature=1.0, seed=0) if sampling else {}
        variants = {}
        for compiled in compiles:
            tag = " (compile=True)" if compiled else ""
            if compiled:  # warm up (compile) outside the timed rounds
                ours_generate(target, ids, n, compile=True, **opts)
                for d in drafts.values():
                    ours_generate(target, ids, n, draft_model=d, num_draft_tokens=gamma, compile=True, **opts)
            variants["target alone" + tag] = lambda c=compiled: _ours(target, ids, n, compile=c, **opts)
            for name, d in drafts.items():
                variants[f"+ {name}, gamma {gamma}{tag}"] = lambda d=d, c=compiled: _ours(
                    target, ids, n, draft_model=d, num_draft_tokens=gamma, compile=c, **opts)
        med, outs, extras = rounds(variants, args.rounds)
        base = med["target alone"]
        mode = "sampling (temperature 1)" if sampling else "greedy"
        check = "" if sampling else f" (identical tokens: {same(outs)})"
        print(f"### Speculative decoding, 162M target, {mode}, {n} new tokens{check}\n")
        rows = []
        for name, sec in med.items():
            rate = extras[name].get("acceptance_rate") if extras[name] else None
            rows.append([name, n / sec, base / sec, "-" if rate is None else f"{rate:.0%}"])
        table(["variant", "tokens/s", "vs target alone (eager)", "acceptance"], rows)


def speculative_tables(args, title: str, model, prompts: dict, n: int, helpers: dict) -> None:
    """Target alone vs target + each helper (name -> generate() kwargs: a draft model or prompt
    lookup), eager and compiled, greedy and sampling, interleaved rounds; one table per prompt and mode."""
    for sampling in (False, True):
        opts = dict(temperature=1.0, seed=0) if sampling else {}
        mode = "sampling (temperature 1)" if sampling else "greedy"
        for label, prompt in prompts.items():
            prompt_t = torch.tensor([prompt])
            variants = {}
            for compiled in ([False, True] if args.compile else [False]):
                tag = " (compile=True)" if compiled else ""
                if compiled:  # warm up (compile) outside the timed rounds
                    ours_generate(model, prompt_t, n, compile=True, **opts)
                    for kw in helpers.values():
                        ours_generate(model, prompt_t, n, compile=True, **kw, **opts)
                variants["target alone" + tag] = lambda c=compiled: _ours(model, prompt_t, n, compile=c, **opts)
                for name, kw in helpers.items():
                    variants[f"+ {name}{tag}"] = lambda c=compiled, kw=kw: _ours(model, prompt_t, n, compile=c,
                                                                                   **kw, **opts)
            med, outs, extras = rounds(variants, args.rounds)
            eager = {k: v for k, v in outs.items() if "compile" not in k}
            compiled = {k: v for k, v in outs.items() if "compile" in k}
            check = "" if sampling else (f", tokens identical to the target alone's: eager {same(eager)}, compiled "
                                         f"{same(compiled) if compiled else '-'}, eager = compiled {same(outs)}")
            print(f"### {title}, {label} ({len(prompt)} prompt tokens), {mode}, {n} new tokens, "
                  f"{torch.get_num_threads()} thread(s){check}\n")
            rows = []
            for name, sec in med.items():
                rate = extras[name].get("acceptance_rate") if extras[name] else None
                alone = med["target alone" + (" (compile=True)" if "compile" in name else "")]
                rows.append([name, n / sec, alone / sec, "-" if rate is None else f"{rate:.0%}"])
            table(["variant", "tokens/s", "vs target alone (same compile)", "acceptance"], rows)


def stdlib_excerpt(tok) -> list[int]:
    """120 tokens of stdlib source (json/encoder.py): text like the teachers' training data."""
    import json as json_module

    return tok.encode((Path(json_module.__file__).parent / "encoder.py").read_text()[2000:3400])[:120]


def case_lookup(args):
    """Prompt-lookup drafting on the cached trained teacher (benchmarks/teacher.py): text whose
    continuation repeats the prompt (a stdlib source excerpt given twice, the second time cut short,
    so copying is the right continuation) and, for contrast, the same excerpt once."""
    from teacher import teacher_checkpoint

    from neoformer.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(str(teacher_checkpoint("small")), dtype=torch.float32)
    ids = stdlib_excerpt(tok)
    speculative_tables(args, "Prompt lookup, trained 3.9M teacher", model.eval(),
                       {"repeated text": ids + ids[:8], "plain text": ids}, 96,
                       {f"prompt lookup, {args.gamma} tokens": dict(prompt_lookup_num_tokens=args.gamma)})


def case_spec_trained(args):
    """Speculative decoding with trained models (benchmarks/teacher.py, same tokenizer): the 143.7M `large`
    target with the 3.9M `small` and 15.7M `base` teachers as drafts, and with `large-draft`, a 4-layer draft
    distilled from the target itself by `neoformer compress`. Weights in the first of --dtypes, linears on
    neoformer's CPU kernels unless --no-kernels."""
    from teacher import draft_checkpoint, teacher_checkpoint

    from neoformer.checkpoint import load_checkpoint

    dtype = DTYPES[args.dtypes[0]]
    target, tok, _ = load_checkpoint(str(teacher_checkpoint("large")), dtype=dtype)
    drafts = {size: load_checkpoint(str(teacher_checkpoint(size)), dtype=dtype)[0].eval() for size in ("small", "base")}
    drafts["large-draft"] = load_checkpoint(str(draft_checkpoint("large-draft")), dtype=dtype)[0].eval()
    params = {name: d.num_parameters() for name, d in drafts.items()}
    if args.kernels:
        for model in (target, *drafts.values()):
            pack_linears(model)
    kernels = "kernels" if args.kernels else "PyTorch ops"
    speculative_tables(args, f"Speculative decoding, trained 143.7M target ({args.dtypes[0]}, {kernels})", target.eval(),
                       {"stdlib text": stdlib_excerpt(tok)}, 64,
                       {f"{name} draft ({params[name] / 1e6:.1f}M), gamma {args.gamma}":
                        dict(draft_model=d, num_draft_tokens=args.gamma) for name, d in drafts.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1", help="comma-separated thread counts; each runs every section")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per speculative round")
    parser.add_argument("--only", default="14m,162m,batch,spec,lookup")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-kernels", dest="kernels", action="store_false",
                        help="leave out the rows with neoformer's CPU decode kernels (neoformer.kernels.pack_linears)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="weight dtypes of the compiled rows (fp32,bf16,fp16)")
    parser.add_argument("--llama-cpp", metavar="DIR", default=None,
                        help="folder with llama.cpp's llama-bench: adds llama.cpp columns on the same weights")
    parser.add_argument("--gguf", default="F32,F16", help=f"GGUF types for llama.cpp ({','.join(GGUF_TYPES)})")
    args = parser.parse_args()
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.gguf = [g for g in args.gguf.split(",") if g]
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"--dtypes: unknown {name!r}; choose from {', '.join(DTYPES)}")
    for name in args.gguf:
        if name not in GGUF_TYPES:
            parser.error(f"--gguf: unknown {name!r}; choose from {', '.join(GGUF_TYPES)}")
    if args.llama_cpp and not (Path(args.llama_cpp) / "llama-bench").is_file():
        parser.error(f"--llama-cpp: no llama-bench in {args.llama_cpp} (give llama.cpp's build/bin folder)")
    only = set(args.only.split(","))
    import transformers

    print(f"machine: {platform.processor() or platform.machine()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; load before: {os.getloadavg()[0]:.2f}\n")
    small = llama(384, 6, 6, 1536, 65) if "14m" in only else None
    big = llama(768, 12, 12, 3072, 32000) if only & {"162m", "batch", "spec"} else None
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        if small:
            case_decode(args, "14M", small, 65, 200)
        if "162m" in only:
            case_decode(args, "162M", big, 32000, 64)
        if "batch" in only:
            case_batch(args, big)
        if "spec" in only:
            case_spec(args, big)
        if "lookup" in only:
            case_lookup(args)
        if "spec-trained" in only:
            case_spec_trained(args)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
