"""`neoformer serve` under load vs one-at-a-time generation, on a trained teacher (benchmarks/teacher.py).

    PYTHONPATH=. python benchmarks/serve.py [--teacher small|base|large]

Starts `neoformer serve` (one torch thread, --max-batch 16) in a subprocess and sends the same
set of streamed completion requests (greedy, ignore_eos, fixed max_tokens) at concurrency 1, 4,
8 and 16, measured as `vllm bench serve` does: requests/s, output tokens/s (from the usage
chunk), TTFT, TPOT and inter-token latency (gaps between streamed chunks, p50/p99). The baseline
runs the same prompts one by one through `neoformer.generate` in this process (also one thread).
Rounds interleave the server and the baseline; ratios are quoted with their spread (min-max over
rounds), against `generate` and against the server's own concurrency-1 figure.

    --teacher SIZE     small (3.9M), base (15.7M, the ~15M row) or large (143.7M, the ~160M row)
    --server-tree DIR  run the server from another source tree (a before/after comparison)
    --engine           the scheduler alone, in-process (the price of batch invariance)
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, port: int, max_batch: int, extra: list[str], tree: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree or REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "neoformer.cli", "serve", ckpt, "--port", str(port), "--threads",
                             "1", "--max-batch", str(max_batch), "--log-level", "warning", *extra], env=env)
    for _ in range(3000):  # start-up imports are slow on a busy machine
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def one_request(port: int, prompt: list[int], max_tokens: int) -> dict:
    """A streamed completion, measured as `vllm bench serve` does: TTFT (first chunk with text), the
    gaps between chunks (ITL; a chunk may carry several tokens when the stream fell behind) and the
    output tokens from the usage chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    stamps, tokens = [], 0
    for line in r:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    conn.close()
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens,
            "tpot": (stamps[-1] - stamps[0]) / max(tokens - 1, 1)}


def run_load(port: int, prompts, max_tokens: int, concurrency: int) -> dict:
    results, lock, queue = [], threading.Lock(), list(prompts)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                prompt = queue.pop()
            out = one_request(port, prompt, max_tokens)
            with lock:
                results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    itl = sorted(x for r in results for x in r["itl"])
    ttft = sorted(r["ttft"] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3  # noqa: E731
    return {"req_s": len(results) / elapsed, "tok_s": sum(r["tokens"] for r in results) / elapsed,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99),
            "tpot": statistics.median(r["tpot"] for r in results) * 1e3}


def sequential_generate(model, prompts, max_tokens: int) -> float:
    from neoformer.generate import generate

    t0 = time.perf_counter()
    n = 0
    for prompt in prompts:
        n += len(generate(model, prompt, max_tokens, eos_token_id=[], return_dict=True).new_tokens[0])
    return n / (time.perf_counter() - t0)


def engine_rate(sched, prompts, max_tokens: int) -> float:
    """The scheduler alone (no HTTP), every prompt submitted at once: output tokens/s."""
    import torch

    from neoformer.serve import Sampling, Sequence

    outs = [[] for _ in prompts]
    for prompt, out in zip(prompts, outs):
        sched.submit(Sequence(prompt, Sampling(max_tokens=max_tokens, ignore_eos=True), out.append))
    t0 = time.perf_counter()
    with torch.inference_mode():
        while not all(out and out[-1].finish for out in outs):
            sched.step()
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


def engine_table(model, tok, prompts, max_tokens: int, rounds: int) -> None:
    """Batch invariance's and torch.compile's effect: one request and 16 at once, vs generate."""
    from neoformer.serve import Scheduler

    variants = {"invariant": {}, "busy rows": {"batch_invariant": False}, "invariant+compile": {"compile": True}}
    scheds = {name: Scheduler(model, tok, max_batch=16, max_queue=len(prompts), **kw) for name, kw in variants.items()}
    t0 = time.perf_counter()
    for sched in scheds.values():  # warm-up: with --compile, one graph per attention window
        engine_rate(sched, prompts[:16], min(max_tokens, 200))
    print(f"warm-up (compiles included): {time.perf_counter() - t0:.0f} s")
    rows = []
    for _ in range(rounds):
        rows.append([sequential_generate(model, prompts[:4], max_tokens)] +
                    [engine_rate(sched, prompts[:k], max_tokens) for k in (1, 16) for sched in scheds.values()])
    med = [statistics.median(col) for col in zip(*rows)]
    print(f"engine only (no HTTP), output tok/s, median of {rounds} rounds: generate {med[0]:.0f}")
    for i, (k, name) in enumerate((k, name) for k in (1, 16) for name in scheds):
        print(f"  {k:2d} request(s), {name:18s} {med[i + 1]:7.0f}  ({med[i + 1] / med[0]:.2f}x generate; rounds "
              f"{', '.join(f'{r[i + 1]:.0f}' for r in rows)})")


def report(rows: dict[int, list[dict]], baseline: list[float]) -> None:
    """The vllm-bench-serve style table: medians over rounds, ratios with their min-max."""
    levels = list(rows)
    single = {k: statistics.median(r[k] for r in rows[levels[0]]) for k in rows[levels[0]][0]}
    base = statistics.median(baseline)
    print(f"sequential neoformer.generate: {base:.1f} tok/s (rounds: {', '.join(f'{b:.1f}' for b in baseline)})")
    print(f"| concurrency | req/s | out tok/s | vs generate (min-max) | vs concurrency {levels[0]} | TTFT p50/p99 ms | "
          "TPOT ms | ITL p50/p99 ms | p99 ITL / single p99 | p99 ITL / single p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        med = {k: statistics.median(r[k] for r in rows[c]) for k in rows[c][0]}
        ratios = [r["tok_s"] / b for r, b in zip(rows[c], baseline)]
        print(f"| {c} | {med['req_s']:.2f} | {med['tok_s']:.1f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {med['tok_s'] / single['tok_s']:.2f}x | "
              f"{med['ttft_p50']:.0f}/{med['ttft_p99']:.0f} | {med['tpot']:.1f} | "
              f"{med['itl_p50']:.1f}/{med['itl_p99']:.1f} | {med['itl_p99'] / single['itl_p99']:.2f}x | "
              f"{med['itl_p99'] / single['itl_p50']:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the trained teacher named by --teacher")
    parser.add_argument("--teacher", default="small", help="small | base | large (benchmarks/teacher.py)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--no-batch-invariant", action="store_true", help="pass --no-batch-invariant to the server")
    parser.add_argument("--compile", action="store_true", help="pass --compile to the server")
    parser.add_argument("--prefill-chunk", type=int, help="pass --prefill-chunk N to the server")
    parser.add_argument("--server-tree", help="run the server from this source tree (e.g. an older version)")
    parser.add_argument("--engine", action="store_true", help="only the scheduler in-process, no HTTP")
    args = parser.parse_args()

    import random

    import torch

    from neoformer.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    ckpt = args.checkpoint
    if ckpt is None:
        from teacher import teacher_checkpoint

        ckpt = str(teacher_checkpoint(args.teacher))
    model, tok, _ = load_checkpoint(ckpt)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    rng = random.Random(0)
    words = "the of and to in is that for it as with was on be by this are from or at".split()
    prompts = [tok.encode(" ".join(rng.choice(words) for _ in range(rng.randrange(4, 40))))
               for _ in range(args.requests)]
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.engine:
        engine_table(model, tok, prompts, args.max_tokens, args.rounds)
        return 0
    flags = ["--no-batch-invariant"] * args.no_batch_invariant + ["--compile"] * args.compile
    flags += ["--prefill-chunk", str(args.prefill_chunk)] if args.prefill_chunk else []
    print(f"checkpoint {ckpt}; {args.requests} requests x {args.max_tokens} tokens; server flags {flags}; "
          f"server tree {args.server_tree or REPO}; load {os.getloadavg()[0]:.2f}")
    port = free_port()
    server = start_server(ckpt, port, max(levels), flags, args.server_tree)
    rows: dict[int, list[dict]] = {c: [] for c in levels}
    baseline = []
    try:
        # warm-up: the full load once, so with --compile every attention window's graph is built first
        run_load(port, prompts, args.max_tokens, max(levels))
        for _ in range(args.rounds):
            baseline.append(sequential_generate(model, prompts, args.max_tokens))
            for c in levels:
                rows[c].append(run_load(port, prompts, args.max_tokens, c))
    finally:
        server.terminate()
        server.wait(30)
    report(rows, baseline)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
