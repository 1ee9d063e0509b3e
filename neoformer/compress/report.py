"""The compression report: params, disk size, decode speed and validation quality of each model
(teacher, pruned before KD, after KD, same-shape scratch baseline) as a terminal table,
``compress_report.json`` and a PNG.

Validation loss is reported per token and per character: a student with a reduced vocabulary
splits the same text into more tokens, so only the per-character loss compares across vocabularies.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn


@dataclass
class ModelMeasure:
    name: str
    params: int
    disk_bytes: int | None
    decode_tok_s: float
    val_loss: float  # nats per token
    val_ppl: float
    loss_per_char: float  # nats per character of the same validation text
    tokens: int | None = None  # training tokens spent on this model (KD or scratch)


@torch.no_grad()
def validation_loss(model: nn.Module, tokenizer, batches: Iterable, max_batches: int) -> tuple[float, float]:
    """(nats per token, nats per character) over at most ``max_batches`` validation batches."""
    model.eval()
    total, targets, chars = 0.0, 0, 0
    for number, (x, y) in enumerate(batches):
        if number >= max_batches:
            break
        loss, _ = model.loss(x, y)
        n = int((y >= 0).sum())
        total += float(loss) * n
        targets += n
        chars += sum(len(tokenizer.decode(row.tolist())) for row in y)
    return total / max(targets, 1), total / max(chars, 1)


@torch.no_grad()
def decode_speed(model: nn.Module, new_tokens: int = 48, rounds: int = 2) -> float:
    """Greedy decode tokens/s at batch 1 (best of ``rounds``, after one warm-up)."""
    from ..generate import generate

    model.eval()
    prompt = torch.arange(1, 17)[None] % model.config.vocab_size
    generate(model, prompt, 4, do_sample=False)
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        out = generate(model, prompt, new_tokens, do_sample=False, eos_token_id=None)
        produced = out.shape[1] - prompt.shape[1]
        best = max(best, produced / max(time.perf_counter() - started, 1e-9))
    return best


def disk_size(checkpoint: Path | None) -> int | None:
    if checkpoint is None:
        return None
    weights = Path(checkpoint) / "model.safetensors"
    return weights.stat().st_size if weights.is_file() else None


def measure(name: str, model: nn.Module, tokenizer, val_batches, *, eval_batches: int, checkpoint=None,
            tokens: int | None = None, speed: bool = True) -> ModelMeasure:
    loss, per_char = validation_loss(model, tokenizer, val_batches(), eval_batches)
    return ModelMeasure(name, model.num_parameters(), disk_size(checkpoint), decode_speed(model) if speed else 0.0,
                        loss, math.exp(min(loss, 50.0)), per_char, tokens)


def format_table(rows: list[ModelMeasure], teacher_tokens: int | None = None) -> str:
    head = f"{'model':<22}{'params':>11}{'disk MB':>9}{'tok/s':>8}{'val ppl':>9}{'loss/char':>10}{'KD/train tokens':>17}"
    lines = [head, "-" * len(head)]
    base = rows[0] if rows else None
    for r in rows:
        disk = f"{r.disk_bytes / 1e6:.2f}" if r.disk_bytes else "-"
        spent = "-" if r.tokens is None else f"{r.tokens:,}"
        if r.tokens is not None and teacher_tokens:
            spent += f" ({r.tokens / teacher_tokens:.0%})"
        ratio = f" ({r.params / base.params:.2f}x)" if base and r is not base else ""
        lines.append(f"{r.name:<22}{r.params:>11,}{disk:>9}{r.decode_tok_s:>8.0f}{r.val_ppl:>9.2f}"
                     f"{r.loss_per_char:>10.4f}{spent:>17}{ratio}")
    return "\n".join(lines)


def write_report(out_dir: Path, rows: list[ModelMeasure], extra: dict) -> Path:
    path = Path(out_dir) / "compress_report.json"
    path.write_text(json.dumps({"models": [asdict(r) for r in rows], **extra}, indent=2) + "\n")
    _plot(Path(out_dir) / "compress_report.png", rows)
    return path


def _plot(path: Path, rows: list[ModelMeasure]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report's JSON and table are complete without it
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r.name for r in rows]
    for ax, values, title in ((axes[0], [r.params / 1e6 for r in rows], "parameters (M)"),
                              (axes[1], [r.val_ppl for r in rows], "validation perplexity"),
                              (axes[2], [r.decode_tok_s for r in rows], "decode tokens/s (batch 1)")):
        ax.bar(range(len(rows)), values, color=["#555", "#c84", "#48c", "#8a8"][: len(rows)])
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["ModelMeasure", "measure", "validation_loss", "decode_speed", "format_table", "write_report"]
