"""lm-eval through neoformer's LM adapter vs lm-eval's own HF backend (HFLM) on the HF export of the
same trained model: same numbers, and how much faster on CPU.

    PYTHONPATH=$PWD python benchmarks/eval_harness.py

The model is the cached trained teacher (benchmarks/teacher.py). The tasks are local, offline,
and shaped like the ones people run: ``stdlib_mc`` is HellaSwag-shaped (a ~100-token context of
Python standard-library source, four endings of ~24 tokens, one of them the true continuation),
``stdlib_ppl`` is wikitext-shaped (rolling log-likelihood of whole files: word/byte perplexity) and
``stdlib_gen`` is generate_until (greedy, stop at a newline) and ``stdlib_gen_fewshot`` the same
prompts after a fixed two-example preamble (~220 characters, as tasks with fixed exemplars have). Each round runs both backends on
every task, interleaved; the script prints per-task accuracies, the largest per-request
log-likelihood difference and the speed ratio with its spread over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def build_tasks(folder: Path, tokenizer, n_mc: int, n_ppl: int, n_gen: int) -> None:
    from neoformer.data.sources import load_documents

    docs = [d for d in load_documents("stdlib", "val").documents if len(d) > 3000]
    rng = random.Random(0)
    mc, gen = [], []
    while len(mc) < n_mc:
        doc = rng.choice(docs)
        ids = tokenizer.encode(doc)
        start = rng.randrange(0, len(ids) - 200)
        context = tokenizer.decode(ids[start:start + 100])
        true_end = tokenizer.decode(ids[start + 100:start + 124])
        others = []
        while len(others) < 3:
            other = tokenizer.encode(rng.choice(docs))
            s = rng.randrange(0, len(other) - 30)
            others.append(tokenizer.decode(other[s:s + 24]))
        answer = rng.randrange(4)
        endings = others[:answer] + [true_end] + others[answer:]
        mc.append({"context": context, "endings": endings, "label": answer})
    for doc in docs[:n_gen]:  # up to three function headers per document
        cuts = [c for c in range(len(doc)) if doc.startswith("\ndef ", c) and c > 200][:3]
        gen += [{"context": doc[c - 300:c + 5], "target": doc[c + 5:].split("\n")[0]} for c in cuts if c >= 300]
    # a fixed few-shot preamble (as tasks with fixed exemplars have: MMLU's first_n dev examples, BBH, gsm8k-cot)
    # (short: the teacher's context is 256 tokens, and a prompt is left-truncated to 256 - max_gen_toks)
    shots = [d[d.find("\ndef ") + 1:][:110] + "\n" for d in reversed(docs) if "\ndef " in d][:2]
    ppl = [{"text": d[:6000]} for d in docs[:n_ppl]]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "stdlib_mc.yaml").write_text(
        f"task: stdlib_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{endings}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "stdlib_ppl.yaml").write_text(
        f"task: stdlib_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (folder / "stdlib_gen.yaml").write_text(
        f"task: stdlib_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    gen_yaml = (folder / "stdlib_gen.yaml").read_text().replace("task: stdlib_gen", "task: stdlib_gen_fewshot")
    (folder / "stdlib_gen_fewshot.yaml").write_text(gen_yaml + f"description: {json.dumps(''.join(shots))}\n")


def export_hf(model, tokenizer, ckpt: Path, out: Path) -> Path:
    from neoformer.hf import to_hf

    export = to_hf(model, out, tokenizer_dir=ckpt / "tokenizer" / "tokenizer.json")
    # to_hf names no special tokens; name EOS so HFLM's prefix token and stop match ours
    eos = tokenizer._tok.id_to_token(tokenizer.eos_id)
    (export / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos}))
    cfg = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**cfg, "eos_token_id": tokenizer.eos_id}))
    return export


def timed(lm) -> dict[str, float]:
    """Wrap the three request methods of ``lm`` to add up the time spent in the model backend
    (what differs between backends; lm-eval's own task building and metrics are the same for both)."""
    spent = {"model": 0.0, "cpu": 0.0}
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)

        def wrapper(*a, _method=method, **k):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return _method(*a, **k)
            finally:
                spent["model"] += time.perf_counter() - t0
                spent["cpu"] += time.thread_time() - c0
        setattr(lm, name, wrapper)
    return spent


def run_backend(lm, tasks, manager, spent) -> tuple[dict, float, dict]:
    from lm_eval import simple_evaluate

    spent["model"] = spent["cpu"] = 0.0
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)
    seconds = (spent["model"], spent["cpu"])
    metrics = {t: {k: v for k, v in m.items() if isinstance(v, float) and "stderr" not in k}
               for t, m in out["results"].items()}
    logliks = {t: [r["resps"] for r in s] for t, s in out["samples"].items()}
    return metrics, seconds, logliks


def max_loglik_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for task in a:
        for ra, rb in zip(a[task], b[task]):
            for xa, xb in zip(ra, rb):
                va, vb = xa[0], xb[0]
                if isinstance(va, (list, tuple)):
                    va, vb = va[0], vb[0]
                if isinstance(va, float):
                    worst = max(worst, abs(va - vb))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mc", type=int, default=100, help="multiple-choice items")
    parser.add_argument("--gen-docs", type=int, default=60, help="documents searched for generation prompts")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from neoformer.checkpoint import load_checkpoint, resolve_checkpoint
    from neoformer.eval.harness import NeoformerLM, task_manager
    from teacher import teacher_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(teacher_checkpoint("small"))
    model, tokenizer, _ = load_checkpoint(ckpt, device="cpu", dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    (tmp / "tasks").mkdir()
    build_tasks(tmp / "tasks", tokenizer, args.mc, 6, args.gen_docs)
    export = export_hf(model, tokenizer, ckpt, tmp / "hf")
    tasks = ["stdlib_mc", "stdlib_ppl", "stdlib_gen", "stdlib_gen_fewshot"]
    manager = task_manager(tasks, tmp / "tasks")
    ours = NeoformerLM(model, tokenizer, batch_size=args.batch)
    hf = HFLM(pretrained=str(export), backend="causal", batch_size=args.batch, device="cpu", dtype="float32",
              max_length=model.config.max_seq_len, add_bos_token=False)
    spent = {"ours": timed(ours), "hf": timed(hf)}
    print(f"load {os.getloadavg()[0]:.2f}; teacher {ckpt}; {args.threads} thread(s), batch {args.batch}")
    times: dict[str, dict[str, list[float]]] = {"ours": {}, "hf": {}}
    results = {}
    for r in range(args.rounds):
        for task in tasks:  # both backends back to back on each task (the load moves within minutes)
            for name, lm in (("hf", hf), ("ours", ours)) if r % 2 else (("ours", ours), ("hf", hf)):
                metrics, seconds, logliks = run_backend(lm, [task], manager, spent[name])
                times[name].setdefault(task, []).append(seconds)
                results[(name, task)] = (metrics[task], logliks)
        print(f"round {r + 1}: " + ", ".join(f"{t} ours {times['ours'][t][-1][0]:.1f}s hf {times['hf'][t][-1][0]:.1f}s"
                                            for t in tasks), flush=True)
    print("\nseconds inside the backend's request methods (lm-eval's task setup excluded): wall clock, and the")
    print("calling thread's CPU time (with one torch thread, the model's work without the waits of a busy machine)")
    print("\n| task | metric | neoformer | HFLM | max |Δ loglik| | speed-up wall (median, min-max) | speed-up CPU |")
    print("|---|---|---|---|---|---|---|")
    for task in tasks:
        (m_ours, l_ours), (m_hf, l_hf) = results[("ours", task)], results[("hf", task)]
        diff = max_loglik_diff(l_ours, l_hf)
        speeds = []
        for kind in (0, 1):
            ratios = [h[kind] / o[kind] for h, o in zip(times["hf"][task], times["ours"][task])]
            speeds.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        for i, metric in enumerate(sorted(m_ours)):
            first = i == 0
            print(f"| {task} | {metric} | {m_ours[metric]:.4f} | {m_hf.get(metric, float('nan')):.4f} | "
                  f"{diff if first else '':{'.2e' if first else ''}} | {speeds[0] if first else ''} | "
                  f"{speeds[1] if first else ''} |")
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
