"""The Nexus pipeline: reduce a teacher (depth, heads, FFN, width, vocabulary), then distill.

    from neoformer.compress import compress, CompressPlan, DistillConfig
    result = compress("runs/teacher", "runs/student", CompressPlan(layers="every-2nd", width=0.5),
                      DistillConfig(max_steps=300))

Order: depth first (every later statistic is cheaper on fewer blocks), then heads, FFN neurons and
the model width, each scored on the model as it is at that point, and the vocabulary last
(the calibration data stays in the teacher's tokens until then).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from ..config import ConfigError
from ..train.batches import build_task_data
from ..train.run_config import DataConfig, RunConfig, TrainConfig
from .calibrate import Batch
from .depth import choose_layers, keep_layers
from .heads import HEAD_SCORERS, prune_heads
from .plan import CompressPlan, check_plan, student_width
from .report import ModelMeasure, format_table, measure, write_report
from .vocab import VocabReduction, reduce_tokenizer, slice_vocab, token_counts
from .width import prune_ffn, reduce_width

PRUNED_DIR = "pruned"  # OUT/pruned/step-000000: the student before distillation
SCRATCH_DIR = "scratch"


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings; the training ones (steps, lr, batch, data) are ``train`` / ``data``."""

    alpha: float = 0.5  # weight of the KD term; 1 - alpha on the hard-label CE
    temperature: float = 2.0
    hidden_weight: float = 0.0  # MSE between final hidden states (students as wide as the teacher)
    teacher_bf16: bool = False
    calibration_batches: int = 8
    logit_cache: str | None = None  # folder of cached teacher top-k logits (built or extended, then reused)
    logit_top_k: int = 64
    logit_dtype: str = "float16"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=200, eval_every=0, save_every=100,
                                                                   samples=0))
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class Compressed:
    """A reduced model before distillation, with what was chosen and why."""

    model: nn.Module
    tokenizer: object
    vocab: VocabReduction | None
    choices: dict


def _take(batches, n: int) -> list[Batch]:
    out = []
    for batch in batches:
        out.append((batch[0], batch[1]))
        if len(out) == n:
            break
    return out


def reduce(teacher: nn.Module, tokenizer, plan: CompressPlan, calibration: list[Batch],
           train_tokens=None, log: Callable[[str], None] = print) -> Compressed:
    """Apply ``plan`` to a copy of ``teacher``; ``train_tokens`` (teacher ids) rank the vocabulary."""
    model, choices = teacher, {}
    cfg = teacher.config
    uniform = plan.by == "uniform"
    check_plan(plan, cfg)  # refuse before any slow scoring
    if plan.layers is not None:
        keep, scores = choose_layers(plan, model, calibration)
        choices["layers"] = {"kept": keep, "score": None if scores is None else plan.layer_score,
                             "scores": None if scores is None else [round(s, 6) for s in scores]}
        log(f"layers: keep {keep} of {cfg.n_layers}" + (f" by {plan.layer_score}: " + ", ".join(
            f"{i}:{s:.4f}" for i, s in enumerate(scores)) if scores else ""))
        model = keep_layers(model, keep)
    if plan.heads is not None or plan.kv_heads is not None:
        scores = None if uniform else HEAD_SCORERS[plan.head_score](model, calibration)
        model, kept = prune_heads(model, plan, scores)
        choices["heads"] = {"kept": kept, "scores": scores}
        log(f"heads: {model.config.n_heads} query / {model.config.resolved_n_kv_heads} KV heads per layer")
    if plan.ffn_dim is not None:
        model = prune_ffn(model, plan.ffn_dim, calibration, uniform)
        choices["ffn_dim"] = plan.ffn_dim
        log(f"ffn: {plan.ffn_dim} of {cfg.resolved_ffn_hidden} neurons per layer")
    width = student_width(plan, model.config, model.config.n_heads)
    if width != model.config.d_model:
        model = reduce_width(model, width, plan.width_method, calibration, uniform)
        choices["d_model"] = {"width": width, "method": plan.width_method}
        log(f"width: d_model {cfg.d_model} -> {width} by {plan.width_method}")
    vocab = None
    if plan.vocab is not None:
        if train_tokens is None:
            raise ConfigError("--vocab needs the training data to count tokens")
        vocab = reduce_tokenizer(tokenizer, token_counts(tokenizer, train_tokens), plan.vocab)
        model = slice_vocab(model, vocab)
        tokenizer = vocab.tokenizer
        choices["vocab"] = {"size": plan.vocab, "teacher_size": cfg.vocab_size}
        log(f"vocab: {cfg.vocab_size} -> {plan.vocab} tokens (specials and all single bytes kept)")
    if model is teacher:  # nothing removed: still a separate copy
        from .surgery import rebuild, state_of

        model = rebuild(cfg, state_of(teacher))
    return Compressed(model, tokenizer, vocab, choices)


def _run(cfg_model, settings: DistillConfig) -> RunConfig:
    return RunConfig(model=cfg_model, train=settings.train, data=settings.data)


def _provenance(teacher_path: Path, teacher_cfg, plan: CompressPlan, settings: DistillConfig, choices: dict) -> dict:
    return {"contents": "full",
            "distilled_from": {"checkpoint": str(teacher_path), "model": teacher_cfg.to_dict(), "plan": plan.to_dict(),
                               "choices": choices, "alpha": settings.alpha, "temperature": settings.temperature,
                               "hidden_weight": settings.hidden_weight},
            "data": dataclasses.asdict(settings.data)}


def compress(teacher_path, out_dir, plan: CompressPlan, settings: DistillConfig | None = None, *,
             resume: bool = False, baseline_scratch: bool = False, device: str = "cpu",
             log: Callable[[str], None] = print) -> dict:
    """Reduce, distill, measure. Returns the report dict (also written as OUT/compress_report.json)."""
    from ..train.distill import Distillation
    from ..train.fit import fit, seed_everything

    settings = settings or DistillConfig()
    out = Path(out_dir)
    teacher, tokenizer, _ = load_checkpoint(teacher_path, device=device, kinds=("decoder",),
                                                         contents=("full",), command="compress")
    teacher_path = resolve_checkpoint(teacher_path)
    check_plan(plan, teacher.config)
    if tokenizer is None:
        raise ConfigError(f"{teacher_path} has no tokenizer; compress needs one to read the data")
    seed_everything(settings.train.seed)
    teacher_task = build_task_data(_run(teacher.config, settings), tokenizer)
    pruned_root = out / PRUNED_DIR
    started = time.perf_counter()
    if resume and (pruned_root / "latest").exists():
        student, student_tok, _ = load_checkpoint(pruned_root, device=device, command="compress --resume")
        saved = json.loads((resolve_checkpoint(pruned_root) / "config.json").read_text())
        choices = saved["distilled_from"]["choices"]
        kept = saved.get("vocab_kept")
        vocab = VocabReduction(student_tok, torch.tensor(kept)) if kept is not None else None
        log(f"resuming: the pruned student from {pruned_root}")
    else:
        calibration = _take(teacher_task.train, settings.calibration_batches)
        train_tokens = None
        if plan.vocab is not None:
            from ..data import prepare_data

            d = settings.data
            train_tokens = [prepare_data(d.source, tokenizer=tokenizer, cache_dir=d.cache_dir,
                                         val_fraction=d.val_fraction, text_field=d.text_field).train.tokens]
        reduced = reduce(teacher, tokenizer, plan, calibration, train_tokens, log)
        student, student_tok, vocab, choices = reduced.model, reduced.tokenizer, reduced.vocab, reduced.choices
        extras = _provenance(teacher_path, teacher.config, plan, settings, choices)
        if vocab is not None:
            extras["vocab_kept"] = vocab.kept.tolist()
        save_checkpoint(pruned_root, 0, student, config=extras, tokenizer=student_tok, keep_last=1)
    log(f"student: {student.num_parameters():,} parameters (teacher {teacher.num_parameters():,}); "
        f"reduced in {time.perf_counter() - started:.1f} s")
    pruned = _copy(student)
    extras = _provenance(teacher_path, teacher.config, plan, settings, choices)
    student_task = build_task_data(_run(student.config, settings), student_tok)
    objective = Distillation(teacher, settings.alpha, settings.temperature, settings.hidden_weight,
                             teacher_ids=None if vocab is None else vocab.kept,
                             teacher_dtype=torch.bfloat16 if settings.teacher_bf16 else None)
    train = settings.train.replace(device=device)
    if settings.logit_cache:
        from .logit_cache import cache_for_distillation

        objective.cached_logits = cache_for_distillation(
            settings.logit_cache, objective, student_task.train, train, dataclasses.asdict(settings.data),
            settings.logit_top_k, settings.logit_dtype, log).lookup
    result = fit(student, objective, student_task.train, train, val_batches=student_task.val, out_dir=out,
                 tokenizer=student_tok, run_config=extras, resume=resume or None, log=log)
    if result.stop_reason in ("interrupted", "terminated"):
        return {"stop_reason": result.stop_reason}
    teacher.float()
    rows = [measure("teacher", teacher, tokenizer, teacher_task.val, eval_batches=train.eval_batches,
                    checkpoint=teacher_path),
            measure("pruned (before KD)", pruned, student_tok, student_task.val, eval_batches=train.eval_batches,
                    checkpoint=resolve_checkpoint(pruned_root)),
            measure("distilled", student, student_tok, student_task.val, eval_batches=train.eval_batches,
                    checkpoint=result.checkpoint, tokens=result.tokens)]
    if baseline_scratch:
        rows.append(_scratch_baseline(student.config, student_tok, settings, train, out, log))
    teacher_tokens = _teacher_tokens(teacher_path)
    log(format_table(rows, teacher_tokens))
    report = {"teacher": str(teacher_path), "student": str(result.checkpoint), "plan": plan.to_dict(),
              "choices": choices, "teacher_train_tokens": teacher_tokens, "stop_reason": result.stop_reason}
    path = write_report(out, rows, report)
    log(f"report: {path} (and {path.with_suffix('.png').name})")
    return {"models": [dataclasses.asdict(r) for r in rows], **report}


def _copy(model: nn.Module) -> nn.Module:
    from .surgery import rebuild, state_of

    return rebuild(model.config, state_of(model))


def _teacher_tokens(path: Path) -> int | None:
    """Training tokens the teacher saw (its checkpoint's training state), for the KD-share column."""
    from ..checkpoint import load_training_state

    try:
        return int(load_training_state(path)["tokens"])
    except Exception:  # a checkpoint saved without training state (an import, a compressed model)
        return None


def _scratch_baseline(student_cfg, tokenizer, settings: DistillConfig, train: TrainConfig, out: Path,
                      log) -> ModelMeasure:
    """The same shape from a random init, trained on the same data and token budget with plain CE."""
    from ..model import build_model
    from ..train.fit import fit, seed_everything

    seed_everything(train.seed)
    model = build_model(student_cfg)
    task = build_task_data(_run(student_cfg, settings), tokenizer)
    log("baseline: the same student shape trained from scratch on the same budget")
    result = fit(model, task.objective, task.train, train, val_batches=task.val, out_dir=out / SCRATCH_DIR,
                 tokenizer=tokenizer, run_config={"contents": "full"}, log=log)
    return measure("scratch (same budget)", model, tokenizer, task.val, eval_batches=train.eval_batches,
                   checkpoint=result.checkpoint, tokens=result.tokens)


__all__ = ["compress", "reduce", "Compressed", "DistillConfig", "PRUNED_DIR", "SCRATCH_DIR"]
