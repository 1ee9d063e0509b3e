"""What a fine-tuning run trains, per model kind: its data, batches and objective.

* decoder: text, Alpaca or chat data (neoformer.finetune.data), next-token loss on the trained
  tokens (assistant replies by default), packed rows.
* encoder (NeoBERT-style MLM): text data (``.txt`` windows or ``{"text"}`` records), BERT masking
  (15% of the ordinary tokens: 80% ``<mask>``, 10% random, 10% kept; neoformer.data.encoder),
  packed rows with ``cu_seqlens`` (the varlen path) or padded rows. The masks of a batch come from
  ``seed``, the epoch and the batch position, so a resumed run masks exactly as the straight one
  and validation sees the same masks at every evaluation.
* encoder-decoder: pairs, ``{"source", "target"}`` or Alpaca (instruction + input -> output)
  records; teacher-forced loss on the target (neoformer.data.seq2seq batches).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..chat import ChatError, chat_template_of
from ..data import DataError
from ..data.encoder import MLMMasker
from ..data.seq2seq import Seq2SeqDataset
from ..train.objectives import masked_lm, seq2seq
from .data import (
    DataReport, SFTBatches, _records, alpaca_messages, detect_format, load_examples, sft_objective,
    split_examples,
)


@dataclass
class Task:
    objective: Callable
    train: SFTBatches
    val: Callable[[], SFTBatches] | None  # a fresh pass over the validation examples
    report: DataReport
    held_out: int  # validation examples
    settings: dict[str, Any]  # recorded in the checkpoint's config.json ("finetune")
    chat_template: dict | None  # decoders: the template the data was rendered with


class MLMBatches(SFTBatches):
    """Text examples as masked-LM batches; the masks are a function of (seed, epoch, position)."""

    def __init__(self, examples, batch_size, seq_len, *, masker: MLMMasker, **kw):
        super().__init__(examples, batch_size, seq_len, **kw)
        self.masker = masker

    def collate(self, indices):
        batch = super().collate(indices)
        self.masker.generator.manual_seed(zlib.crc32(f"{self.seed}/{self.epoch}/{self.position}".encode()))
        inputs, labels = self.masker(batch["input_ids"])
        out = {"input_ids": inputs, "labels": labels}
        out.update({k: batch[k] for k in ("attention_mask", "cu_seqlens") if k in batch})
        return out


class PairBatches(SFTBatches):
    """Shuffled batches of (source, target) pairs, collated by Seq2SeqDataset (padded)."""

    def __init__(self, indices: list[int], batch_size: int, dataset: Seq2SeqDataset, **kw):
        super().__init__(indices, batch_size, 0, packed=False, **kw)
        self.dataset = dataset

    def collate(self, indices):
        return self.dataset.collate([self.examples[i] for i in indices])


def _split(examples: list, val_fraction: float, seed: int, make: Callable[..., SFTBatches]):
    train, val = split_examples(examples, val_fraction, seed)
    return make(train, shuffle=True), ((lambda: make(val, shuffle=False)) if val else None), len(val)


def decoder_task(data, model, tokenizer, base_config, *, seq_len, train_on, pack, val_fraction, batch_size, seed,
                 **_) -> Task:
    template = chat_template_of(base_config)
    examples, report = load_examples(data, tokenizer, template, seq_len, train_on)
    # the NeoFormer-X memory reads a running summary across the whole row: no packing there
    packed = pack and getattr(model, "rmc", None) is None
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train, val, held_out = _split(examples, val_fraction, seed, lambda part, shuffle: SFTBatches(
        part, batch_size, seq_len, packed=packed, pad_id=pad_id, seed=seed, shuffle=shuffle))
    return Task(sft_objective, train, val, report, held_out,
                {"format": report.format, "train_on": train_on, "seq_len": seq_len, "packed": packed},
                template.to_dict())


def encoder_task(data, model, tokenizer, base_config, *, seq_len, pack, val_fraction, batch_size, seed,
                 mask_prob, **_) -> Task:
    fmt = detect_format(Path(data).expanduser()) if Path(data).expanduser().is_file() else "text"
    if fmt != "text":
        raise DataError(f"{data}: an encoder fine-tunes with masked-LM on text (.txt, or JSONL {{\"text\"}} "
                        f"records), not {fmt} data; chat and Alpaca data need a decoder or encoder-decoder")
    examples, report = load_examples(data, tokenizer, chat_template_of(base_config), seq_len, "all")
    masker = MLMMasker.from_tokenizer(tokenizer, mask_prob, seed)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train, val, held_out = _split(examples, val_fraction, seed, lambda part, shuffle: MLMBatches(
        part, batch_size, seq_len, masker=masker, packed=pack, pad_id=pad_id, seed=seed, shuffle=shuffle))
    report.format = "text (masked LM)"
    return Task(masked_lm, train, val, report, held_out,
                {"format": "text", "objective": "mlm", "mask_prob": mask_prob, "seq_len": seq_len, "packed": pack},
                None)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(source, target) of every ``{"source", "target"}`` or Alpaca record; bad ones -> one line."""
    pairs = []
    for number, record in _records(path):
        if isinstance(record, dict) and "instruction" in record:
            try:
                prompt, reply = alpaca_messages(record)
            except ChatError as err:
                raise DataError(f"{path}:{number}: {err}") from None
            pairs.append((prompt["content"], reply["content"]))
        elif isinstance(record, dict) and isinstance(record.get("source"), str) and isinstance(record.get("target"), str):
            pairs.append((record["source"], record["target"]))
        else:
            raise DataError(f"{path}:{number}: an encoder-decoder fine-tunes on {{\"source\", \"target\"}} or "
                            "Alpaca {\"instruction\", \"input\", \"output\"} records (strings)")
        if not pairs[-1][1].strip():
            raise DataError(f"{path}:{number}: the target is empty")
    return pairs


def encoder_decoder_task(data, model, tokenizer, base_config, *, seq_len, val_fraction, batch_size, seed,
                         **_) -> Task:
    path = Path(data).expanduser()
    if not path.is_file() or path.suffix != ".jsonl":
        raise DataError(f"{data}: an encoder-decoder fine-tunes on a .jsonl file of {{\"source\", \"target\"}} "
                        "(or Alpaca) records")
    pairs = read_pairs(path)
    dataset = Seq2SeqDataset(pairs, tokenizer, max_source_len=1 << 30, max_target_len=1 << 30)
    report = DataReport(str(path), "pairs")
    for index, (source, target) in enumerate(dataset.examples):  # room for EOS / the start token
        if max(len(source), len(target)) > seq_len - 1:
            report.truncated += 1
            dataset.examples[index] = (source[:seq_len - 1], target[:seq_len - 1])
        report.examples += 1
        report.tokens += sum(map(len, dataset.examples[index])) + 2
        report.trained_tokens += len(dataset.examples[index][1]) + 1
    train, val, held_out = _split(list(range(len(dataset))), val_fraction, seed, lambda part, shuffle: PairBatches(
        part, batch_size, dataset, seed=seed, shuffle=shuffle))
    return Task(seq2seq, train, val, report, held_out, {"format": "pairs", "objective": "seq2seq",
                                                       "seq_len": seq_len}, None)


TASKS = {"decoder": decoder_task, "encoder": encoder_task, "encoder_decoder": encoder_decoder_task}


def build_task(kind: str, data, model, tokenizer, base_config, **settings) -> Task:
    if kind not in TASKS:
        raise ValueError(f"neoformer finetune handles {', '.join(TASKS)} checkpoints, not {kind!r}")
    if kind != "decoder" and settings.get("train_on") == "all":
        raise ValueError("--train-on applies to decoder data; an encoder trains its masked tokens and an "
                         "encoder-decoder its targets")
    return TASKS[kind](data, model, tokenizer, base_config, **settings)


__all__ = ["Task", "MLMBatches", "PairBatches", "TASKS", "build_task", "read_pairs"]
