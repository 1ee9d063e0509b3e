"""Objectives: ``objective(model, batch) -> (loss, stats)``; fit() knows nothing else about them.

``stats`` carries ``tokens`` (int: input tokens in the batch, for tokens/s), ``targets`` (tensor:
positions that count in the loss, to weight evaluation averages) and, for NeoFormer-X with RMC,
``delta`` (B, mem, D): the memory write that fit() applies after the optimizer step. Distillation
and fine-tuning plug in as further objectives with the same signature.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import IGNORE_INDEX
Objective = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]


def _field(batch: Any, *names: str, index: int | None = None):
    """A batch field by any of its names (dict or dataclass), or by position in a tuple."""
    if isinstance(batch, (tuple, list)):
        return batch[index] if index is not None and index < len(batch) else None
    for name in names:
        if isinstance(batch, dict) and name in batch:
            return batch[name]
        if hasattr(batch, name):
            return getattr(batch, name)
    return None


def _wants_memory_update(model: nn.Module) -> bool:
    return getattr(model, "rmc", None) is not None and model.training


def causal_lm(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy. Batch: (x, y) or {"input_ids", "targets" | "labels"}; RMC models
    run with ``update=True`` while training so fit() can apply the memory write."""
    x = _field(batch, "input_ids", index=0)
    y = _field(batch, "targets", "labels", index=1)
    kwargs = {}
    mask = _field(batch, "attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = mask
    loss, stats = model.loss(x, y, update=_wants_memory_update(model), **kwargs)
    return loss, {"tokens": x.numel(), "targets": (y != IGNORE_INDEX).sum(), "ce": stats.get("ce"),
                  "delta": stats.get("delta")}


def masked_lm(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
    """BERT masked-LM loss on positions whose label is not -100.
    Batch: (input_ids, labels) or {"input_ids", "labels", "attention_mask"?, "cu_seqlens"?}."""
    x = _field(batch, "input_ids", index=0)
    labels = _field(batch, "labels", index=1)
    mask = _field(batch, "attention_mask")
    cu = _field(batch, "cu_seqlens")
    kwargs = {"cu_seqlens": cu} if cu is not None else {}
    loss, stats = model.loss(x, labels, attention_mask=mask, **kwargs)
    return loss, {"tokens": x.numel(), "targets": (labels != IGNORE_INDEX).sum(), "ce": stats.get("ce")}


def seq2seq(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
    """Teacher-forced cross-entropy of the target given the source.
    Batch: a Seq2SeqBatch / dict with src_ids, src_mask, tgt_in, tgt_out (or a 4-tuple)."""
    src = _field(batch, "src_ids", index=0)
    src_mask = _field(batch, "src_mask", index=1)
    tgt_in = _field(batch, "tgt_in", index=2)
    tgt_out = _field(batch, "tgt_out", index=3)
    loss, stats = model.loss(src, tgt_in, tgt_out, src_mask=src_mask)
    return loss, {"tokens": src.numel() + tgt_in.numel(), "targets": (tgt_out != IGNORE_INDEX).sum(),
                  "ce": stats.get("ce")}


OBJECTIVES: dict[str, Objective] = {"causal_lm": causal_lm, "mlm": masked_lm, "seq2seq": seq2seq}
# objectives built around extra state (a teacher): name -> "module:factory", imported on first use
OBJECTIVE_FACTORIES: dict[str, str] = {"distill": "neoformer.train.distill:distillation"}


def objective_for(kind_or_model) -> Objective:
    """The default objective of a model kind (its registration in neoformer/kinds.py): decoder ->
    causal LM, encoder -> MLM, encoder_decoder -> seq2seq. Takes a kind name, config or model."""
    from ..kinds import get

    return get(kind_or_model).load("objective")


__all__ = ["Objective", "causal_lm", "masked_lm", "seq2seq", "OBJECTIVES", "OBJECTIVE_FACTORIES", "objective_for"]
