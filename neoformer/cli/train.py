"""`neoformer train`: parse flags, build the run, call fit()."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig
from ..safepath import inside
from ..train.run_config import (
    DataConfig, TokenizerConfig, TrainConfig, add_override_flags, dump_yaml, load_run_config, overrides_from_args,
)  # fmt: skip

# plain flags -> dotted config fields (seed 000 spellings --batch --seq --max_tokens included)
FLAG_FIELDS = {
    "data": "data.source", "tokenizer": "tokenizer.kind", "vocab_size": "tokenizer.vocab_size",
    "max_steps": "train.max_steps", "time_budget": "train.time_budget", "eval_every": "train.eval_every",
    "save_every": "train.save_every", "device": "train.device", "precision": "train.precision",
    "lr": "train.lr", "batch": "train.batch_size", "seq": "train.seq_len", "max_tokens": "train.max_tokens",
    "grad_accum": "train.grad_accum", "seed": "train.seed", "optimizer": "train.optimizer",
    "samples": "train.samples", "threads": "train.threads",
}
EXIT_INTERRUPTED = {"interrupted": 130, "terminated": 143}


def threads_arg(text: str) -> int | str:
    """argparse type of ``--threads N|auto`` (train, eval, generate)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}")
    return value


def _field_list(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def add_parser(subparsers) -> None:
    train_help = "train a model (causal LM, MLM or seq2seq, chosen by the model kind)"
    p = subparsers.add_parser(
        "train", help=train_help, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=train_help + ".\n\nExamples:\n"
        "  neoformer train --preset neoformer-x-demo --out runs/demo\n"
        "  neoformer train --config configs/lumi.yaml --model.n_layers 6 --train.lr 3e-4 --max-steps 2000\n"
        "  neoformer train --out runs/demo --resume                      # continue the latest checkpoint",
        epilog="Any config field can be overridden as --SECTION.FIELD VALUE:\n"
        f"  train: {_field_list(TrainConfig)}\n"
        f"  data: {_field_list(DataConfig)}\n"
        f"  tokenizer: {_field_list(TokenizerConfig)}\n"
        "  model: any ModelConfig field (d_model, n_layers, n_heads, ...; see `neoformer info` and docs/config.md)\n"
        "See docs/training.md for checkpoints, resume and every flag.")
    what = p.add_argument_group("what to train")
    what.add_argument("--preset", help="model preset (e.g. neoformer-x-demo, lumi-tiny; `neoformer info --list`)")
    what.add_argument("--config", metavar="YAML", help="run config file (configs/*.yaml)")
    what.add_argument("--data", metavar="SPEC", help="stdlib (default, offline), a file / directory / glob, "
                      "hf:NAME, or a seq2seq pair file (.tsv, .jsonl with source/target)")
    what.add_argument("--tokenizer", metavar="SPEC", help="bpe (default: byte-level BPE trained on the train split), "
                      "char, sentencepiece, a saved tokenizer directory, tokenizer.json, .model or .tiktoken")
    what.add_argument("--vocab-size", type=int, help="vocabulary of a trained tokenizer (default: the preset's)")
    run = p.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="run directory (default runs/<preset or config name>)")
    run.add_argument("--resume", nargs="?", const=True, metavar="CKPT",
                     help="continue from --out's latest checkpoint, or from CKPT (a checkpoint or run directory)")
    run.add_argument("--overwrite", action="store_true", help="replace the previous run in --out (its files are "
                     "deleted once the new run has saved a checkpoint; other files are left alone)")
    run.add_argument("--max-steps", type=int, help="optimizer steps")
    run.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop after this much wall time")
    run.add_argument("--epochs", type=float, help="passes over the train split (sets --max-steps)")
    run.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, help="stop after this many training tokens")
    run.add_argument("--eval-every", type=int, metavar="STEPS", help="validation interval (0 = only at the end)")
    run.add_argument("--save-every", type=int, metavar="STEPS", help="checkpoint interval (0 = only at the end)")
    run.add_argument("--samples", type=int, metavar="N", help="text samples to generate at the end")
    hyper = p.add_argument_group("optimisation")
    hyper.add_argument("--lr", type=float, help="peak learning rate")
    hyper.add_argument("--batch", "--batch-size", dest="batch", type=int, help="sequences per micro-batch")
    hyper.add_argument("--seq", "--seq-len", dest="seq", type=int, help="tokens per sequence")
    hyper.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    hyper.add_argument("--optimizer", choices=("adamw", "lion", "muon"),
                       help="muon: torch.optim.Muon for the blocks' 2-D weights + AdamW for the rest")
    hyper.add_argument("--seed", type=int)
    speed = p.add_argument_group("device and speed")
    speed.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    speed.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                       help="auto = bf16/fp16 autocast on CUDA; on CPU bf16 where it is native "
                       "(AVX512-BF16/AMX), else fp32")
    speed.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step")
    speed.add_argument("--gradient-checkpointing", action="store_true", default=None,
                       help="recompute activations in backward (less memory, ~30%% slower)")
    speed.add_argument("--threads", type=threads_arg, metavar="N|auto",
                       help="CPU threads for torch (default auto: torch's count, dropped to 1 while another "
                       "process keeps the CPU busy; pin a number for bit-reproducible runs)")
    speed.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    speed.add_argument("--parallel", choices=("ddp", "fsdp", "none"),  # parallel: see docs/scaling.md
                       help="data parallelism under torchrun (default ddp when WORLD_SIZE > 1); "
                       "--batch is the global batch, split evenly over the ranks")
    add_override_flags(p)
    p.set_defaults(func=run_train)


# ---- building the run ------------------------------------------------------------------------
def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, dotted in FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out[dotted] = value
    if getattr(args, "compile", None):
        out["train.compile"] = True
    if getattr(args, "gradient_checkpointing", None):
        out["train.gradient_checkpointing"] = True
    if getattr(args, "no_progress", False):
        out["train.progress"] = False
    out.update(overrides_from_args(args))
    return out


def _resume_config(checkpoint, overrides: dict[str, Any], preset: str | None = None):
    """Run config of a checkpoint plus overrides; the model (and its preset) may not change on resume."""
    from ..checkpoint import read_config, resolve_checkpoint
    from ..train.run_config import RunConfig

    path = resolve_checkpoint(checkpoint)
    saved = read_config(path)
    if preset is not None and preset != saved.get("preset"):
        raise ConfigError(f"--preset {preset} differs from the checkpoint's preset {saved.get('preset')!r} ({path}); "
                          "a resumed run keeps its model: drop --preset, or start a new run in another --out")
    for dotted, value in overrides.items():
        section, _, name = dotted.partition(".")
        if section == "model" and saved["model"].get(name) != value:
            raise ConfigError(f"--model.{name} {value!r} differs from the checkpoint's {saved['model'].get(name)!r}; "
                              "a resumed run keeps its model (start a new run instead)")
    data = {"preset": saved.get("preset"), "model": saved["model"], "train": saved.get("train") or {},
            "data": saved.get("data") or {}, "tokenizer": saved.get("tokenizer_config") or {}}
    run = RunConfig.from_dict({k: v for k, v in data.items() if k != "preset"}, overrides)
    return dataclasses.replace(run, preset=saved.get("preset")), path


def _claim_out_dir(out: Path, ctx, cleanup: contextlib.ExitStack, *, resume: bool, overwrite: bool):
    """Rank 0 locks ``out`` and checks that this run may use it (nothing is deleted here: see
    neoformer.checkpoint.rundir); every rank stops on its refusal. Returns the Replacement or None."""
    from ..checkpoint.rundir import RunLock, prepare_run_folder

    if resume and overwrite:
        raise ConfigError("--overwrite replaces a run and --resume continues it; pass one of them")
    replacement, problem = None, None
    if ctx.is_main:
        try:
            cleanup.callback(RunLock(out).acquire().release)
            replacement = prepare_run_folder(out, resume=resume, overwrite=overwrite)
        except ValueError as err:
            problem = str(err)
        if replacement is not None:
            cleanup.callback(replacement.restore)  # a no-op once the new run has saved (discard)
    problem = ctx.broadcast_object(problem)  # parallel: every rank gets rank 0's refusal
    if problem:
        raise ConfigError(problem)
    return replacement


def _adapt_model_to_tokenizer(model_cfg: ModelConfig, tokenizer) -> ModelConfig:
    changes = {}
    if model_cfg.vocab_size != tokenizer.vocab_size:
        changes["vocab_size"] = tokenizer.vocab_size
    if model_cfg.pad_token_id is not None and model_cfg.pad_token_id != tokenizer.pad_id:
        changes["pad_token_id"] = tokenizer.pad_id
    return model_cfg.replace(**changes) if changes else model_cfg


def run_train(args: argparse.Namespace) -> int:
    """Runs unchanged under ``torchrun --nproc_per_node=N``: one process group for the run."""
    from .. import parallel

    ctx = parallel.setup(device=args.device if args.device not in (None, "auto") else None)
    try:  # cleanup: the run-folder lock, and putting back a run that --overwrite replaced in vain
        with parallel.main_process_output(ctx), contextlib.ExitStack() as cleanup:  # parallel: rank 0 prints
            return _run_train(args, ctx, cleanup)
    finally:
        parallel.teardown(ctx)


def _resolve_run(args: argparse.Namespace):
    """(run config, run directory, checkpoint to resume or None) from the flags; nothing is touched yet."""
    overrides = collect_overrides(args)
    resume_path = None
    if args.resume:
        source = args.resume if args.resume is not True else (args.out or _default_out(args))
        run, resume_path = _resume_config(source, overrides, args.preset)
        out = Path(args.out) if args.out else _run_dir_of(resume_path)
    else:
        if not args.preset and not args.config:
            raise ConfigError("pass --preset NAME or --config FILE (see `neoformer info --list` for presets)")
        run = load_run_config(args.config, args.preset, overrides)
        out = Path(args.out or _default_out(args))
    if args.epochs is not None and not args.epochs > 0:
        raise ConfigError(f"--epochs ({args.epochs}) must be a positive number of passes over the train split")
    if run.train.threads is None and "train.threads" not in overrides:
        run = dataclasses.replace(run, train=run.train.replace(threads="auto"))  # tune CPU threads unless told
    return run, out, resume_path


def _run_train(args: argparse.Namespace, ctx, cleanup: contextlib.ExitStack) -> int:
    import torch

    from .. import parallel
    from ..model import build_model
    from ..presets import format_run_defaults
    from ..train.batches import build_task_data, steps_for_epochs
    from ..train.fit import TrainingDiverged, describe_precision, fit, resolve_device, seed_everything

    run, out, resume_path = _resolve_run(args)
    replacement = _claim_out_dir(out, ctx, cleanup, resume=resume_path is not None, overwrite=args.overwrite)
    t = run.train
    if isinstance(t.threads, int):
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)

    started = time.perf_counter()
    tokenizer_dir = inside(resume_path, "tokenizer", what="tokenizer folder", error=ConfigError) if resume_path else None
    tokenizer_spec = str(tokenizer_dir) if tokenizer_dir and tokenizer_dir.is_dir() else None
    with parallel.rank0_first(ctx):  # parallel: rank 0 fills the data / tokenizer cache, the others read it
        task = build_task_data(run, tokenizer_spec)
    print(f"data: {task.description}")
    print(f"tokenizer: {task.tokenizer.kind}, vocab {task.tokenizer.vocab_size:,} "
          f"(ready in {time.perf_counter() - started:.1f} s)")
    run = dataclasses.replace(run, model=_adapt_model_to_tokenizer(run.model, task.tokenizer))
    if args.epochs is not None:
        run = dataclasses.replace(run, train=t.replace(max_steps=steps_for_epochs(args.epochs, task, run)))
        t = run.train

    seed_everything(t.seed)
    model = build_model(run.model)
    seq = f" x {task.row_tokens}" if task.row_tokens else ""  # pairs (seq2seq) vary in length
    print(f"model: {run.preset or run.model.name} ({run.model.kind}), {model.num_parameters():,} parameters; "
          f"batch {t.batch_size}{seq} x {t.grad_accum} accum; {_limits(t)}")
    if format_run_defaults(run.preset):
        print(format_run_defaults(run.preset))
    device = ctx.device if ctx.distributed else resolve_device(t.device)
    print(f"device: {device.type}, precision: {describe_precision(t.precision, device)}")
    if not ctx.distributed:  # per-rank memory under DDP/FSDP: `neoformer info --world-size`
        from ..train.fit import resolve_precision
        from ..train.memory import memory_report

        for line in memory_report(model, task.objective, t.batch_size, task.row_tokens or run.model.max_seq_len,
                                  device, amp_dtype=resolve_precision(t.precision, device),
                                  gradient_checkpointing=t.gradient_checkpointing, optimizer=t.optimizer):
            print(line)
    if ctx.is_main:  # parallel: rank 0 owns the run directory
        (out / "config.yaml").write_text(dump_yaml(run))
    ctx.barrier()
    extras = {"preset": run.preset, "data": dataclasses.asdict(run.data),
              "tokenizer_config": dataclasses.asdict(run.tokenizer)}
    try:
        result = fit(model, task.objective, task.train, t, val_batches=task.val, out_dir=out, tokenizer=task.tokenizer,
                     run_config=extras, resume=resume_path, parallel=ctx, parallel_mode=args.parallel,
                     callbacks=[lambda event, _: replacement.discard() if event == "save" else None] if replacement else ())
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report(result, run)
    if t.samples and result.stop_reason not in EXIT_INTERRUPTED and ctx.is_main and not parallel.is_fsdp(model):
        from ..train.sampling import print_samples

        print_samples(model, task, run)
    return EXIT_INTERRUPTED.get(result.stop_reason, 0)


def _limits(t: TrainConfig) -> str:
    parts = [f"max {t.max_steps:,} steps"]
    if t.time_budget:
        parts.append(f"time budget {t.time_budget:g} s")
    if t.max_tokens:
        parts.append(f"max {t.max_tokens:,} tokens")
    return ", ".join(parts)


def _default_out(args: argparse.Namespace) -> str:
    name = args.preset or (Path(args.config).stem if args.config else "run")
    return str(Path("runs") / name)


def _run_dir_of(checkpoint: Path) -> Path:
    """runs/x/checkpoints/step-N -> runs/x."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def _report(result, run) -> None:
    val = f" | val loss {result.val_loss:.4f} ppl {result.val_ppl:.2f}" if result.val_loss is not None else ""
    train = f"train loss {result.train_loss:.4f}" if result.train_loss is not None else "no steps"
    print(f"done ({result.stop_reason}): {result.step:,} steps, {result.tokens:,} tokens in {result.elapsed:.1f} s; "
          f"{train}{val}")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")


__all__ = ["add_parser", "run_train", "collect_overrides", "threads_arg"]
