"""Generation speed: neoformer's engine vs transformers' ``generate`` on the same random weights.

Both sides are the same Llama-shaped model: a random ``LlamaForCausalLM`` and a neoformer
model with its weights copied by ``neoformer.from_hf``; greedy decoding, batch 1, fp32. Each
case runs its variants in interleaved rounds in one process and reports the median, so a noisy
machine moves all columns together; the tokens of every variant are checked to be identical.

Sections (``--only`` picks some):
- ``14m``:   384 wide, 6 layers, 6 heads, FFN 1536, vocab 65; 200 new tokens.
- ``162m``:  768 wide, 12 layers, 12 heads, FFN 3072, vocab 32000, untied; 64 new tokens. The
             memory-bandwidth floor is (bytes of the weights read per token) / (bandwidth
             measured here by summing a 1 GiB tensor); decode ms/token of each side is compared
             with it (HF's from t(64 tokens) - t(1 token), ours from the engine's own timer).
- ``batch``: 8 ragged prompts (4..60 tokens) in one call vs 8 sequential calls (162M).
- ``spec``:  speculative decoding on the 162M target with a 2-layer draft: an independent random
             one (random weights agree on almost nothing) and one made of the target's
             embedding, first 2 blocks, final norm and head (a "self-speculative" draft).

Usage::

    python benchmarks/generate.py [--threads 1] [--rounds 3] [--only 14m,162m,batch,spec] [--no-compile]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

PROMPT = 16


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


def bandwidth_gbs(gib: float = 1.0) -> float:
    """Read bandwidth: best of 10 sums over a tensor far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


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


def rounds(variants: dict, n_rounds: int) -> dict:
    """variants: name -> fn() returning (seconds, tokens, extra); interleaved; median seconds."""
    times = {k: [] for k in variants}
    outs, extras = {}, {k: [] for k in variants}
    for _ in range(n_rounds):
        for name, fn in variants.items():
            sec, tokens, extra = fn()
            times[name].append(sec)
            outs[name] = tokens
            extras[name].append(extra)
    # per-round stats: numbers are medians over rounds, like the times
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
def case_14m(args):
    hf, ours = llama(384, 6, 6, 1536, 65)
    n = 200
    ids = torch.randint(0, 65, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    variants = {
        "transformers generate": lambda: (*timed(lambda: hf_generate(hf, ids, n)), None),
        "neoformer (eager)": lambda: _ours(ours, ids, n),
    }
    if args.compile:
        add_compiled(variants, ours, ids, n, "14M")
    med, outs, _ = rounds(variants, args.rounds)
    base = med["transformers generate"]
    print(f"### 14M model, batch 1, {n} new tokens (identical tokens: {same(outs)})\n")
    table(["variant", "tokens/s", "vs transformers"], [[k, n / v, base / v] for k, v in med.items()])


def add_compiled(variants, model, ids, n, label):
    """Compile once (timed and reported), then add the compiled engine as a variant."""
    t, _ = timed(lambda: ours_generate(model, ids, n, compile=True))
    print(f"{label}: compiling the decode step took {t:.1f} s (once per model and batch size)")
    variants["neoformer (compile=True)"] = lambda: _ours(model, ids, n, compile=True)


def _ours(model, ids, n, **kw):
    sec, out = timed(lambda: ours_generate(model, ids, n, **kw))
    return sec, out.sequences, out.stats


def case_162m(args, models):
    hf, ours = models
    n = 64
    ids = torch.randint(0, 32000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    bw = bandwidth_gbs()
    weight_bytes = sum(p.numel() * p.element_size() for name, p in ours.named_parameters()
                       if not name.startswith("embed."))  # the embedding table is read one row per token
    floor_ms = weight_bytes / bw / 1e6
    variants = {
        "transformers generate": lambda: (*timed(lambda: hf_generate(hf, ids, n)), None),
        "transformers, 1 token": lambda: (*timed(lambda: hf_generate(hf, ids, 1)), None),
        "neoformer (eager)": lambda: _ours(ours, ids, n),
    }
    if args.compile:
        add_compiled(variants, ours, ids, n, "162M")
    med, outs, extras = rounds(variants, args.rounds)
    hf_one = med.pop("transformers, 1 token")
    outs.pop("transformers, 1 token")
    print(f"### 162M model, batch 1, {n} new tokens (identical tokens: {same(outs)})\n")
    print(f"weights read per token {weight_bytes / 1e6:.0f} MB, measured read bandwidth {bw:.1f} GB/s "
          f"-> floor {floor_ms:.2f} ms/token\n")
    rows = []
    for name, sec in med.items():
        if extras[name] is None:
            decode_ms = (sec - hf_one) / (n - 1) * 1e3
        else:
            decode_ms = extras[name]["decode_s"] / (n - 1) * 1e3
        rows.append([name, n / sec, decode_ms, floor_ms / decode_ms, med["transformers generate"] / sec])
    table(["variant", "tokens/s", "decode ms/token", "fraction of floor", "vs transformers"], rows)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per speculative round")
    parser.add_argument("--only", default="14m,162m,batch,spec")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    import transformers

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s); "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    if "14m" in only:
        case_14m(args)
    if only & {"162m", "batch", "spec"}:
        models = llama(768, 12, 12, 3072, 32000)
        if "162m" in only:
            case_162m(args, models)
        if "batch" in only:
            case_batch(args, models)
        if "spec" in only:
            case_spec(args, models)


if __name__ == "__main__":
    main()
