"""Peak memory and tokens/s of a preset's training step, each variant in its own child process.

Every variant runs ``fit()`` for ``--steps`` optimizer steps on random tokens (after one warm-up
step) and reports the child's peak resident memory (ru_maxrss), the planner's prediction
(neoformer/train/memory.py) and tokens/s of the timed steps. ``--tree DIR`` runs the same variant
on another checkout too (e.g. the main branch before a change), interleaved round by round::

    python benchmarks/train_memory.py --preset lumi-tiny --batch 16 --seq 1024 --steps 2 \\
        --variants bf16,bf16+ckpt,fp32 [--tree /path/to/other/checkout] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from neoformer.model import build_model
from neoformer.train import TrainConfig, fit
from neoformer.train.objectives import objective_for
torch.manual_seed(0)
model = build_model(args["preset"])
objective = objective_for(model)
B, T, V = args["batch"], args["seq"], model.config.vocab_size
predicted = None
try:
    from neoformer.train.memory import predict_training_memory
    amp = torch.bfloat16 if args["precision"] == "bf16" else None
    predicted = predict_training_memory(model, objective, B, T, amp_dtype=amp, gradient_checkpointing=args["ckpt"]).total
except ImportError:  # a checkout without the planner's training half
    pass
def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, V, (B, T + 1), generator=g)
        yield ids[:, :-1], ids[:, 1:]
data = batches()
def run(steps):
    cfg = TrainConfig(max_steps=steps, batch_size=B, seq_len=T, precision=args["precision"], progress=False, plot=False,
                      eval_every=0, save_every=0, log_every=10**9, gradient_checkpointing=args["ckpt"],
                      threads=args["threads"], warmup_steps=0)
    start = time.perf_counter()
    fit(model, objective, data, cfg, log=lambda *a: None)
    return time.perf_counter() - start
run(1)  # warm-up
seconds = run(args["steps"])
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "predicted": predicted,
                  "tok_s": args["steps"] * B * T / seconds, "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}))
"""


def run_child(tree: Path, variant: str, args) -> dict:
    precision, _, extra = variant.partition("+")
    payload = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
               "threads": args.threads, "precision": precision, "ckpt": extra == "ckpt"}
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    # cwd = the tree: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], env=env, capture_output=True, text=True,
                         cwd=tree)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lumi-tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="bf16,bf16+ckpt", help="comma list of fp32|bf16[+ckpt]")
    parser.add_argument("--tree", type=Path, help="another checkout to run the same variants on (e.g. main)")
    args = parser.parse_args()
    trees = {"this": ROOT} | ({"other": args.tree.resolve()} if args.tree else {})
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for variant in args.variants.split(","):
            for name, tree in trees.items():
                result = run_child(tree, variant, args)
                print(f"{name} {variant}: {json.dumps(result)}", flush=True)  # slow runs: keep what finished
                results.setdefault((name, variant), []).append(result)
    print(f"{args.preset}, batch {args.batch} x {args.seq}, {args.steps} timed steps, {args.threads} threads, "
          f"{args.rounds} round(s); load {os.getloadavg()[0]:.1f}")
    print("| tree | variant | peak RSS GiB | predicted GiB | tokens/s (median, min-max) |")
    print("|---|---|---:|---:|---:|")
    for (name, variant), runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(f"| {name} | {variant} | error: {runs[0]['error']} | | |")
            continue
        rates = [r["tok_s"] for r in ok]
        peak = max(r["peak_rss"] for r in ok) / 2 ** 30
        pred = f"{ok[0]['predicted'] / 2 ** 30:.2f}" if ok[0]["predicted"] else "-"
        print(f"| {name} | {variant} | {peak:.2f} | {pred} | {statistics.median(rates):,.0f} "
              f"({min(rates):,.0f}-{max(rates):,.0f}) |")


if __name__ == "__main__":
    main()
