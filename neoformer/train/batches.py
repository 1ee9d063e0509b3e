"""From a run config to batches: the glue between neoformer.data and fit(), one builder per model
kind (registered in neoformer/kinds.py; ``build_task_data`` / ``build_eval_batches`` look it up).

* causal LM (kind=decoder): packed windows of ``seq_len`` tokens (``data.make_sampler``).
* MLM (kind=encoder): the same windows, BERT-masked (``data.MLMMasker``; 15% by default).
* seq2seq (kind=encoder_decoder): (source, target) pairs from a ``.tsv`` / ``.jsonl`` pair file,
  or -- for plain text such as the default stdlib corpus -- a synthetic task built from its lines:
  ``next_line`` (source = a line, target = the next non-empty line of the same file) or
  ``reverse`` (target = the line reversed). Pairs are length-bucketed (``data.BucketSampler``).

Every training batch source has ``state_dict`` / ``load_state_dict`` so fit() checkpoints its
position; validation sources are zero-argument callables giving the same batches every time.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..data import (
    BucketSampler, CausalWindows, Corpus, DataError, MLMMasker, Seq2SeqDataset, load_documents, load_pairs,
    make_sampler, prepare_data, sequential_batches,
)
from ..data.pipelines import prepare_tokenizer
from ..tokenizer import BPE_MIN_VOCAB, Tokenizer
from ..kinds import get as model_kind
from .objectives import Objective
from .run_config import RunConfig

log = logging.getLogger(__name__)
VAL_PAIRS = 2000  # validation pairs kept for seq2seq
DEBUG_BPE_VOCAB = 512  # default BPE size for models whose vocabulary is below byte-level BPE's minimum


@dataclass
class TaskData:
    """What `neoformer train` hands to fit()."""

    tokenizer: Tokenizer
    objective: Objective | None  # the model kind's (set by build_task_data)
    train: Any  # iterator of batches with state_dict / load_state_dict
    val: Callable[[], Iterable] | None
    train_size: int  # tokens (LM, MLM) or pairs (seq2seq) in the train split, for --epochs
    description: str
    row_tokens: int | None = None  # tokens per batch row (fixed windows), None when rows vary (pairs)


class MaskedBatches:
    """Windows from a sampler, BERT-masked: {"input_ids", "labels"}. Resumable (sampler + masker RNG)."""

    def __init__(self, sampler, masker: MLMMasker):
        self.sampler, self.masker = sampler, masker

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        x, _ = next(self.sampler)
        inputs, labels = self.masker(x)
        return {"input_ids": inputs, "labels": labels}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "masker": self.masker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.masker.load_state_dict(state["masker"])


class PairBatches:
    """Length-bucketed seq2seq batches (Seq2SeqBatch) over a dataset. Resumable."""

    def __init__(self, dataset: Seq2SeqDataset, batch_size: int, seed: int):
        self.dataset = dataset
        self.sampler = BucketSampler(dataset.lengths, batch_size=batch_size, seed=seed)

    def __iter__(self):
        return self

    def __next__(self):
        return self.dataset.collate(next(self.sampler))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


# ---- seq2seq pairs ---------------------------------------------------------------------------
def is_pair_file(spec: str) -> bool:
    """A ``.tsv`` file, or a ``.jsonl`` whose first record has "source" and "target"."""
    path = Path(spec).expanduser()
    if not path.is_file():
        return False
    if path.suffix == ".tsv":
        return True
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return False
                    return isinstance(record, dict) and "source" in record and "target" in record
    return False


def text_pairs(documents: Iterable[str], task: str, limit: int) -> list[tuple[str, str]]:
    """Synthetic pairs from the non-empty lines of each document (see the module docstring)."""
    pairs: list[tuple[str, str]] = []
    for doc in documents:
        lines = [line.rstrip() for line in doc.splitlines() if line.strip()]
        if task == "reverse":
            pairs.extend((line, line[::-1]) for line in lines)
        else:
            pairs.extend(zip(lines, lines[1:]))
        if len(pairs) >= limit:
            return pairs[:limit]
    return pairs


def _pairs_corpus(name: str, pairs: list[tuple[str, str]]) -> Corpus:
    digest = hashlib.sha256(json.dumps(pairs[:1000] + [len(pairs)]).encode()).hexdigest()[:20]
    return Corpus(name, "train", [f"{s}\n{t}" for s, t in pairs], f"pairs:{name}@{digest}")


def _split_pairs(pairs: list[tuple[str, str]], val_fraction: float) -> tuple[list, list]:
    if len(pairs) < 2:
        raise DataError(f"need at least 2 (source, target) pairs to split train/val, got {len(pairs)}")
    n_val = max(1, int(len(pairs) * val_fraction))
    return pairs[:-n_val], pairs[-n_val:]


def seq2seq_data(run: RunConfig, tokenizer_spec) -> TaskData:
    """kind=encoder_decoder: length-bucketed (source, target) pairs."""
    d, t, seq_len = run.data, run.train, run.seq_len
    if is_pair_file(d.source):
        train_pairs, val_pairs = _split_pairs(load_pairs(d.source), d.val_fraction)
        what = f"pairs from {d.source}"
    else:
        options = dict(val_fraction=d.val_fraction, text_field=d.text_field)
        train_docs = load_documents(d.source, "train", **options)
        val_docs = load_documents(d.source, "val", **options)
        train_pairs = text_pairs(train_docs, d.seq2seq_task, d.max_pairs)
        val_pairs = text_pairs(val_docs, d.seq2seq_task, VAL_PAIRS)
        what = f"synthetic {d.seq2seq_task} pairs from {d.source}"
        if not train_pairs or (not val_pairs and d.val_fraction):
            raise DataError(f"{d.source} gives no {d.seq2seq_task} pairs; it needs files with several non-empty lines")
    tokenizer = prepare_tokenizer(tokenizer_spec, _pairs_corpus(d.source, train_pairs), _vocab_size(run), d.cache_dir)
    train_set = Seq2SeqDataset(train_pairs, tokenizer, seq_len, seq_len)
    val_set = Seq2SeqDataset(val_pairs[:VAL_PAIRS], tokenizer, seq_len, seq_len)
    desc = f"seq2seq: {len(train_set):,} train / {len(val_set):,} val {what}"
    val = (lambda: _pair_batches(val_set, t.batch_size)) if len(val_set) else None  # val_fraction 0: none
    return TaskData(tokenizer, None, PairBatches(train_set, t.batch_size, t.seed), val, len(train_set), desc,
                    row_tokens=None)


def _pair_batches(dataset: Seq2SeqDataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        yield dataset.collate(range(start, min(start + batch_size, len(dataset))))


def seq2seq_eval_batches(run: RunConfig, tokenizer: Tokenizer, split: str) -> Callable[[], Iterable]:
    d = run.data
    if is_pair_file(d.source):
        train_pairs, val_pairs = _split_pairs(load_pairs(d.source), d.val_fraction)
        pairs = {"train": train_pairs, "val": val_pairs, "all": train_pairs + val_pairs}[split]
    else:
        docs = load_documents(d.source, split, val_fraction=d.val_fraction, text_field=d.text_field)
        pairs = text_pairs(docs, d.seq2seq_task, d.max_pairs)
    dataset = Seq2SeqDataset(pairs, tokenizer, run.seq_len, run.seq_len)
    return lambda: _pair_batches(dataset, run.train.batch_size)


# ---- token streams (causal LM, MLM) ----------------------------------------------------------
def _windows_or_none(tokens, seq_len: int, split: str) -> CausalWindows | None:
    try:
        return CausalWindows(tokens, seq_len)
    except DataError as err:
        if split == "train":
            raise
        log.warning("no validation: %s", err)
        return None


@dataclass
class _Windows:
    """A token stream cut into ``seq_len`` windows (causal LM and MLM share it)."""

    tokenizer: Tokenizer
    sampler: Any
    val: CausalWindows | None
    train_tokens: int
    split: str  # "N train / M val tokens of SOURCE"


def _token_windows(run: RunConfig, tokenizer_spec) -> _Windows:
    d, t = run.data, run.train
    data = prepare_data(d.source, tokenizer=tokenizer_spec, vocab_size=_vocab_size(run), cache_dir=d.cache_dir,
                        val_fraction=d.val_fraction, text_field=d.text_field)
    train_windows = _windows_or_none(data.train, run.seq_len, "train")
    sampler = make_sampler(train_windows, t.batch_size, t.sampler, t.seed)
    split = f"{data.train.num_tokens:,} train / {data.val.num_tokens:,} val tokens of {d.source}"
    val = _windows_or_none(data.val, run.seq_len, "val") if d.val_fraction else None  # 0 = no validation
    return _Windows(data.tokenizer, sampler, val, data.train.num_tokens, split)


def causal_lm_data(run: RunConfig, tokenizer_spec) -> TaskData:
    """kind=decoder: packed windows of ``seq_len`` tokens."""
    w, batch = _token_windows(run, tokenizer_spec), run.train.batch_size
    val = (lambda: sequential_batches(w.val, batch)) if w.val is not None else None
    return TaskData(w.tokenizer, None, w.sampler, val, w.train_tokens, f"causal LM: {w.split}", run.seq_len)


def causal_lm_eval_batches(run: RunConfig, tokenizer: Tokenizer, split: str) -> Callable[[], Iterable]:
    windows = _eval_windows(run, tokenizer, split)
    return lambda: sequential_batches(windows, run.train.batch_size)


def masked_lm_data(run: RunConfig, tokenizer_spec) -> TaskData:
    """kind=encoder: the same windows, BERT-masked."""
    d, t = run.data, run.train
    w = _token_windows(run, tokenizer_spec)
    train = MaskedBatches(w.sampler, MLMMasker.from_tokenizer(w.tokenizer, d.mask_prob, seed=t.seed))

    def val():
        val_masker = MLMMasker.from_tokenizer(w.tokenizer, d.mask_prob, seed=t.seed + 1)
        return MaskedBatches(iter(sequential_batches(w.val, t.batch_size)), val_masker)

    desc = f"masked LM ({d.mask_prob:.0%} masked): {w.split}"
    return TaskData(w.tokenizer, None, train, val if w.val is not None else None, w.train_tokens, desc, run.seq_len)


def masked_lm_eval_batches(run: RunConfig, tokenizer: Tokenizer, split: str) -> Callable[[], Iterable]:
    windows, t = _eval_windows(run, tokenizer, split), run.train
    return lambda: MaskedBatches(iter(sequential_batches(windows, t.batch_size)),
                                 MLMMasker.from_tokenizer(tokenizer, run.data.mask_prob, seed=t.seed + 1))


def _eval_windows(run: RunConfig, tokenizer: Tokenizer, split: str) -> CausalWindows:
    from ..data import tokenize_corpus

    d = run.data
    corpus = load_documents(d.source, split, val_fraction=d.val_fraction, text_field=d.text_field)
    return CausalWindows(tokenize_corpus(corpus, tokenizer, d.cache_dir), run.seq_len)


def _vocab_size(run: RunConfig) -> int:
    size = run.tokenizer.vocab_size or run.model.vocab_size
    if run.tokenizer.kind == "bpe" and run.tokenizer.vocab_size is None and size < BPE_MIN_VOCAB:
        return DEBUG_BPE_VOCAB  # a debug preset's tiny vocabulary: the model follows the tokenizer
    return size


# ---- what the CLI calls: the model kind picks the builders (neoformer/kinds.py) -------------------
def build_task_data(run: RunConfig, tokenizer: str | Tokenizer | None = None) -> TaskData:
    """Tokenizer, objective and batch sources for ``run`` (the tokenizer is trained when needed)."""
    kind = model_kind(run.model)
    task = kind.load("train_data")(run, tokenizer if tokenizer is not None else run.tokenizer.kind)
    task.objective = kind.load("objective")
    return task


def build_eval_batches(run: RunConfig, tokenizer: Tokenizer, split: str = "val") -> Callable[[], Iterable]:
    """Sequential batches of one split of ``run.data.source``, tokenized with ``tokenizer``."""
    return model_kind(run.model).load("eval_batches")(run, tokenizer, split)


def steps_for_epochs(epochs: float, task: TaskData, run: RunConfig) -> int:
    """Optimizer steps that cover ``epochs`` passes over the train split."""
    per_step = run.train.batch_size * run.train.grad_accum * (task.row_tokens or 1)
    return max(1, int(np.ceil(epochs * task.train_size / per_step)))


__all__ = ["TaskData", "build_task_data", "build_eval_batches", "MaskedBatches", "PairBatches", "text_pairs",
           "is_pair_file", "steps_for_epochs", "causal_lm_data", "masked_lm_data", "seq2seq_data",
           "causal_lm_eval_batches", "masked_lm_eval_batches", "seq2seq_eval_batches"]
