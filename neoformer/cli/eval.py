"""`neoformer eval CKPT`: loss and perplexity of a checkpoint on a data split; with --tasks, built-in
and lm-evaluation-harness tasks; with --bpb, perplexity and bits per byte of any text (neoformer.eval)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

from ..config import ConfigError
from .train import threads_arg


def add_parser(subparsers) -> None:
    eval_help = "evaluate a checkpoint: loss and perplexity on a data split"
    e = subparsers.add_parser("eval", help=eval_help, description=eval_help + " (MLM loss for encoders, "
                              "teacher-forced target loss for encoder-decoders).", allow_abbrev=False)
    e.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or run directory")
    e.add_argument("--data", metavar="SPEC", help="data source (default: the one the checkpoint was trained on)")
    e.add_argument("--split", choices=("val", "train", "all"), default=None,
                   help="data split (default val; all with --bpb)")
    e.add_argument("--batches", type=int, default=50, help="batches to average (default 50; 0 = the whole split)")
    e.add_argument("--batch", "--batch-size", dest="batch", type=int, help="sequences per batch")
    e.add_argument("--seq", "--seq-len", dest="seq", type=int, help="tokens per sequence")
    e.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    e.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    e.add_argument("--threads", type=threads_arg, default="auto", metavar="N|auto",
                   help="CPU threads for torch (default auto: drops to 1 while another process keeps the CPU busy)")
    e.add_argument("--quantize", metavar="SCHEME", help="quantize on load: int8 | int8-dynamic | nf4 | int4 "
                   "(see `neoformer quantize`)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    tasks = e.add_argument_group("tasks (lm-evaluation-harness and built-in; docs/evaluation.md)")
    tasks.add_argument("--tasks", metavar="NAME,...", help="lm-eval tasks (local YAML with --include-path) "
                       "and/or builtin:NAME (copy, reverse, sort, addition, brackets, kv_recall, python; builtin:all)")
    tasks.add_argument("--include-path", metavar="DIR", help="folder of lm-eval task YAML files")
    tasks.add_argument("--limit", type=int, metavar="N", help="examples per task (documents with --bpb)")
    tasks.add_argument("--num-fewshot", type=int, metavar="K", help="lm-eval few-shot examples")
    text = e.add_argument_group("bits per byte")
    text.add_argument("--bpb", action="store_true", help="perplexity and bits per byte of --data with a sliding window")
    text.add_argument("--stride", type=int, metavar="N", help="new tokens scored per window (default: the context "
                      "length, disjoint windows; smaller = more context per token, slower)")
    e.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..train.batches import build_eval_batches
    from ..checkpoint import load_checkpoint
    from ..train.fit import evaluate, resolve_device, resolve_precision
    from ..train.monitor import apply_threads, tuned
    from ..train.objectives import objective_for
    from ..checkpoint import resolve_checkpoint
    from ..train.run_config import RunConfig, TrainConfig

    for flag, value, least in (("--batch", args.batch, 1), ("--seq", args.seq, 1), ("--batches", args.batches, 0),
                               ("--limit", args.limit, 1), ("--stride", args.stride, 1), ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} ({value}) must be {'a positive' if least else 'a non-negative'} integer")
    if args.tasks and args.bpb:
        raise ConfigError("--tasks and --bpb are two evaluations; run them one at a time")
    if args.bpb and not args.data:
        raise ConfigError("--bpb needs --data FILE_OR_SPEC (the text to score)")
    for flag, value, needs in (("--include-path", args.include_path, args.tasks), ("--stride", args.stride, args.bpb),
                               ("--num-fewshot", args.num_fewshot, args.tasks)):
        if value is not None and not needs:
            raise ConfigError(f"{flag} goes with {'--bpb' if flag == '--stride' else '--tasks'}")
    device = resolve_device(args.device)
    model, tokenizer, saved = load_checkpoint(args.checkpoint, device=device, command="eval")
    if args.quantize:
        from ..quantize import quantize_model

        model = quantize_model(model, args.quantize)
    path = resolve_checkpoint(args.checkpoint)
    if tokenizer is None:
        raise ConfigError(f"{path} holds no tokenizer; evaluate it from Python with your own batches")
    if args.tasks or args.bpb:
        notes: list[str] = []
        apply_threads(args.threads, device.type, notes.append)  # a fixed count; 'auto' keeps torch's default
        return (_run_tasks if args.tasks else _run_bpb)(args, model, tokenizer, saved, path)
    args.split = args.split or "val"
    overrides = {}
    if args.data:
        overrides["data.source"] = args.data
    if args.batch is not None:
        overrides["train.batch_size"] = args.batch
    if args.seq is not None:
        overrides["train.seq_len"] = args.seq
    train_fields = {k: v for k, v in (saved.get("train") or {}).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    run = RunConfig.from_dict({"model": saved["model"], "train": train_fields, "data": saved.get("data") or {}},
                              overrides)
    if args.split == "val" and not run.data.val_fraction:
        raise ConfigError(f"{path} was trained with data.val_fraction 0 (no val split); use --split train or all")
    batches = build_eval_batches(run, tokenizer, args.split)
    notes: list[str] = []
    tuner = apply_threads(args.threads, device.type, notes.append)
    started = time.perf_counter()
    loss = evaluate(model, objective_for(model), tuned(batches(), tuner), args.batches or None, device,
                    resolve_precision(args.precision, device))
    if loss is None:
        raise ValueError(f"no {args.split} batches in {run.data.source}; lower --seq or pick another split")
    ppl = math.exp(min(loss, 50.0))
    for note in notes:
        print(note, file=sys.stderr)
    record = {"checkpoint": str(path), "step": saved.get("step"), "data": run.data.source, "split": args.split,
              **({"quantize": args.quantize} if args.quantize else {}),
              "loss": loss, "perplexity": ppl, "seconds": round(time.perf_counter() - started, 2)}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{path} (step {saved.get('step')}) on {run.data.source} [{args.split}]: "
              f"loss {loss:.4f} | perplexity {ppl:.2f}")
    return 0


def _run_tasks(args, model, tokenizer, saved: dict, path) -> int:
    from ..eval.run import evaluate_tasks, format_table, parse_tasks, record_in_run

    from ..checkpoint import require

    require(saved, kinds=("decoder",), command="eval --tasks", path=path)
    started = time.perf_counter()
    results = evaluate_tasks(model, tokenizer, parse_tasks(args.tasks), include_path=args.include_path,
                             limit=args.limit, batch_size=args.batch or 32, num_fewshot=args.num_fewshot)
    seconds = round(time.perf_counter() - started, 2)
    logged = record_in_run(path, saved.get("step"), results)
    if args.json:
        print(json.dumps({"checkpoint": str(path), "step": saved.get("step"), "tasks": results, "seconds": seconds}))
    else:
        print(f"{path} (step {saved.get('step')}), {seconds:.1f}s")
        print(format_table(results))
        if logged:
            print(f"appended to {logged}")
    return 0


def _run_bpb(args, model, tokenizer, saved: dict, path) -> int:
    from ..data.sources import load_documents
    from ..eval.perplexity import score_text
    from ..eval.run import record_in_run

    require_decoder = saved.get("model", {}).get("kind", "decoder")
    if require_decoder != "decoder":
        raise ConfigError(f"{path} holds a {require_decoder} model; --bpb scores text with a decoder (causal LM)")
    split = args.split or "all"
    corpus = load_documents(args.data, split)
    started = time.perf_counter()
    score = score_text(model, tokenizer, corpus, stride=args.stride, batch_size=args.batch or 16, limit=args.limit)
    record = {"checkpoint": str(path), "step": saved.get("step"), "data": args.data, "split": split,
              "stride": args.stride or model.config.max_seq_len, **score.as_dict(),
              "seconds": round(time.perf_counter() - started, 2)}
    record_in_run(path, saved.get("step"), {"text": {"bits_per_byte": score.bits_per_byte,
                                                     "perplexity": score.perplexity}}, {"eval_data": args.data})
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{path} (step {saved.get('step')}) on {args.data} [{split}]: {score.documents} documents, "
              f"{score.tokens} tokens, {score.bytes} bytes | loss {score.loss:.4f} | perplexity "
              f"{score.perplexity:.2f} | bits/byte {score.bits_per_byte:.4f} (stride {record['stride']})")
    return 0


__all__ = ["add_parser", "run_eval"]
