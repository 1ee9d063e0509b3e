"""Fine-tuning benchmark: teach the trained small teacher a verifiable skill with chat data.

The skill: ``reverse: file list name`` -> ``name list file`` (three of 30 words, each one BPE token),
in the default ChatML template, loss on the assistant reply only. 1,000 training conversations,
100 held-out test prompts (no word triple shared with training). Accuracy is an exact match of the
greedy reply (up to ``<|im_end|>``), through ``neoformer.generate`` on the checkpoint each run
writes, loaded with ``load_checkpoint`` (an adapter checkpoint loads its base and folds itself in).

Compared: the base (before), LoRA (r=16 on q,k,v,o,gate,up,down), full fine-tuning, and QLoRA (NF4
base) when ``neoformer.quantize`` exists. Each run is a separate process (its peak memory is its
own: VmHWM minus the RSS after loading the base, i.e. gradients + optimizer state + activations +
any quantization copies); step time is the median over its steps. Rounds interleave the methods.

    python benchmarks/finetune.py [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

WORDS = ("file list name value string data object function class module return type error path line time "
         "number default method result format index key item text code test user system mode").split()
METHODS = {  # name -> finetune() settings
    "lora": dict(lora=dict(r=16, alpha=32, dropout=0.0), lr=3e-3),
    "full": dict(lora=None, lr=1e-3),
    "qlora": dict(lora=dict(r=16, alpha=32, dropout=0.0), lr=3e-3, qlora="nf4"),
}


def make_data(folder: Path, n_train: int = 1000, n_test: int = 100, seed: int = 0) -> tuple[Path, list]:
    rng = random.Random(seed)
    triples = set()
    while len(triples) < n_train + n_test:
        triples.add(tuple(rng.sample(WORDS, 3)))
    triples = sorted(triples)
    rng.shuffle(triples)

    def conversation(triple):
        return [{"role": "user", "content": "reverse: " + " ".join(triple)},
                {"role": "assistant", "content": " ".join(reversed(triple))}]

    train = folder / "reverse.jsonl"
    train.write_text("".join(json.dumps({"messages": conversation(t)}) + "\n" for t in triples[:n_train]))
    return train, [conversation(t) for t in triples[n_train:]]


def accuracy(checkpoint, tests) -> float:
    import torch

    from neoformer.chat import chat_template_of
    from neoformer.checkpoint import load_checkpoint
    from neoformer.generate import generate

    model, tokenizer, config = load_checkpoint(checkpoint)
    template = chat_template_of(config)
    prompts = [tokenizer.encode(template.render(c[:1], add_generation_prompt=True)) for c in tests]
    with torch.inference_mode():
        out = generate(model, prompts, max_new_tokens=12, tokenizer=tokenizer, stop=template.stop, return_dict=True)
    right = sum(text.strip() == c[1]["content"] for text, c in zip(out.texts, tests))
    return right / len(tests)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(method: str, base: str, data: str, out: str, steps: int) -> dict:
    """One training run in this process; prints its figures as JSON."""
    import torch

    from neoformer.finetune import LoraConfig, finetune
    from neoformer.train.run_config import TrainConfig

    torch.set_num_threads(1)  # stable timings on a shared 2-core machine
    settings = METHODS[method]
    lora = LoraConfig(**settings["lora"]) if settings["lora"] else None
    train = TrainConfig(max_steps=steps, lr=settings["lr"], batch_size=8, warmup_steps=10, weight_decay=0.0,
                        eval_every=0, save_every=0, log_every=1, progress=False, plot=False, threads=1)
    times, messages, marks = [], [], {}

    def on_event(event, info):
        if event == "step":
            now = time.perf_counter()
            if "last" in marks:
                times.append(now - marks["last"])
            marks["last"] = now

    def log(message):
        messages.append(message)
        if "trainable" in message:  # logged after the base is loaded and prepared, before training
            marks["rss_ready"] = _rss_kib("VmRSS")

    result = finetune(base, data, out, lora=lora, train=train, seq_len=64, qlora=settings.get("qlora"),
                      val_fraction=0.0, log=log, callbacks=[on_event])
    share = next(m for m in messages if "trainable" in m)
    return {"method": method, "checkpoint": str(result.checkpoint), "loss": result.train_loss,
            "step_ms": 1000 * statistics.median(times[2:]), "peak_train_mib": (_rss_kib("VmHWM") - marks["rss_ready"]) / 1024,
            "trainable": share.split(": ", 1)[1]}


def state_bytes(model) -> int:
    """Exact bytes of the tensors a model stores (weights, quantized codes, scales; a tied head once)."""
    seen = {}
    for t in model.state_dict().values():
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def base_weight_bytes(base: str, scheme: str = "nf4") -> dict:
    """Bytes of the base in fp32 and as QLoRA holds it: the default (head quantized too) and with
    ``--qlora-float-head``; plus what the embedding would weigh at the head's bytes per weight."""
    from neoformer.checkpoint import load_checkpoint
    from neoformer.finetune.qlora import SKIP_EMBEDDING, SKIP_HEAD_AND_EMBEDDING, quantize_base

    def fresh():
        return load_checkpoint(base, device="cpu", dtype=None)[0].float()

    fp32_model = fresh()
    fp32 = state_bytes(fp32_model)
    embedding = fp32_model.embed.tokens.weight
    tied = fp32_model.lm_head.weight is embedding
    quantized = quantize_base(fresh(), scheme, skip=SKIP_EMBEDDING)
    head_bytes = sum(t.numel() * t.element_size() for t in quantized.lm_head.state_dict().values())
    per_weight = head_bytes / (quantized.lm_head.in_features * quantized.lm_head.out_features)
    q_default = state_bytes(quantized)
    return {"fp32": fp32, "qlora": q_default, "qlora_float_head": state_bytes(quantize_base(fresh(), scheme,
                                                                                          skip=SKIP_HEAD_AND_EMBEDDING)),
            "embedding_fp32": embedding.numel() * 4, "tied": tied,
            # not measured: the embedding at the head's nf4 bytes per weight (no embedding quantizer here)
            "qlora_embedding_projected": q_default - embedding.numel() * 4 + round(embedding.numel() * per_weight)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    parser.add_argument("--write-data", metavar="DIR", help="only write the training file (DIR/reverse.jsonl) and "
                        "the held-out test conversations (DIR/reverse-test.jsonl), then exit")
    parser.add_argument("--worker", nargs=5, metavar=("METHOD", "BASE", "DATA", "OUT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, base, data, out, steps = args.worker
        print(json.dumps(worker(method, base, data, out, int(steps))))
        return 0
    if args.write_data:
        folder = Path(args.write_data)
        folder.mkdir(parents=True, exist_ok=True)
        train, tests = make_data(folder)
        (folder / "reverse-test.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in tests))
        print(f"wrote {train} and {folder / 'reverse-test.jsonl'}")
        return 0
    from teacher import teacher_checkpoint

    import importlib.util

    methods = [m for m in args.methods.split(",") if m != "qlora" or importlib.util.find_spec("neoformer.quantize")]
    base = str(teacher_checkpoint("small"))
    if "qlora" in methods:
        b = base_weight_bytes(base)
        print(f"QLoRA base bytes (state dict, exact), fp32 {b['fp32']:,} B -> nf4 group 64: head quantized (default) "
              f"{b['qlora']:,} B ({b['qlora'] / b['fp32']:.3f}x); --qlora-float-head {b['qlora_float_head']:,} B "
              f"({b['qlora_float_head'] / b['fp32']:.3f}x); the fp32 embedding is {b['embedding_fp32']:,} B of it"
              f"{' (tied to the head)' if b['tied'] else ''}; projected with an nf4 embedding (not in this "
              f"branch): {b['qlora_embedding_projected']:,} B ({b['qlora_embedding_projected'] / b['fp32']:.3f}x)")
    print(f"load: {os.getloadavg()[0]:.2f} | teacher {base} | methods {', '.join(methods)} | {args.steps} steps")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        data, tests = make_data(Path(tmp))
        before = accuracy(base, tests)
        print(f"base accuracy: {before:.0%}")
        for round_ in range(args.rounds):
            for method in methods:
                out = Path(tmp) / f"{method}-{round_}"
                cmd = [sys.executable, __file__, "--worker", method, base, str(data), str(out), str(args.steps)]
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                line = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip()
                figures = json.loads(line.splitlines()[-1])
                figures["accuracy"] = accuracy(figures["checkpoint"], tests)
                figures["load"] = os.getloadavg()[0]
                results[method].append(figures)
                print(f"round {round_ + 1} {method:5} | acc {figures['accuracy']:.0%} | loss {figures['loss']:.3f} | "
                      f"{figures['step_ms']:.0f} ms/step | peak +{figures['peak_train_mib']:.0f} MiB | "
                      f"{figures['trainable']} | load {figures['load']:.1f}")
    print("\n| method | accuracy (rounds) | gain vs full | trainable | ms/step (median, spread) | peak train MiB |")
    print("|---|---|---|---|---|---|")
    full_gain = statistics.mean(r["accuracy"] for r in results["full"]) - before if results.get("full") else 0
    for method, runs in results.items():
        acc = [r["accuracy"] for r in runs]
        step = [r["step_ms"] for r in runs]
        gain = (statistics.mean(acc) - before) / full_gain if full_gain > 0 else float("nan")
        print(f"| {method} | {', '.join(f'{a:.0%}' for a in acc)} | {gain:.0%} | {runs[0]['trainable']} | "
              f"{statistics.median(step):.0f} ({min(step):.0f}-{max(step):.0f}) | "
              f"{statistics.median(r['peak_train_mib'] for r in runs):.0f} |")
    print(f"| base (before) | {before:.0%} | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
