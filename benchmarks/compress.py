"""Compression on the cached trained teacher: 2x / 4x students (depth, width, both) pruned and
distilled, against same-shape students trained from scratch; importance vs every-k-th layer
selection; head pruning without retraining; 4x vocabulary reduction.

    python benchmarks/compress.py --part all          # or: heads, depth, width, vocab, scratch
    python benchmarks/compress.py --teacher base      # the 15.7M teacher (trains on first use)
    python benchmarks/compress.py --teacher mixed --domain ../shared/data/tinyshakespeare.txt --part vocab \
        --json benchmarks/results/compress_mixed.json    # a Python + English vocabulary reduced to English

Each part prints a table and merges its results into ``--json`` (default
benchmarks/results/compress.json); the parts can run separately to keep each under a few
CPU minutes. Perplexities are per token on the teacher's validation split (8 batches x 16 x 128);
``loss/char`` is nats per character of the same text, comparable across vocabularies.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher import teacher_checkpoint  # noqa: E402

from neoformer.checkpoint import load_checkpoint  # noqa: E402
from neoformer.compress import CompressPlan, Distillation, prune_heads, reduce  # noqa: E402
from neoformer.compress.heads import head_importance  # noqa: E402
from neoformer.compress.logit_cache import cache_for_distillation  # noqa: E402
from neoformer.compress.report import decode_speed, validation_loss  # noqa: E402
from neoformer.model import build_model  # noqa: E402
from neoformer.train import causal_lm, fit  # noqa: E402
from neoformer.train.batches import build_task_data  # noqa: E402
from neoformer.train.run_config import DataConfig, RunConfig, TrainConfig  # noqa: E402

EVAL_BATCHES = 8


class Bench:
    def __init__(self, size: str, steps: int, threads: int, logit_cache: str | None = None, top_k: int = 64,
                 lr: float = 1e-3, domain: str = "stdlib"):
        torch.set_num_threads(threads)
        self.domain = domain  # the data every student is pruned, distilled and scored on
        self.logit_cache, self.top_k, self.lr = logit_cache, top_k, lr
        self.time_budget = None  # seconds per KD run (the cosine follows wall time); None = --steps
        self.teacher, self.tokenizer, _ = load_checkpoint(teacher_checkpoint(size), device="cpu")
        self.steps, self.threads = steps, threads
        self.task = self.data(self.teacher.config, self.tokenizer)
        self.calibration = [(x, y) for (x, y), _ in zip(self.task.train, range(8))]
        self.teacher_eval = self.evaluate(self.teacher, self.tokenizer)

    def train_config(self, steps: int, lr: float) -> TrainConfig:
        return TrainConfig(max_steps=steps, batch_size=16, seq_len=128, lr=lr, min_lr=lr / 10,
                           warmup_steps=min(100, steps // 10), weight_decay=0.1, eval_every=0, save_every=0,
                           progress=False, plot=False, threads=self.threads, seed=0,
                           time_budget=self.time_budget)

    def data(self, model_cfg, tokenizer):
        run = RunConfig(model=model_cfg, train=self.train_config(1, 1e-3), data=DataConfig(source=self.domain))
        return build_task_data(run, tokenizer)

    def evaluate(self, model, tokenizer, task=None) -> dict:
        task = task or self.task
        loss, per_char = validation_loss(model, tokenizer, task.val(), EVAL_BATCHES)
        return {"val_loss": round(loss, 4), "val_ppl": round(math.exp(loss), 3), "loss_per_char": round(per_char, 4),
                "params": model.num_parameters()}

    def prune(self, plan: CompressPlan):
        return reduce(self.teacher, self.tokenizer, plan, self.calibration, self._tokens(plan), log=lambda *_: None)

    def _tokens(self, plan):
        if plan.vocab is None:
            return None
        from neoformer.data import prepare_data

        return [prepare_data(self.domain, tokenizer=self.tokenizer).train.tokens]

    def distill(self, reduced, steps: int | None = None, alpha: float = 0.5) -> tuple[dict, float]:
        """KD through fit(); with --logit-cache the teacher's top-k logits are read back from disk
        (built on first use: the build time is reported apart from the KD time)."""
        steps = steps or self.steps
        task = self.data(reduced.model.config, reduced.tokenizer)
        kept = None if reduced.vocab is None else reduced.vocab.kept
        objective = Distillation(self.teacher, alpha=alpha, temperature=2.0, teacher_ids=kept)
        extra = {}
        if self.logit_cache:
            folder = Path(self.logit_cache) / ("full" if kept is None else f"vocab-{len(kept)}")
            train = self.train_config(steps, self.lr)
            started = time.perf_counter()
            cache = cache_for_distillation(folder, objective, task.train, train, {"source": "stdlib"}, self.top_k,
                                           log=lambda line: print(line, flush=True))
            objective.cached_logits = cache.lookup
            extra = {"cache_build_seconds": round(time.perf_counter() - started, 1), "top_k": self.top_k}
        started = time.perf_counter()
        result = fit(reduced.model.train(), objective, task.train, self.train_config(steps, self.lr),
                     log=lambda *_: None)
        seconds = time.perf_counter() - started
        return {**self.evaluate(reduced.model, reduced.tokenizer, task), "tokens": result.tokens, "steps": result.step,
                "stop_reason": result.stop_reason, **extra}, seconds

    def scratch(self, model_cfg, steps: int) -> dict:
        torch.manual_seed(0)
        model = build_model(model_cfg)
        task = self.data(model_cfg, self.tokenizer)
        result = fit(model, causal_lm, task.train, self.train_config(steps, 2e-3), log=lambda *_: None)
        return {**self.evaluate(model, self.tokenizer), "tokens": result.tokens, "steps": steps}


def _ratio(bench: Bench, params: int) -> str:
    return f"{bench.teacher_eval['params'] / params:.2f}x"


def part_heads(bench: Bench) -> dict:
    """Perplexity vs query heads kept, no retraining (Michel et al. importance vs keeping the first)."""
    cfg = bench.teacher.config
    scores = head_importance(bench.teacher, bench.calibration)
    rows = []
    for heads, kv in [(cfg.n_heads, cfg.resolved_n_kv_heads), (4, 2), (2, 2), (2, 1), (1, 1)]:
        for by in ("importance", "uniform"):
            student, _ = prune_heads(bench.teacher, CompressPlan(heads=heads, kv_heads=kv, by=by), scores)
            rows.append({"heads": heads, "kv_heads": kv, "by": by, **bench.evaluate(student, bench.tokenizer)})
            print(f"heads {heads} kv {kv} {by:<10} ppl {rows[-1]['val_ppl']:.2f}", flush=True)
    return {"heads_curve": rows}


DEPTH_2X = {"importance": CompressPlan(layers="3"), "every-2nd": CompressPlan(layers="every-2nd")}


def part_depth(bench: Bench) -> dict:
    """Importance (Block Influence, skip-loss) vs every-k-th, before and after KD."""
    rows = []
    for name, plan in [("influence", CompressPlan(layers="3")),
                       ("skip-loss", CompressPlan(layers="3", layer_score="skip-loss")),
                       ("every-2nd", CompressPlan(layers="every-2nd")),
                       ("uniform (0,2/3,5)", CompressPlan(layers="3", by="uniform"))]:
        reduced = bench.prune(plan)
        before = bench.evaluate(reduced.model, reduced.tokenizer)
        after, seconds = bench.distill(reduced) if name in bench.kd_for else ({}, 0.0)
        rows.append({"selection": name, "kept": reduced.choices["layers"]["kept"], "before_kd": before,
                     "after_kd": after, "kd_seconds": round(seconds, 1)})
        print(f"depth {name:<18} kept {rows[-1]['kept']} ppl before {before['val_ppl']:.2f} "
              f"after KD {after.get('val_ppl', float('nan')):.2f} ({_ratio(bench, before['params'])} smaller)",
              flush=True)
    return {"depth": rows}


def part_width(bench: Bench) -> dict:
    """Width (PCA vs channels), and depth + width together (~4x), before and after KD."""
    rows = []
    for name, plan in [("width 0.5 pca", CompressPlan(width=0.5, ffn_dim=256)),
                       ("width 0.5 channels", CompressPlan(width=0.5, ffn_dim=256, width_method="channels")),
                       ("depth 3 + width 0.5 pca", CompressPlan(layers="3", width=0.5, ffn_dim=256)),
                       ("depth 2 + width 0.5 + heads 4", CompressPlan(layers="2", width=0.5, ffn_dim=256,
                                                                        heads=4, kv_heads=2))]:
        reduced = bench.prune(plan)
        before = bench.evaluate(reduced.model, reduced.tokenizer)
        after, seconds = bench.distill(reduced) if name in bench.kd_for else ({}, 0.0)
        rows.append({"student": name, "before_kd": before, "after_kd": after, "kd_seconds": round(seconds, 1),
                     "decode_tok_s": round(decode_speed(reduced.model), 1)})
        print(f"{name:<30} {_ratio(bench, before['params'])} smaller: ppl before {before['val_ppl']:.2f} "
              f"after KD {after.get('val_ppl', float('nan')):.2f}", flush=True)
    return {"width": rows, "teacher_decode_tok_s": round(decode_speed(bench.teacher), 1)}


STUDENTS_2X = {  # ~2x fewer parameters than the small teacher (the embedding and head shrink too; width 0.5: exactly 2.00x)
    "width 0.5 pca": CompressPlan(width=0.5),
    "width 0.5 channels": CompressPlan(width=0.5, width_method="channels"),
    # d_model a multiple of the 6 heads with an even head size (RoPE): 132 = 6 x 22; 1.92x fewer parameters (2,049,828)
    "depth 4 + d 132 + ffn 440 pca": CompressPlan(layers="4", layer_score="skip-loss", d_model=132, ffn_dim=440),
}


STUDENTS_4X = {  # depth and width together
    "depth 3 + d 72 + ffn 256 pca": CompressPlan(layers="3", layer_score="skip-loss", d_model=72, ffn_dim=256),
}


def _distilled(bench: Bench, students: dict, key: str) -> dict:
    """Students pruned, then distilled with a real KD budget (--steps / --time-budget)."""
    rows = []
    for name, plan in students.items():
        if name not in bench.kd_for:
            continue
        reduced = bench.prune(plan)
        before = bench.evaluate(reduced.model, reduced.tokenizer)
        after, seconds = bench.distill(reduced, alpha=bench.alpha)
        rows.append({"student": name, "ratio": round(bench.teacher_eval["params"] / before["params"], 3),
                     "before_kd": before, "after_kd": after, "kd_seconds": round(seconds, 1),
                     "vs_teacher": round(after["val_ppl"] / bench.teacher_eval["val_ppl"], 4),
                     "kd_share_of_teacher_tokens": round(after["tokens"] / TEACHER_TOKENS, 4),
                     "load": round(os.getloadavg()[0], 2)})
        print(f"{name:<30} {rows[-1]['ratio']}x smaller: ppl before {before['val_ppl']:.2f} after "
              f"{after['steps']} KD steps {after['val_ppl']:.2f} = {rows[-1]['vs_teacher']:.3f}x teacher "
              f"({seconds:.0f} s, load {rows[-1]['load']})", flush=True)
        _merge(bench, {key: {**bench.previous.get(key, {}), name: rows[-1]}})
    return {key: {**bench.previous.get(key, {}), **{r["student"]: r for r in rows}}}


def part_two_x(bench: Bench) -> dict:
    """The 2x goal with a real KD budget (--steps; --logit-cache makes the repeated runs cheaper)."""
    return _distilled(bench, STUDENTS_2X, "two_x")


def part_four_x(bench: Bench) -> dict:
    """Depth + width (~4x) with a real KD budget."""
    return _distilled(bench, STUDENTS_4X, "four_x")


def _scratch(bench: Bench, plan: CompressPlan, label: str) -> list[dict]:
    """The plan's student shape from a random init with 1x and 3x the KD token budget (--steps)."""
    config = bench.prune(plan).model.config
    rows = [bench.scratch(config, bench.steps * k) for k in (1, 3)]
    for r in rows:
        print(f"scratch {label} {r['steps']} steps ({r['tokens']:,} tokens): ppl {r['val_ppl']:.2f}", flush=True)
    return rows


def part_scratch(bench: Bench) -> dict:
    """The depth-2x student's shape trained from scratch with 1x and 3x the KD token budget."""
    return {"scratch": _scratch(bench, CompressPlan(layers="3"), "depth-2x shape")}


def part_scratch_4x(bench: Bench) -> dict:
    """The 4x student's shape from scratch with 1x and 3x the KD token budget."""
    return {"scratch_4x": _scratch(bench, next(iter(STUDENTS_4X.values())), "4x shape")}


def _vocab_student(bench: Bench):
    """The 4x vocabulary-reduced student (4096 -> 1024) and its data."""
    reduced = bench.prune(CompressPlan(vocab=bench.teacher.config.vocab_size // 4))
    return reduced, bench.data(reduced.model.config, reduced.tokenizer)


def part_vocab(bench: Bench) -> dict:
    """4x vocabulary reduction (4096 -> 1024) alone: loss per character before and after KD, against
    the teacher's on the same characters (the student's validation batches cover less text)."""
    reduced, task = _vocab_student(bench)
    teacher = teacher_loss_on_student_text(bench, reduced, task)
    before = bench.evaluate(reduced.model, reduced.tokenizer, task)
    after, seconds = bench.distill(reduced, alpha=bench.alpha)
    change = after["loss_per_char"] / teacher - 1
    print(f"vocab {bench.tokenizer.vocab_size} -> {reduced.tokenizer.vocab_size}: loss/char on the same text: "
          f"teacher {teacher:.4f}, before KD {before['loss_per_char']:.4f}, after {after['steps']} KD steps "
          f"{after['loss_per_char']:.4f} ({change:+.2%}; {seconds:.0f} s, load {os.getloadavg()[0]:.2f})", flush=True)
    return {"vocab": {"size": reduced.tokenizer.vocab_size, "teacher_same_text_loss_per_char": round(teacher, 4),
                      "before_kd": before, "after_kd": after, "alpha": bench.alpha,
                      "loss_per_char_change": round(change, 4), "kd_seconds": round(seconds, 1),
                      "kd_share_of_teacher_tokens": round(after["tokens"] / TEACHER_TOKENS, 4),
                      "load": round(os.getloadavg()[0], 2)}}


@torch.no_grad()
def teacher_loss_on_student_text(bench: Bench, reduced, task, model=None) -> float:
    """The teacher's nats per character on exactly the text of the student's validation batches
    (each row re-encoded with the teacher's tokenizer), so the per-character comparison uses the same
    characters: a smaller vocabulary covers less text in the same number of batches."""
    total, chars = 0.0, 0
    for number, (x, y) in enumerate(task.val()):
        if number >= EVAL_BATCHES:
            break
        for row_x, row_y in zip(x, y):
            text = reduced.tokenizer.decode([int(row_x[0])] + row_y.tolist())
            ids = torch.tensor([bench.tokenizer.encode(text)])
            loss, _ = (model or bench.teacher).loss(ids[:, :-1], ids[:, 1:])
            total += float(loss) * (ids.shape[1] - 1)
            chars += len(reduced.tokenizer.decode(row_y.tolist()))
    return total / max(chars, 1)


def part_vocab_control(bench: Bench) -> dict:
    """The control for part_vocab: the teacher itself (full vocabulary) trained with the same KD run
    (--steps, --alpha), scored on the same characters, so the vocabulary's effect is apart from the
    extra training."""
    reduced, task = _vocab_student(bench)
    same = bench.prune(CompressPlan())  # nothing removed: a copy of the teacher
    after, seconds = bench.distill(same, alpha=bench.alpha)
    value = teacher_loss_on_student_text(bench, reduced, task, model=same.model.eval())
    print(f"teacher + {after['steps']} steps (alpha {bench.alpha}): loss/char on the student's validation text "
          f"{value:.4f} ({seconds:.0f} s)", flush=True)
    return {"vocab_control": {"steps": after["steps"], "alpha": bench.alpha, "same_text_loss_per_char": round(value, 4)}}


TEACHER_TOKENS = 1500 * 16 * 128  # the small teacher's training tokens (benchmarks/teacher.py)


def _merge(bench: Bench, update: dict) -> None:
    """Write a finished student at once, so a run stopped by its timeout keeps what it measured."""
    bench.previous.update(update)
    bench.json.write_text(json.dumps(bench.previous, indent=2) + "\n")


PARTS = {"2x": part_two_x, "4x": part_four_x, "heads": part_heads, "depth": part_depth, "width": part_width,
         "scratch": part_scratch, "scratch-4x": part_scratch_4x, "vocab": part_vocab,
         "vocab-control": part_vocab_control}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--teacher", choices=("small", "base", "mixed"), default="small",
                        help="mixed: the small recipe on Python + English (benchmarks/teacher.py), with --domain")
    parser.add_argument("--domain", default="stdlib", help="data source the students are pruned, distilled and "
                        "scored on (e.g. Tiny Shakespeare's file with --teacher mixed: the vocabulary reduced to it)")
    parser.add_argument("--steps", type=int, default=60, help="KD steps per student (16 x 128 tokens each)")
    parser.add_argument("--kd-for", default="influence,every-2nd,width 0.5 pca,depth 3 + width 0.5 pca,"
                        "depth 3 + d 72 + ffn 256 pca",
                        help="comma-separated students that are distilled (the others are measured before KD only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak KD learning rate")
    parser.add_argument("--alpha", type=float, default=0.5, help="KD weight: (1-alpha) CE + alpha T^2 KL")
    parser.add_argument("--logit-cache", metavar="DIR", help="cache the teacher's top-k logits here and distill "
                        "from them (reused by later students and runs)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="wall-clock seconds per KD run (stops before --steps; the cosine follows wall time)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher logits kept per position in the cache")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "compress.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) at start", flush=True)
    bench = Bench(args.teacher, args.steps, args.threads, args.logit_cache, args.top_k, args.lr, args.domain)
    bench.kd_for = set(args.kd_for.split(","))
    bench.time_budget = args.time_budget
    bench.alpha = args.alpha
    print(f"teacher ({args.teacher}): {bench.teacher_eval}", flush=True)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    bench.previous, bench.json = results, path
    path.parent.mkdir(parents=True, exist_ok=True)
    results.update({"teacher": bench.teacher_eval, "kd_steps": args.steps, "teacher_size": args.teacher,
                    "domain": args.domain})
    for name in PARTS if args.part == "all" else [args.part]:
        started = time.perf_counter()
        results.update(PARTS[name](bench))
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        results.setdefault("load", {})[name] = round(os.getloadavg()[0], 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
