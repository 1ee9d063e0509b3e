"""What every export format shares: the source model, the output folder, and the verification probe.

Verification runs the same token ids through neoformer and through the consumer's runtime:
a prefill of ``PREFILL`` tokens then ``DECODE_STEPS`` single-token steps that reuse the KV cache
(decoders), one padded batch (encoders), or a source plus a cached target (encoder-decoders).
Each step's logits are compared; the largest absolute difference is reported.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import kinds

BATCH, PREFILL, DECODE_STEPS = 2, 5, 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |Δlogit| accepted by verification, per export dtype (fp32 differs only in summation order)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}


class ExportError(ValueError):
    """An export request that cannot be carried out (one line: what and why)."""


def optional_import(module: str, extra: str):
    """Import an optional library or raise one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"this export needs {module}: pip install 'neoformer[{extra}]'") from None


@dataclass
class Source:
    """The model being exported, with what travels with it."""

    model: Any
    tokenizer: Any = None
    config: dict = field(default_factory=dict)  # the checkpoint's config.json (chat template, ...)

    @property
    def cfg(self):
        return self.model.config

    @property
    def kind(self):
        return kinds.get(self.cfg)


@dataclass
class ExportResult:
    format: str
    path: Path
    max_diff: float | None  # None when verification was skipped
    checked: str = ""  # what verification compared, in words
    files: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def prepare_out(out: str | os.PathLike, force: bool) -> Path:
    """An empty output folder: refuse a file, a neoformer checkpoint, or a non-empty folder without force."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ExportError(f"--out {path} is a file; pass a folder for the export")
    if (path / "manifest.json").is_file() or (path / "sharded.json").is_file():
        raise ExportError(f"--out {path} holds a neoformer checkpoint, which the export would overwrite; "
                          "choose another folder")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise ExportError(f"--out {path} is not empty; pass --force to replace its contents")
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---- the verification probe -----------------------------------------------------------------
def probe_ids(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """(BATCH, length) token ids, the same for every format (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (BATCH, length), generator=gen)


def probe_padding_mask(length: int) -> torch.Tensor:
    """Encoder probe mask: row 0 full, row 1 with its last two tokens padding (1 = token)."""
    mask = torch.ones(BATCH, length, dtype=torch.long)
    mask[1, -2:] = 0
    return mask


@torch.no_grad()
def decoder_reference(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """neoformer's logits for a prefill of ids[:, :PREFILL] then one token per step, with the cache."""
    logits, past, _ = model(ids[:, :PREFILL], use_cache=True)
    steps = [logits.float()]
    for t in range(PREFILL, ids.shape[1]):
        logits, past, _ = model(ids[:, t:t + 1], past, use_cache=True)
        steps.append(logits.float())
    return steps


@torch.no_grad()
def seq2seq_reference(model, src: torch.Tensor, tgt: torch.Tensor) -> list[torch.Tensor]:
    memory = model.encode(src)
    logits, past = model.decode(tgt[:, :PREFILL], memory, use_cache=True)
    steps = [logits.float()]
    for t in range(PREFILL, tgt.shape[1]):
        logits, past = model.decode(tgt[:, t:t + 1], memory, past=past, use_cache=True)
        steps.append(logits.float())
    return steps


def max_abs_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor], keep: torch.Tensor | None = None) -> float:
    """Largest |Δ| over every step (``keep`` (B, L): compare only real-token rows of an encoder)."""
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        b = torch.as_tensor(b).float()
        if tuple(a.shape) != tuple(b.shape):
            raise ExportError(f"verification: exported logits have shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        diff = (a.float() - b).abs()
        if keep is not None:
            diff = diff[keep.bool()]
        worst = max(worst, float(diff.max()))
    return worst


def check_tolerance(fmt: str, diff: float, dtype: torch.dtype, scale: float = 1.0) -> None:
    limit = TOLERANCE.get(dtype, 1e-4) * max(1.0, scale)
    if not diff <= limit:  # NaN fails too
        raise ExportError(f"{fmt} verification failed: max |Δlogit| {diff:.3g} exceeds {limit:.3g}; "
                          "the exported model does not reproduce neoformer's logits")


def verify_steps(fmt: str, source: Source, dtype: torch.dtype, run: Callable[[torch.Tensor], list[torch.Tensor]],
                 what: str) -> tuple[float, str]:
    """Compare ``run(ids)`` (the consumer's per-step logits) with neoformer's on the decoder probe."""
    ids = probe_ids(source.cfg.vocab_size, PREFILL + DECODE_STEPS)
    reference = decoder_reference(source.model, ids)
    diff = max_abs_diff(reference, run(ids))
    check_tolerance(fmt, diff, dtype, scale=float(reference[0].abs().max()) if dtype != torch.float32 else 1.0)
    return diff, what
