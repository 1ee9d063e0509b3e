"""Tokenize a corpus once; keep the ids on disk as a memory-mapped array that later runs reuse.

Cache layout under ``cache_dir`` (default ``$NEOFORMER_CACHE`` or ``~/.cache/neoformer``)::

    tokens/<key>.bin           every document's ids followed by EOS, uint16 (vocab <= 65536) or uint32
    tokens/<key>.offsets.npy   int64 start of each document (n_docs + 1 entries)
    tokens/<key>.json          metadata, written last: a cache entry exists once this file does
    tokenizers/<key>/          trained tokenizers, so "bpe" is trained once per corpus

``key`` hashes the source identity (paths, sizes, mtimes, split) and the tokenizer fingerprint,
so editing a file or changing the vocabulary makes a new entry. Every file is written to a
temporary name and moved into place with ``os.replace``: a crash never leaves a half entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..tokenizer import MAX_TRAINING_CHARS, TRAINABLE_KINDS, Tokenizer, get_tokenizer, load_tokenizer
from .sources import VAL_FRACTION, Corpus, DataError, load_documents

log = logging.getLogger(__name__)

CACHE_ENV = "NEOFORMER_CACHE"
CACHE_FORMAT = 1


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$NEOFORMER_CACHE``, else ``~/.cache/neoformer``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "neoformer"
    return Path(chosen).expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass
class TokenizedCorpus:
    """Token ids of a corpus. Document ``i`` is ``tokens[doc_offsets[i]:doc_offsets[i + 1]]``,
    its last id being the EOS that separates it from the next document."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    eos_id: int
    vocab_size: int
    path: Path | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, index: int, with_eos: bool = False) -> np.ndarray:
        start, end = int(self.doc_offsets[index]), int(self.doc_offsets[index + 1])
        return np.asarray(self.tokens[start : end if with_eos else end - 1])

    def documents(self, with_eos: bool = False) -> Iterator[np.ndarray]:
        return (self.document(i, with_eos) for i in range(len(self)))


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, *map(str, parts)]).encode()).hexdigest()[:24]


def _load_tokens(meta_path: Path) -> TokenizedCorpus | None:
    """The cached entry, or None (with a warning) if it is unreadable."""
    stem = meta_path.with_suffix("")
    try:
        meta = json.loads(meta_path.read_text())
        dtype, count = np.dtype(meta["dtype"]), meta["num_tokens"]
        offsets = np.load(f"{stem}.offsets.npy")
        if count == 0:
            tokens = np.zeros(0, dtype)
        else:
            tokens = np.memmap(f"{stem}.bin", dtype=dtype, mode="r", shape=(count,))
        if int(offsets[-1]) != count:
            raise ValueError("offsets do not match the token count")
    except (OSError, ValueError, KeyError) as error:
        log.warning("ignoring unreadable token cache %s (%s); rebuilding it", meta_path, error)
        return None
    return TokenizedCorpus(tokens, offsets, meta["eos_id"], meta["vocab_size"], meta_path)


def _write_tokens(stem: Path, corpus: Corpus, tokenizer: Tokenizer, batch_docs: int) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    offsets = [0]

    def write_bin(path: Path) -> None:
        documents = iter(corpus)
        with path.open("wb") as out:
            while batch := list(islice(documents, batch_docs)):  # streams: never the whole corpus in memory
                for ids in tokenizer.encode_batch(batch):
                    array = np.asarray([*ids, tokenizer.eos_id], dtype=np.int64)
                    if array.min() < 0 or array.max() >= tokenizer.vocab_size:
                        bad = int(array.max() if array.max() >= tokenizer.vocab_size else array.min())
                        raise DataError(f"tokenizer produced id {bad} outside its vocab ({tokenizer.vocab_size})")
                    out.write(array.astype(dtype).tobytes())
                    offsets.append(offsets[-1] + len(array))

    def write_offsets(path: Path) -> None:
        with path.open("wb") as out:  # a file object, so np.save does not append ".npy" to the name
            np.save(out, np.asarray(offsets, dtype=np.int64))

    _atomic_write(Path(f"{stem}.bin"), write_bin)
    _atomic_write(Path(f"{stem}.offsets.npy"), write_offsets)
    meta = {
        "format": CACHE_FORMAT, "dtype": dtype.name, "num_tokens": offsets[-1], "num_documents": len(offsets) - 1,
        "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
        "source": corpus.identity, "split": corpus.split, "tokenizer": tokenizer.fingerprint,
    }  # fmt: skip
    _atomic_write(Path(f"{stem}.json"), lambda p: p.write_text(json.dumps(meta, indent=2)))


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None, *,
    use_cache: bool = True, batch_docs: int = 64,
) -> TokenizedCorpus:  # fmt: skip
    """Token ids of ``corpus``, from the cache when this (source, tokenizer) pair was seen before."""
    directory = default_cache_dir(cache_dir) / "tokens"
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / cache_key(corpus.identity, tokenizer.fingerprint, tokenizer.eos_id)
    meta_path = Path(f"{stem}.json")
    if use_cache and meta_path.exists() and (cached := _load_tokens(meta_path)) is not None:
        log.info("token cache hit: %s (%d tokens)", meta_path, cached.num_tokens)
        return cached
    log.info("tokenizing %s [%s] with %r", corpus.name, corpus.split, tokenizer)
    _write_tokens(stem, corpus, tokenizer, batch_docs)
    loaded = _load_tokens(meta_path)
    if loaded is None:
        raise DataError(f"could not read back the token cache just written to {meta_path}; check the disk")
    return loaded


def prepare_tokenizer(
    spec: str | Tokenizer, corpus: Corpus, vocab_size: int = 8192, cache_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """A ready tokenizer: ``spec`` loaded, or trained on ``corpus`` once and reused from the cache."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec not in TRAINABLE_KINDS:
        return load_tokenizer(spec)
    size = 0 if spec == "char" else vocab_size  # the char vocabulary is the corpus alphabet
    key = cache_key(spec, size, corpus.identity, MAX_TRAINING_CHARS)
    directory = default_cache_dir(cache_dir) / "tokenizers" / key
    if directory.is_dir():
        return load_tokenizer(directory)
    log.info("training a %s tokenizer (vocab %d) on %s", spec, size, corpus.name)
    tokenizer = get_tokenizer(spec, corpus, vocab_size)
    temporary = directory.with_name(f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tokenizer.save(temporary)
    try:
        os.replace(temporary, directory)
    except OSError:  # another process saved the same tokenizer first; theirs is identical
        shutil.rmtree(temporary, ignore_errors=True)
    return tokenizer


@dataclass
class PreparedData:
    """What a training run needs from the data side."""

    tokenizer: Tokenizer
    train: TokenizedCorpus
    val: TokenizedCorpus
    train_corpus: Corpus
    val_corpus: Corpus


def prepare_data(
    source: str = "stdlib", tokenizer: str | Tokenizer = "bpe", vocab_size: int = 8192, *,
    cache_dir: str | os.PathLike | None = None, val_fraction: float = VAL_FRACTION, text_field: str = "text",
    hf_config: str | None = None,
) -> PreparedData:  # fmt: skip
    """Load ``source``, get the tokenizer (trained on the train split only) and tokenize both splits."""
    options = dict(val_fraction=val_fraction, text_field=text_field, hf_config=hf_config)
    train_corpus = load_documents(source, "train", **options)
    val_corpus = load_documents(source, "val", **options)
    tok = prepare_tokenizer(tokenizer, train_corpus, vocab_size, cache_dir)
    train = tokenize_corpus(train_corpus, tok, cache_dir)
    val = tokenize_corpus(val_corpus, tok, cache_dir)
    return PreparedData(tok, train, val, train_corpus, val_corpus)
