"""Fine-tuning data: plain text, instruction JSONL (Alpaca) and chat JSONL, as token examples with
a loss mask, packed into batches without cross-contamination.

Formats (picked from the file: ``.jsonl`` by the keys of its first record, anything else is text):

* plain text (``.txt``, or JSONL records ``{"text": ...}``): continued pretraining, every token trained;
  a text file is cut into ``seq_len`` windows.
* Alpaca (``{"instruction", "input"?, "output"}``): rendered as a two-turn chat (user: instruction
  and input; assistant: output), so an instruction model speaks the same template as a chat one.
* chat (``{"messages": [{"role", "content"}, ...]}``, multi-turn): rendered with the checkpoint's
  chat template (neoformer.chat); by default only assistant replies (their end marker included)
  are trained (``train_on="all"``: every token).

The template's character spans become token positions by encoding the text piece by piece, cut
at the span edges: each assistant reply starts a fresh token, exactly as at inference time, where
the prompt ends at ``<|im_start|>assistant\\n`` and the model continues from there.

Batches: by default examples are packed into one row of up to ``batch_size * seq_len`` tokens
with ``cu_seqlens``, which the decoder's packed attention path turns into per-document positions
and a block-diagonal mask (no token sees another example). Models with state that crosses
documents (the NeoFormer-X memory) get padded batches instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..chat import ChatError, ChatTemplate
from ..config import IGNORE_INDEX
from ..data import DataError

TRAIN_ON = ("assistant", "all")


@dataclass
class Example:
    ids: np.ndarray  # (T,) int64 token ids
    trained: np.ndarray  # (T,) bool: token t is a loss target (predicted from tokens < t)


@dataclass
class DataReport:
    path: str
    format: str  # text | alpaca | chat
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0  # examples cut to seq_len
    dropped: int = 0  # examples left with no trained token after truncation
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = (f"{self.format} data {self.path}: {self.examples:,} examples, {self.tokens:,} tokens "
                f"({self.trained_tokens:,} trained)")
        if self.truncated:
            text += f"; {self.truncated} truncated to seq_len"
        if self.dropped:
            text += f"; {self.dropped} dropped (nothing left to train after truncation)"
        return text


# ---- one example ---------------------------------------------------------------------------
def alpaca_messages(record: dict) -> list[dict[str, str]]:
    """An Alpaca record as a user/assistant exchange."""
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise ChatError(f"an instruction record needs a string {key!r}")
    prompt = record["instruction"]
    if isinstance(record.get("input"), str) and record["input"].strip():
        prompt += "\n\n" + record["input"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def chat_example(messages: Any, template: ChatTemplate, tokenizer, train_on: str = "assistant") -> Example:
    """Token ids of a rendered conversation and which of them are trained."""
    text, spans = template.assistant_spans(messages)
    if not spans and train_on == "assistant":
        raise ChatError("the conversation has no assistant turn (nothing to train)")
    for message in messages:
        if message["role"] == "assistant" and not message["content"].strip():
            raise ChatError("an assistant turn is empty")
    cuts = sorted({0, len(text), *(edge for span in spans for edge in span)})
    inside = {start for start, _ in spans}
    ids: list[int] = []
    trained: list[bool] = []
    for start, end in zip(cuts, cuts[1:]):
        piece = tokenizer.encode(text[start:end])
        ids += piece
        trained += [train_on == "all" or start in inside] * len(piece)
    if trained:
        trained[0] = False  # the first token has nothing to be predicted from
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool))


def text_example(text: str, tokenizer) -> Example:
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    trained = np.ones(len(ids), dtype=bool)
    trained[:1] = False
    return Example(ids, trained)


# ---- files -------------------------------------------------------------------------------------
def _records(path: Path) -> Iterable[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not a JSON object ({err.msg}); one JSON record per line") from None


def detect_format(path: Path) -> str:
    if path.suffix != ".jsonl":
        return "text"
    for number, record in _records(path):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if "messages" in record:
            return "chat"
        if "instruction" in record:
            return "alpaca"
        if "text" in record:
            return "text"
        raise DataError(f"{path}:{number}: a record needs 'messages' (chat), 'instruction'/'output' (Alpaca) "
                        "or 'text'")
    raise DataError(f"{path} holds no records")


def _example_of(record: Any, fmt: str, template: ChatTemplate, tokenizer, train_on: str) -> Example:
    if not isinstance(record, dict):
        raise ChatError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        if not isinstance(record.get("text"), str):
            raise ChatError("a text record needs a string 'text'")
        return text_example(record["text"], tokenizer)
    messages = alpaca_messages(record) if fmt == "alpaca" else record.get("messages")
    return chat_example(messages, template, tokenizer, train_on)


def _fit_length(example: Example, seq_len: int, report: DataReport) -> Example | None:
    if len(example.ids) > seq_len:
        report.truncated += 1
        example = Example(example.ids[:seq_len], example.trained[:seq_len])
    if not example.trained.any():
        report.dropped += 1
        return None
    report.examples += 1
    report.tokens += len(example.ids)
    report.trained_tokens += int(example.trained.sum())
    return example


def load_examples(path: str | Path, tokenizer, template: ChatTemplate, seq_len: int,
                  train_on: str = "assistant") -> tuple[list[Example], DataReport]:
    """Every example of a data file, at most ``seq_len`` tokens each; bad records -> one DataError
    line naming the file and line number."""
    if train_on not in TRAIN_ON:
        raise DataError(f"--train-on {train_on!r} must be one of: {', '.join(TRAIN_ON)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    fmt = detect_format(path)
    report = DataReport(str(path), fmt)
    examples = []
    if path.suffix != ".jsonl":  # a text file: windows of seq_len tokens
        ids = np.asarray(tokenizer.encode(path.read_text(encoding="utf-8")), dtype=np.int64)
        for start in range(0, max(len(ids) - 1, 0), seq_len):
            trained = np.ones(len(ids[start:start + seq_len]), dtype=bool)
            trained[0] = False
            example = _fit_length(Example(ids[start:start + seq_len], trained), seq_len, report)
            examples += [example] if example is not None else []
    else:
        for number, record in _records(path):
            try:
                example = _example_of(record, fmt, template, tokenizer, train_on)
            except ChatError as err:
                raise DataError(f"{path}:{number}: {err}") from None
            example = _fit_length(example, seq_len, report)
            examples += [example] if example is not None else []
    if not examples:
        raise DataError(f"{path} gives no trainable example ({report.describe()})")
    return examples, report


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the last ``val_fraction`` (at least one when there are >= 20) as validation."""
    if val_fraction <= 0 or len(examples) < 20:
        return examples, []
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(1, int(len(examples) * val_fraction))
    return [examples[i] for i in order[:-n_val]], [examples[i] for i in order[-n_val:]]


# ---- batches -------------------------------------------------------------------------------
def _targets(example: Example) -> np.ndarray:
    """Next-token targets: position t predicts token t+1 when that one is trained."""
    targets = np.full(len(example.ids), IGNORE_INDEX, dtype=np.int64)
    targets[:-1] = np.where(example.trained[1:], example.ids[1:], IGNORE_INDEX)
    return targets


def packed_batch(examples: list[Example]) -> dict[str, torch.Tensor]:
    """One row of concatenated examples with ``cu_seqlens`` (the packed attention path)."""
    lengths = [len(e.ids) for e in examples]
    return {"input_ids": torch.from_numpy(np.concatenate([e.ids for e in examples]))[None],
            "targets": torch.from_numpy(np.concatenate([_targets(e) for e in examples]))[None],
            "cu_seqlens": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)}


def padded_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask (models whose state would cross packed documents)."""
    width = max(len(e.ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    targets = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=bool)
    for row, example in enumerate(examples):
        n = len(example.ids)
        ids[row, :n], targets[row, :n], mask[row, :n] = example.ids, _targets(example), True
    return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets),
            "attention_mask": torch.from_numpy(mask)}


def group_examples(examples: list[Example], order: Iterable[int], batch_size: int, seq_len: int,
                   packed: bool) -> list[list[int]]:
    """Indices per batch: packed rows hold up to ``batch_size * seq_len`` tokens, padded ones ``batch_size`` rows."""
    groups: list[list[int]] = [[]]
    used = 0
    for index in order:
        n = len(examples[index].ids) if packed else 0
        full = used + n > batch_size * seq_len if packed else len(groups[-1]) == batch_size
        if full and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(int(index))
        used += n
    return [g for g in groups if g]


class SFTBatches:
    """Endless epochs of shuffled, packed (or padded) batches. Resumable: ``state_dict`` is the
    epoch and the batch within it; each epoch's order comes from ``seed + epoch``."""

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, *, packed: bool = True,
                 pad_id: int = 0, seed: int = 0, shuffle: bool = True):
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.packed, self.pad_id, self.seed, self.shuffle = packed, pad_id, seed, shuffle
        self.epoch, self.position = 0, 0
        self._groups = self._epoch_groups()

    def _epoch_groups(self) -> list[list[int]]:
        n = len(self.examples)
        order = np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else range(n)
        return group_examples(self.examples, order, self.batch_size, self.seq_len, self.packed)

    def __iter__(self):
        return self

    def __len__(self) -> int:  # batches per epoch
        return len(self._groups)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._groups):
            if not self.shuffle:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
            self._groups = self._epoch_groups()
        group = self._groups[self.position]
        self.position += 1
        return self.collate(group)

    def collate(self, indices: list[int]):
        """The batch of these examples (subclasses build other objectives' batches)."""
        chosen = [self.examples[i] for i in indices]
        return packed_batch(chosen) if self.packed else padded_batch(chosen, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._groups = self._epoch_groups()


def sft_objective(model, batch) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy on the trained positions only (``targets`` is -100 elsewhere).
    The NeoFormer-X memory is read, never written (``update=False``): the base stays as it was."""
    x, y = batch["input_ids"], batch["targets"]
    kwargs = {k: batch[k] for k in ("attention_mask", "cu_seqlens") if k in batch}
    loss, stats = model.loss(x, y, update=False, **kwargs)
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else x.numel()
    return loss, {"tokens": tokens, "targets": (y != IGNORE_INDEX).sum(), "ce": stats.get("ce")}


__all__ = ["Example", "DataReport", "TRAIN_ON", "alpaca_messages", "chat_example", "text_example", "detect_format",
           "load_examples", "split_examples", "packed_batch", "padded_batch", "group_examples", "SFTBatches",
           "sft_objective"]
