"""`neoformer serve` under load vs one-at-a-time generation, on the trained small teacher.

    PYTHONPATH=. NEOFORMER_TEACHER_CACHE=/work/main/.cache/teachers python benchmarks/serve.py

Starts `neoformer serve` (one torch thread, --max-batch 16) in a subprocess and sends the same
set of streamed completion requests (greedy, ignore_eos, fixed max_tokens) at concurrency 1, 4,
8 and 16, like `vllm bench serve`: requests/s, output tokens/s, TTFT and inter-token latency
(p50/p99). The baseline runs the same prompts one by one through `neoformer.generate` in this
process (also one thread). Rounds interleave the server and the baseline; ratios are quoted with
their spread (min-max over rounds).
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


def start_server(ckpt: str, port: int, max_batch: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "neoformer.cli", "serve", ckpt, "--port", str(port), "--threads",
                             "1", "--max-batch", str(max_batch), "--log-level", "warning", *extra], env=env)
    for _ in range(600):
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
    """A streamed completion -> TTFT, the gaps between tokens, output tokens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}  # logprobs: one chunk per token, so every token's arrival is seen
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    stamps = []
    for line in r:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            chunk = json.loads(line[6:])
            n = len(chunk["choices"][0]["logprobs"]["tokens"]) if chunk.get("choices") else 0
            stamps += [time.perf_counter()] * n
    conn.close()
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "end": stamps[-1]}


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
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)}


def sequential_generate(model, prompts, max_tokens: int) -> float:
    from neoformer.generate import generate

    t0 = time.perf_counter()
    n = 0
    for prompt in prompts:
        n += len(generate(model, prompt, max_tokens, eos_token_id=[], return_dict=True).new_tokens[0])
    return n / (time.perf_counter() - t0)


def engine_rate(model, tok, prompts, max_tokens: int, batch_invariant: bool) -> float:
    """The scheduler alone (no HTTP), every prompt submitted at once, 16 rows: output tokens/s."""
    import torch

    from neoformer.serve import Sampling, Scheduler, Sequence

    sched = Scheduler(model, tok, max_batch=16, max_queue=len(prompts), batch_invariant=batch_invariant)
    outs = [[] for _ in prompts]
    for prompt, out in zip(prompts, outs):
        sched.submit(Sequence(prompt, Sampling(max_tokens=max_tokens, ignore_eos=True), out.append))
    t0 = time.perf_counter()
    with torch.inference_mode():
        while not all(out and out[-1].finish for out in outs):
            sched.step()
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


def engine_table(model, tok, prompts, max_tokens: int, rounds: int) -> None:
    """Batch invariance's price: one request and 16 at once, invariant decode on and off, vs generate."""
    rows = []
    for _ in range(rounds):
        base = sequential_generate(model, prompts[:4], max_tokens)
        rows.append([base] + [engine_rate(model, tok, prompts[:k], max_tokens, inv) for k in (1, 16)
                              for inv in (True, False)])
    med = [statistics.median(col) for col in zip(*rows)]
    print(f"engine only (no HTTP), tok/s, median of {rounds}: generate {med[0]:.0f} | 1 request: invariant "
          f"{med[1]:.0f} ({med[1] / med[0]:.2f}x), busy rows {med[2]:.0f} ({med[2] / med[0]:.2f}x) | 16 requests: "
          f"invariant {med[3]:.0f} ({med[3] / med[0]:.2f}x), busy rows {med[4]:.0f} ({med[4] / med[0]:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the trained small teacher")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--no-batch-invariant", action="store_true", help="pass --no-batch-invariant to the server")
    parser.add_argument("--engine", action="store_true", help="only the scheduler in-process, no HTTP")
    args = parser.parse_args()

    import random

    import torch

    from neoformer.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    ckpt = args.checkpoint
    if ckpt is None:
        from teacher import teacher_checkpoint

        ckpt = str(teacher_checkpoint("small"))
    model, tok, _ = load_checkpoint(ckpt)
    rng = random.Random(0)
    words = "the of and to in is that for it as with was on be by this are from or at".split()
    prompts = [tok.encode(" ".join(rng.choice(words) for _ in range(rng.randrange(4, 40))))
               for _ in range(args.requests)]
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.engine:
        engine_table(model, tok, prompts, args.max_tokens, args.rounds)
        return 0
    print(f"checkpoint {ckpt}; {args.requests} requests x {args.max_tokens} tokens; "
          f"batch-invariant decode {'off' if args.no_batch_invariant else 'on'}; load {os.getloadavg()[0]:.2f}")
    port = free_port()
    server = start_server(ckpt, port, max(levels), ["--no-batch-invariant"] if args.no_batch_invariant else [])
    rows: dict[int, list[dict]] = {c: [] for c in levels}
    baseline = []
    try:
        one_request(port, prompts[0], 4)  # warm-up
        for _ in range(args.rounds):
            baseline.append(sequential_generate(model, prompts, args.max_tokens))
            for c in levels:
                rows[c].append(run_load(port, prompts, args.max_tokens, c))
    finally:
        server.terminate()
        server.wait(30)
    base = statistics.median(baseline)
    single_itl = statistics.median(r["itl_p50"] for r in rows[levels[0]])
    print(f"sequential neoformer.generate: {base:.1f} tok/s (rounds: {', '.join(f'{b:.1f}' for b in baseline)})")
    print("| concurrency | req/s | out tok/s | vs sequential (min-max) | TTFT p50/p99 ms | ITL p50/p99 ms | "
          "p99 ITL / single p50 |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        med = {k: statistics.median(r[k] for r in rows[c]) for k in rows[c][0]}
        ratios = [r["tok_s"] / b for r, b in zip(rows[c], baseline)]
        print(f"| {c} | {med['req_s']:.2f} | {med['tok_s']:.1f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {med['ttft_p50']:.0f}/{med['ttft_p99']:.0f} | "
              f"{med['itl_p50']:.1f}/{med['itl_p99']:.1f} | {med['itl_p99'] / single_itl:.2f}x |")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
