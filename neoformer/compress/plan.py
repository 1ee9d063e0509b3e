"""What to remove: a validated, serialisable compression plan (no torch here, so `--help` stays fast).

A plan names each reduction and how its parts are chosen; ``resolve`` turns it into concrete
shapes for one teacher (``StudentShape``) and refuses an impossible request with one line.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, ModelConfig

LAYER_SCORES = ("influence", "skip-loss")  # ShortGPT Block Influence | loss increase when skipped
SELECTIONS = ("importance", "uniform")  # --by: scores, or evenly spaced / first-k
WIDTH_METHODS = ("pca", "channels")  # SliceGPT rotation | Minitron channel importance
HEAD_SCORES = ("gradient", "entropy")  # Michel et al. 2019 | attention entropy


class CompressError(ConfigError):
    """A compression request that cannot be met; the message names the flag."""


@dataclass(frozen=True)
class CompressPlan:
    """Every reduction is optional; an empty plan copies the teacher."""

    layers: str | None = None  # "every-3rd" | "every-k=3" | "keep=0,3,6" | "N" (a count)
    by: str = "importance"  # how a count of layers / heads is chosen: importance | uniform
    layer_score: str = "influence"
    head_score: str = "gradient"
    d_model: int | None = None
    width: float | None = None  # fraction of d_model (alternative to d_model)
    width_method: str = "pca"
    ffn_dim: int | None = None
    heads: int | None = None
    kv_heads: int | None = None  # None = keep the teacher's KV groups (prune query heads per group)
    vocab: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("by", SELECTIONS), ("layer_score", LAYER_SCORES), ("head_score", HEAD_SCORES),
                              ("width_method", WIDTH_METHODS)):
            if getattr(self, name) not in allowed:
                raise CompressError(f"--{name.replace('_', '-')} {getattr(self, name)!r} must be one of: "
                                    f"{', '.join(allowed)}")
        for name in ("d_model", "ffn_dim", "heads", "kv_heads", "vocab"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CompressError(f"--{name.replace('_', '-')} ({value!r}) must be a positive integer")
        if self.d_model is not None and self.width is not None:
            raise CompressError("pass --d-model or --width, not both")
        if self.width is not None and not 0 < self.width <= 1:
            raise CompressError(f"--width ({self.width}) must be a fraction in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def empty(self) -> bool:
        return all(getattr(self, n) is None for n in ("layers", "d_model", "width", "ffn_dim", "heads", "vocab"))


def _ordinal_step(text: str) -> int | None:
    """every-3rd / every-2nd / every-k=3 -> 3 / 2 / 3."""
    match = re.fullmatch(r"every-(\d+)(st|nd|rd|th)", text) or re.fullmatch(r"every-k=(\d+)", text)
    return int(match.group(1)) if match else None


def parse_layers(spec: str, n_layers: int) -> tuple[str, Any]:
    """``("keep", [indices])`` or ``("count", N)``; one line for anything else."""
    spec = spec.strip()
    step = _ordinal_step(spec)
    if step is not None:
        if step < 1:
            raise CompressError(f"--layers {spec}: the step must be at least 1")
        return "keep", list(range(0, n_layers, step))
    if spec.startswith("keep="):
        try:
            keep = sorted({int(part) for part in spec[5:].split(",") if part.strip()})
        except ValueError:
            raise CompressError(f"--layers {spec}: keep= takes layer numbers, e.g. keep=0,3,6") from None
        bad = [i for i in keep if not 0 <= i < n_layers]
        if not keep or bad:
            raise CompressError(f"--layers {spec}: layers must be in 0..{n_layers - 1} (the teacher has {n_layers})")
        return "keep", keep
    if spec.isdigit():
        count = int(spec)
        if not 1 <= count <= n_layers:
            raise CompressError(f"--layers {count}: keep between 1 and {n_layers} layers (the teacher has {n_layers})")
        return "count", count
    raise CompressError(f"--layers {spec!r}: use every-3rd, every-k=3, keep=0,3,6 or a count N (with --by)")


def check_heads(plan: CompressPlan, cfg: ModelConfig) -> tuple[int, int]:
    """(query heads, KV heads) of the student; GQA groups are pruned whole or thinned evenly."""
    heads, groups = cfg.n_heads, cfg.resolved_n_kv_heads
    n = plan.heads if plan.heads is not None else heads
    kv = plan.kv_heads if plan.kv_heads is not None else min(groups, n)
    if n > heads:
        raise CompressError(f"--heads {n}: the teacher has only {heads} attention heads")
    if kv > groups:
        raise CompressError(f"--kv-heads {kv}: the teacher has only {groups} KV heads")
    if n % kv:
        raise CompressError(f"--heads {n} must be a multiple of the KV heads kept ({kv}); set --kv-heads")
    if n // kv > heads // groups:
        raise CompressError(f"--heads {n} with {kv} KV heads needs {n // kv} query heads per group; "
                            f"the teacher has {heads // groups}")
    return n, kv


def student_width(plan: CompressPlan, cfg: ModelConfig, n_heads: int) -> int:
    """d_model of the student (checked against the student's head count)."""
    if plan.width is not None:
        width = max(1, int(round(cfg.d_model * plan.width)))
        width -= width % n_heads  # round down to a multiple of the heads
        if width < n_heads:
            raise CompressError(f"--width {plan.width} leaves fewer channels than heads ({n_heads})")
    else:
        width = plan.d_model if plan.d_model is not None else cfg.d_model
    if width > cfg.d_model:
        raise CompressError(f"--d-model {width} is wider than the teacher ({cfg.d_model})")
    if width % n_heads:
        raise CompressError(f"--d-model {width} must be divisible by the number of heads ({n_heads})")
    return width


def check_plan(plan: CompressPlan, cfg: ModelConfig) -> None:
    """Refuse an impossible request before any data is read or any score computed."""
    if plan.layers is not None:
        parse_layers(plan.layers, cfg.n_layers)
    heads = check_heads(plan, cfg)[0] if plan.heads is not None or plan.kv_heads is not None else cfg.n_heads
    student_width(plan, cfg, heads)
    if plan.ffn_dim is not None and plan.ffn_dim > cfg.resolved_ffn_hidden:
        raise CompressError(f"--ffn-dim {plan.ffn_dim} is larger than the teacher's FFN ({cfg.resolved_ffn_hidden})")
    if plan.vocab is not None and plan.vocab > cfg.vocab_size:
        raise CompressError(f"--vocab {plan.vocab} is larger than the teacher's vocabulary ({cfg.vocab_size})")


# ---- Nexus recipes: the seed's Standard / Nano shapes as ratios of its 405B-class base ---------------
def _recipe_ratios(name: str) -> dict[str, float]:
    from ..presets import PRESETS

    base, target = PRESETS["nexus-base"], PRESETS[name]
    return {"layers": target.n_layers / base.n_layers, "width": target.d_model / base.d_model,
            "heads": target.n_heads / base.n_heads, "ffn": target.resolved_ffn_hidden / base.resolved_ffn_hidden,
            "vocab": target.vocab_size / base.vocab_size}


RECIPES = ("nexus-standard", "nexus-nano")


def recipe_plan(name: str, cfg: ModelConfig, **choices: Any) -> CompressPlan:
    """The seed's base -> Standard / Nano ratios (layers, width, heads, FFN, vocabulary) applied to
    ``cfg``, rounded to shapes this teacher allows (whole GQA groups, widths divisible by heads)."""
    if name not in RECIPES:
        raise CompressError(f"--recipe {name!r} must be one of: {', '.join(RECIPES)}")
    r = _recipe_ratios(name)
    groups = cfg.resolved_n_kv_heads
    heads = max(groups, int(round(cfg.n_heads * r["heads"] / groups)) * groups)
    heads = min(heads, cfg.n_heads)
    head_dim = cfg.resolved_head_dim
    d_model = max(heads, min(cfg.d_model, int(round(cfg.d_model * r["width"] / heads)) * heads))
    if d_model < heads * 8:  # keep at least a few channels per head at toy scale
        d_model = min(cfg.d_model, heads * max(8, head_dim // 2))
    return CompressPlan(layers=str(max(1, math.ceil(cfg.n_layers * r["layers"]))), d_model=d_model,
                        ffn_dim=max(8, int(round(cfg.resolved_ffn_hidden * r["ffn"]))), heads=heads,
                        vocab=max(1, int(round(cfg.vocab_size * r["vocab"]))), **choices)


__all__ = ["CompressPlan", "CompressError", "check_plan", "parse_layers", "check_heads", "student_width", "recipe_plan",
           "RECIPES", "LAYER_SCORES", "SELECTIONS", "WIDTH_METHODS", "HEAD_SCORES"]
