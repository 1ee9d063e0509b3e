"""Tokenizers behind one small interface: char, byte-level BPE, SentencePiece and tiktoken.

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_id``, ``pad_id``, ``bos_id`` / ``mask_id`` (None where the kind has none) and
``save(directory)``; :func:`load_tokenizer` reloads any saved one (``tokenizer_meta.json``
names the kind). Text that merely *looks* like a special token (``"<|endoftext|>"`` typed in a
document) is encoded as plain text, so specials only ever come from the pipeline. ``decode``
drops special tokens. Nothing here touches the network.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib
import io
import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .config import did_you_mean
from .safepath import inside

META_FILE = "tokenizer_meta.json"
ENDOFTEXT = "<|endoftext|>"
PAD = "<pad>"
MASK = "<mask>"
BOS = "<bos>"
UNK = "<unk>"
# Trainers read at most this many characters; the stdlib corpus (~13 MB) fits whole and trains
# a BPE vocab in a couple of seconds on 2 cores. Larger corpora are truncated at a document edge.
MAX_TRAINING_CHARS = 32_000_000
TRAINABLE_KINDS = ("char", "bpe", "sentencepiece", "sentencepiece-bpe", "sentencepiece-unigram")
NAMED_ENCODINGS = ("cl100k_base", "gpt2")


class TokenizerError(ValueError):
    """A tokenizer cannot be built, loaded or used. The message says what to change."""


def _as_int_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        ids = ids.tolist()
    return [int(i) for i in ids]


def _optional_import(module: str):
    """Import an optional dependency (sentencepiece, tiktoken) or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TokenizerError(f"this tokenizer needs {module}: pip install 'neoformer[{module}]'") from None


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield whole texts until ``max_chars`` characters have been produced."""
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text


class Tokenizer(ABC):
    """The interface the data pipeline and the models rely on."""

    kind: str = ""
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    mask_id: int | None = None
    unk_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""

    @abstractmethod
    def _decode_ids(self, ids: list[int]) -> str:
        """Text of ids that are known not to be special."""

    @abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write the kind's own files; return extra fields for ``tokenizer_meta.json``."""

    @abstractmethod
    def _identity_bytes(self) -> bytes:
        """Everything that decides the ids this tokenizer produces."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; EOS, PAD, BOS and MASK are dropped (UNK shows as the kind renders it)."""
        skip = self.special_ids - {self.unk_id}
        return self._decode_ids([i for i in _as_int_list(ids) if i not in skip])

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that must never be masked, sampled as random replacements or decoded as text."""
        candidates = (self.eos_id, self.pad_id, self.bos_id, self.mask_id, self.unk_id)
        return frozenset(i for i in candidates if i is not None)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Stable hash of the vocabulary and settings; part of every token-cache key."""
        return hashlib.sha256(self.kind.encode() + b"\0" + self._identity_bytes()).hexdigest()[:16]

    @classmethod
    def from_saved(cls, directory: Path, meta: dict[str, Any]) -> "Tokenizer":
        """Rebuild from what :meth:`save` wrote (by default: one file named in the metadata)."""
        return cls.from_file(_saved_file(directory, meta))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "format_version": 1, "vocab_size": self.vocab_size}
        meta.update(self._save_files(directory))
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# ---- characters ------------------------------------------------------------------------------
class CharTokenizer(Tokenizer):
    """One id per character of the training text (sorted), after five special tokens.

    A character not seen at build time encodes to ``<unk>`` (decoded as U+FFFD) rather than
    raising, so a validation split may contain characters the training split lacks.
    """

    kind = "char"
    SPECIALS = (PAD, ENDOFTEXT, BOS, MASK, UNK)

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise TokenizerError("CharTokenizer needs single characters; got a longer string")
        self.pad_id, self.eos_id, self.bos_id, self.mask_id, self.unk_id = range(len(self.SPECIALS))
        first = len(self.SPECIALS)
        self._id_of = {c: first + i for i, c in enumerate(self.chars)}
        self.vocab_size = first + len(self.chars)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars = set().union(*texts)
        if not chars:
            raise TokenizerError("cannot build a char tokenizer from empty text; pass a non-empty corpus")
        return cls(chars)

    def encode(self, text: str) -> list[int]:
        get, unk = self._id_of.get, self.unk_id
        return [get(c, unk) for c in text]

    def _decode_ids(self, ids: list[int]) -> str:
        first, out = len(self.SPECIALS), []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the char vocabulary (size {self.vocab_size})")
            out.append("\ufffd" if i == self.unk_id else self.chars[i - first])
        return "".join(out)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def from_saved(cls, directory: Path, meta: dict[str, Any]) -> "CharTokenizer":
        return cls(meta["chars"])

    def _identity_bytes(self) -> bytes:
        return "".join(self.chars).encode("utf-8", "surrogatepass")


# ---- Hugging Face tokenizers (byte-level BPE, or any local tokenizer.json) ---------------------
_EOS_CANDIDATES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_PAD_CANDIDATES = (PAD, "<|pad|>", "[PAD]")
_BOS_CANDIDATES = ("<s>", BOS, "<|begin_of_text|>", "[CLS]")
_MASK_CANDIDATES = (MASK, "<|mask|>", "[MASK]")
_UNK_CANDIDATES = (UNK, "[UNK]")


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer``: our trained byte-level BPE or a local ``tokenizer.json``.

    EOS/PAD/BOS/MASK are found by their usual names; a tokenizer without an EOS gets
    ``<|endoftext|>`` added, and one without a pad token pads with EOS.
    """

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        # Specials typed inside documents stay plain text (exact round-trip, no injected EOS).
        self._tok.encode_special_tokens = True

        def first_id(names: tuple[str, ...]) -> int | None:
            return next((i for i in map(self._tok.token_to_id, names) if i is not None), None)

        if first_id(_EOS_CANDIDATES) is None:
            self._tok.add_special_tokens([ENDOFTEXT])
        self.eos_id = first_id(_EOS_CANDIDATES)
        pad_id = first_id(_PAD_CANDIDATES)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.bos_id, self.mask_id, self.unk_id = map(first_id, (_BOS_CANDIDATES, _MASK_CANDIDATES, _UNK_CANDIDATES))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "HFTokenizer":
        from tokenizers import Tokenizer as RustTokenizer

        try:
            return cls(RustTokenizer.from_file(str(path)))
        except Exception as error:  # the Rust side raises a bare Exception on bad JSON
            raise TokenizerError(f"{path} is not a valid Hugging Face tokenizer.json ({error})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        self._tok.save(str(directory / "tokenizer.json"))
        return {"file": "tokenizer.json"}

    def _identity_bytes(self) -> bytes:
        return self._tok.to_str().encode()


BPE_MIN_VOCAB = 256 + 3  # every byte plus the three special tokens


def train_bpe(texts: Iterable[str], vocab_size: int, max_chars: int = MAX_TRAINING_CHARS) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on ``texts``; any Unicode text round-trips exactly.

    Special tokens: ``<|endoftext|>`` (EOS), ``<pad>``, ``<mask>``. At most ``max_chars``
    characters of training text are read.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = BPE_MIN_VOCAB
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size {vocab_size} is too small for byte-level BPE; use at least {minimum}")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes, so nothing is ever unknown
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[ENDOFTEXT, PAD, MASK], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_capped(texts, max_chars), trainer)
    return HFTokenizer(tok)


# ---- SentencePiece (optional dependency) -----------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (ours trains with byte_fallback, so any Unicode round-trips)."""

    kind = "sentencepiece"
    _WORD_MARK = "\u2581"  # SentencePiece's stand-in for a space

    def __init__(self, model_proto: bytes):
        spm = _optional_import("sentencepiece")
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        sp = self._sp

        def valid(i: int) -> int | None:  # SentencePiece reports a disabled special as -1
            return i if i >= 0 else None

        def piece(name: str) -> int | None:
            i = sp.piece_to_id(name)
            return None if i == sp.unk_id() and name != sp.id_to_piece(i) else i

        eos = piece(ENDOFTEXT) if valid(sp.eos_id()) is None else sp.eos_id()
        if eos is None:
            raise TokenizerError("the SentencePiece model has no EOS token; retrain it with eos_id set")
        self.eos_id = eos
        self.pad_id = eos if valid(sp.pad_id()) is None else sp.pad_id()
        self.bos_id = valid(sp.bos_id())
        self.unk_id = valid(sp.unk_id())
        self.mask_id = piece(MASK)
        self.vocab_size = sp.get_piece_size()
        # A literal U+2581 in text would decode as a space; encode it as its UTF-8 byte pieces.
        byte_pieces = [piece(f"<0x{b:02X}>") for b in self._WORD_MARK.encode()]
        self._word_mark_ids = None if None in byte_pieces else byte_pieces

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        proto = Path(path).read_bytes()
        try:
            return cls(proto)
        except RuntimeError as error:
            raise TokenizerError(f"{path} is not a valid SentencePiece .model file ({error})") from None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        batch = self._sp.encode(texts)
        if self._word_mark_ids is not None:
            for n, text in enumerate(texts):
                if self._WORD_MARK in text:
                    first, *rest = self._sp.encode(text.split(self._WORD_MARK))
                    for part in rest:
                        first += self._word_mark_ids + part
                    batch[n] = first
        return batch

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        (directory / "tokenizer.model").write_bytes(self._proto)
        return {"file": "tokenizer.model"}

    def _identity_bytes(self) -> bytes:
        return self._proto


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, model_type: str = "bpe", max_chars: int = MAX_TRAINING_CHARS
) -> SentencePieceTokenizer:
    """Train SentencePiece (``bpe`` or ``unigram``) with byte_fallback and no normalisation.

    Training reads lines (newlines themselves become byte tokens) of at most ``max_chars``
    characters of text. Ids: 0 pad, 1 unk, 2 bos, 3 eos, 4 ``<mask>``.
    """
    spm = _optional_import("sentencepiece")
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"SentencePiece model_type must be 'bpe' or 'unigram', not {model_type!r}")
    lines = (line for text in _capped(texts, max_chars) for line in text.split("\n") if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_digits=True, max_sentence_length=16384, hard_vocab_limit=False,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=[MASK], minloglevel=2,
        )  # fmt: skip
    except RuntimeError as error:
        needed = re.search(r"required_chars\. \d+ vs (\d+)", str(error))
        if needed:  # the usual failure: 256 byte pieces + specials + every character must fit
            raise TokenizerError(f"vocab_size {vocab_size} is too small for this corpus; SentencePiece "
                                 f"with byte fallback needs at least {needed.group(1)}") from None
        raise TokenizerError(f"SentencePiece training failed ({error}); try another vocab_size") from None
    return SentencePieceTokenizer(model.getvalue())


# ---- tiktoken (optional dependency) ----------------------------------------------------------
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_SPECIALS = ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")
_CL100K_SPECIAL_IDS = (100257, 100258, 100259, 100260, 100276)
_OPENAI = "https://openaipublic.blob.core.windows.net/encodings/"
# name -> (file in tiktoken's download cache, its sha256, split pattern, special tokens)
# (gpt2 and r50k_base share one vocabulary; tiktoken caches it as r50k_base.tiktoken)
_NAMED = {
    "cl100k_base": ("cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
                    CL100K_PATTERN, dict(zip(_CL100K_SPECIALS, _CL100K_SPECIAL_IDS))),
    "gpt2": ("r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
             R50K_PATTERN, {ENDOFTEXT: 50256}),
}  # fmt: skip


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64-token rank`` per line).

    Same format as ``tiktoken.load.load_tiktoken_bpe``, read directly because that function
    also copies local files into tiktoken's download cache.
    """
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{number}: expected 'base64-token rank', got {line[:60]!r}") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path} lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}); all 256 need a rank"
        )
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE. ``<|pad|>`` and ``<|mask|>`` are appended after the existing ids."""

    kind = "tiktoken"

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int], name: str):
        tiktoken = _optional_import("tiktoken")
        specials = dict(special_tokens)
        for token in (ENDOFTEXT, "<|pad|>", "<|mask|>"):
            if token not in specials:
                specials[token] = max([*mergeable_ranks.values(), *specials.values()]) + 1
        self._ranks, self._pattern, self._specials, self.name = mergeable_ranks, pattern, specials, name
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=specials)
        self.eos_id, self.pad_id, self.mask_id = specials[ENDOFTEXT], specials["<|pad|>"], specials["<|mask|>"]
        self.vocab_size = self._enc.n_vocab

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TiktokenTokenizer":
        """A local ``.tiktoken`` file with the cl100k_base split pattern and special tokens.

        A file the size of cl100k_base (or gpt2/r50k_base) gets that encoding's exact pattern
        and special ids; any other file gets the cl100k specials right after its last rank.
        """
        ranks = read_tiktoken_ranks(path)
        for _, _, pattern, specials in _NAMED.values():
            if len(ranks) == min(specials.values()):  # an OpenAI vocabulary: keep its exact ids
                return cls(ranks, pattern, specials, Path(path).stem)
        first = max(ranks.values()) + 1
        specials = {token: first + i for i, token in enumerate(_CL100K_SPECIALS)}
        return cls(ranks, CL100K_PATTERN, specials, Path(path).stem)

    @classmethod
    def named(cls, name: str) -> "TiktokenTokenizer":
        """``cl100k_base`` or ``gpt2`` from tiktoken's local cache; never downloads."""
        file_name, sha256, pattern, specials = _NAMED[name]
        cached = _tiktoken_cache_file(_OPENAI + file_name)
        if cached is None or hashlib.sha256(cached.read_bytes()).hexdigest() != sha256:
            raise TokenizerError(
                f"{name} encoding is not cached locally; download {file_name} elsewhere "
                f"and pass --tokenizer path/to/{file_name}"
            )
        return cls(read_tiktoken_ranks(cached), pattern, specials, name)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts))

    def _decode_ids(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def _ranks_file_bytes(self) -> bytes:
        by_rank = sorted(self._ranks.items(), key=lambda item: item[1])
        return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in by_rank)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        (directory / "vocab.tiktoken").write_bytes(self._ranks_file_bytes())
        return {"file": "vocab.tiktoken", "name": self.name, "pattern": self._pattern, "special_tokens": self._specials}

    @classmethod
    def from_saved(cls, directory: Path, meta: dict[str, Any]) -> "TiktokenTokenizer":
        ranks = read_tiktoken_ranks(_saved_file(directory, meta))
        return cls(ranks, meta["pattern"], meta["special_tokens"], meta["name"])

    def _identity_bytes(self) -> bytes:
        return self._ranks_file_bytes() + json.dumps([self._pattern, sorted(self._specials.items())]).encode()


def _tiktoken_cache_file(url: str) -> Path | None:
    """Where tiktoken would have cached ``url`` (same rules as tiktoken.load), if it exists."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    path = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
    return path if path.is_file() else None


# ---- building and loading --------------------------------------------------------------------
def _saved_file(directory: Path, meta: dict[str, Any]) -> Path:
    """The vocabulary file ``tokenizer_meta.json`` names: one entry of ``directory``, nothing outside."""
    return inside(directory, meta.get("file"), what=f"{META_FILE} 'file'", error=TokenizerError, child=True)


def _load_saved(directory: Path) -> Tokenizer:
    try:
        meta = json.loads(inside(directory, META_FILE, what="file", error=TokenizerError).read_text())
        kind = meta["kind"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise TokenizerError(f"{directory / META_FILE} is unreadable ({error}); save the tokenizer again") from None
    kinds = {cls.kind: cls for cls in (CharTokenizer, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer)}
    if kind not in kinds:
        raise TokenizerError(f"{directory / META_FILE} names unknown tokenizer kind {kind!r}")
    return kinds[kind].from_saved(directory, meta)


def load_tokenizer(directory_or_spec: str | os.PathLike) -> Tokenizer:
    """Load a saved tokenizer directory, a tokenizer.json / .model / .tiktoken file, or a name."""
    spec = str(directory_or_spec)
    if spec in NAMED_ENCODINGS:
        return TiktokenTokenizer.named(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / META_FILE).is_file():
            return _load_saved(path)
        if (path / "tokenizer.json").is_file():  # a Hugging Face model directory
            return HFTokenizer.from_file(path / "tokenizer.json")
        raise TokenizerError(f"{path} has no {META_FILE} or tokenizer.json; pass a saved tokenizer directory")
    by_suffix = {".json": HFTokenizer, ".model": SentencePieceTokenizer, ".tiktoken": TiktokenTokenizer}
    if path.suffix in by_suffix:
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        return by_suffix[path.suffix].from_file(path)
    if path.exists():
        raise TokenizerError(f"cannot tell the tokenizer type of {path}; expected tokenizer.json, .model or .tiktoken")
    choices = (*TRAINABLE_KINDS, *NAMED_ENCODINGS)
    raise TokenizerError(
        f"unknown tokenizer {spec!r}{did_you_mean(spec, choices)}; use one of {', '.join(choices)} "
        "or a path to tokenizer.json / .model / .tiktoken / a saved directory")


def get_tokenizer(spec: str, corpus_texts: Iterable[str] | None = None, vocab_size: int = 8192) -> Tokenizer:
    """Train (``char``, ``bpe``, ``sentencepiece[-bpe|-unigram]``) on ``corpus_texts`` or load ``spec``."""
    if spec not in TRAINABLE_KINDS:
        return load_tokenizer(spec)
    if corpus_texts is None:
        raise TokenizerError(f"tokenizer {spec!r} is trained on the corpus; pass corpus_texts")
    if spec == "char":
        return CharTokenizer.from_texts(corpus_texts)
    if spec == "bpe":
        return train_bpe(corpus_texts, vocab_size)
    model_type = "unigram" if spec.endswith("unigram") else "bpe"
    return train_sentencepiece(corpus_texts, vocab_size, model_type=model_type)
