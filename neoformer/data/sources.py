"""Where documents come from: the embedded stdlib corpus, local files, JSONL / Parquet, HF datasets.

Every source becomes a :class:`Corpus`: the documents of one split plus an ``identity`` string
that changes whenever the underlying data changes (paths, sizes, mtimes), which keys the token
cache. Splits are deterministic: a document belongs to ``val`` when the hash of its name (file
path, or ``path#record``) falls below ``val_fraction``, so adding a file never reshuffles others.
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

VAL_FRACTION = 0.02
SPLITS = ("train", "val", "all")
SKIP_REASONS = ("empty", "binary", "not_utf8")
# Directories of the standard library that are tests or third-party code, not "the stdlib".
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_RECORD_SUFFIXES = (".jsonl", ".parquet")
_REPORTED_SKIPS: set[tuple[str, str]] = set()  # each split reads every file: say what was skipped once


class DataError(ValueError):
    """A data source is missing, empty or malformed. The message names it and the fix."""


@dataclass
class SkipReport:
    """Inputs left out (empty, binary = contains NUL bytes, not UTF-8), with a few examples each."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in SKIP_REASONS})
    max_examples: int = 3

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.total:
            return "skipped nothing"
        parts = []
        for reason, count in self.counts.items():
            if count:
                more = ", ..." if count > self.max_examples else ""
                parts.append(f"{count} {reason.replace('_', '-')} ({', '.join(self.examples[reason])}{more})")
        return f"skipped {self.total}: " + "; ".join(parts)


@dataclass
class Corpus:
    """The documents of one split of one source.

    ``documents`` is a list, or for streamed Hugging Face datasets a re-iterable stream.
    """

    name: str
    split: str
    documents: Sequence[str] | Iterable[str]
    identity: str
    skipped: SkipReport = field(default_factory=SkipReport)

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)


class _Reiterable:
    """An iterable that restarts its stream on every ``iter()`` (trainer pass, then tokenizer pass)."""

    def __init__(self, make_iterator: Callable[[], Iterator[str]]):
        self._make_iterator = make_iterator

    def __iter__(self) -> Iterator[str]:
        return self._make_iterator()


# ---- splits ----------------------------------------------------------------------------------
def _hash_fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64


def assign_splits(keys: Sequence[str], val_fraction: float = VAL_FRACTION) -> list[str]:
    """``"train"`` or ``"val"`` for each key, by hash. With two or more keys, at least one is val."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    fractions = [_hash_fraction(k) for k in keys]
    splits = ["val" if f < val_fraction else "train" for f in fractions]
    if val_fraction > 0 and len(keys) >= 2 and "val" not in splits:
        splits[min(range(len(keys)), key=fractions.__getitem__)] = "val"
    if len(keys) >= 2 and "train" not in splits:
        splits[max(range(len(keys)), key=fractions.__getitem__)] = "train"
    return splits


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


def _split_one_text(text: str, split: str, val_fraction: float) -> list[str]:
    """A lone document is split inside: the last ``val_fraction`` (at a line break) is val."""
    if split == "all" or val_fraction == 0:
        return [text] if split != "val" else []
    cut = int(len(text) * (1 - val_fraction))
    line_break = text.rfind("\n", 0, cut)
    cut = line_break + 1 if line_break > 0 else cut
    part = text[:cut] if split == "train" else text[cut:]
    return [part] if part.strip() else []


# ---- reading files ---------------------------------------------------------------------------
def read_text_file(path: Path) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) with reason one of :data:`SKIP_REASONS`."""
    data = path.read_bytes()
    if not data.strip():
        return None, "empty"
    if b"\0" in data:
        return None, "binary"
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return None, "not_utf8"


def _jsonl_records(path: Path, text_field: str) -> Iterator[object]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise DataError(f"{path}:{number}: not a JSON object ({error}); fix or remove the line") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{number}: no {text_field!r} field (has: {fields}); "
                                "pass --data.text_field NAME")
            yield record[text_field]


def _optional_import(module: str, purpose: str, extra: str = "datasets"):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{purpose} needs the {module} package: pip install 'neoformer[{extra}]'") from None


def _parquet_records(path: Path, text_field: str) -> Iterator[object]:
    parquet = _optional_import("pyarrow.parquet", "reading Parquet files")
    try:
        table = parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a damaged or non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
    if text_field not in table.schema_arrow.names:
        columns = ", ".join(table.schema_arrow.names)
        raise DataError(f"{path}: no {text_field!r} column (has: {columns}); pass --data.text_field NAME")
    for batch in table.iter_batches(columns=[text_field]):
        yield from batch.column(0).to_pylist()


def _read_units(
    files: Sequence[Path], root: Path, text_field: str, skipped: SkipReport
) -> tuple[list[str], list[str], bool]:
    """(keys, texts, all_plain_text) of every usable document in ``files``."""
    keys, texts = [], []
    for path in files:
        relative = path.relative_to(root).as_posix()
        if path.suffix in _RECORD_SUFFIXES:
            reader = _jsonl_records if path.suffix == ".jsonl" else _parquet_records
            for index, value in enumerate(reader(path, text_field)):
                if isinstance(value, str) and value.strip():
                    keys.append(f"{relative}#{index}")
                    texts.append(value)
                else:
                    skipped.add("empty", f"{relative}#{index}")
            continue
        text, reason = read_text_file(path)
        if reason:
            skipped.add(reason, relative)
        else:
            keys.append(relative)
            texts.append(text)
    plain = not any(p.suffix in _RECORD_SUFFIXES for p in files)
    return keys, texts, plain


def _files_identity(name: str, files: Sequence[Path], root: Path, *settings: object) -> str:
    digest = hashlib.sha256(json.dumps([name, *map(str, settings)]).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{name}@{digest.hexdigest()[:20]}"


def files_corpus(
    name: str, files: Sequence[Path], root: Path, split: str = "train",
    val_fraction: float = VAL_FRACTION, text_field: str = "text",
) -> Corpus:  # fmt: skip
    """One document per text file (or per JSONL/Parquet record), split by hashed name."""
    _check_split(split)
    skipped = SkipReport()
    keys, texts, plain = _read_units(files, root, text_field, skipped)
    if skipped.total and (name, str(skipped)) not in _REPORTED_SKIPS:
        _REPORTED_SKIPS.add((name, str(skipped)))
        # empty files (e.g. bare __init__.py) are routine; bad encodings are not
        level = logging.INFO if skipped.total == skipped.counts["empty"] else logging.WARNING
        log.log(level, "%s: %s", name, skipped)
    if not texts:
        raise DataError(f"no usable text in {name}: {skipped}; point the data source at UTF-8 text files")
    if len(texts) == 1 and plain:
        documents = _split_one_text(texts[0], split, val_fraction)
    elif split == "all":
        documents = texts
    else:
        documents = [t for t, s in zip(texts, assign_splits(keys, val_fraction)) if s == split]
    if not documents and not (split == "val" and val_fraction == 0):  # 0 = no validation wanted
        fix = "raise --data.val_fraction, or set it to 0 to train without validation" if split == "val" \
            else "lower --data.val_fraction"
        raise DataError(f"{name} has no documents in the {split} split (data.val_fraction {val_fraction}); "
                        f"add data or {fix}")
    identity = _files_identity(name, files, root, split, val_fraction, text_field)
    return Corpus(name, split, documents, identity, skipped)


# ---- the embedded stdlib corpus --------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library ``.py`` files (no tests, no site-packages), sorted."""
    root = stdlib_root()
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        files.extend(Path(directory) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(split: str = "train", val_fraction: float = VAL_FRACTION) -> Corpus:
    """The offline default corpus (~12 MB of Python source on CPython 3.11), split by file."""
    return files_corpus("stdlib", stdlib_files(), stdlib_root(), split, val_fraction)


# ---- local paths and globs -------------------------------------------------------------------
def resolve_files(spec: str) -> tuple[list[Path], Path]:
    """The files a path, directory (recursive, hidden entries skipped) or glob names, and their root."""
    expanded = os.path.expanduser(spec)
    if glob.has_magic(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match {spec!r}; check the pattern (use ** for subdirectories)")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        return files, root
    path = Path(expanded)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )  # fmt: skip
        if not files:
            raise DataError(f"directory {spec!r} contains no files; add text files or point elsewhere")
        return files, path
    raise DataError(f"data source not found: {spec!r}; pass 'stdlib', a file, a directory, a glob or 'hf:NAME'")


# ---- Hugging Face datasets -------------------------------------------------------------------
ALLOW_DOWNLOAD_ENV = "NEOFORMER_ALLOW_DOWNLOAD"  # =1: let `datasets` contact the Hub for hf:NAME
_OFFLINE_FLAGS = {"HF_DATASETS_OFFLINE": ("datasets.config",), "HF_HUB_OFFLINE": ("datasets.config",
                                                                                    "huggingface_hub.constants")}


def _import_datasets_offline():
    """(datasets, online): the Hub is switched off unless NEOFORMER_ALLOW_DOWNLOAD=1. The flags
    are environment variables read when datasets / huggingface_hub are imported, so they are set
    first; when another module imported them earlier, their module-level copies are set too."""
    online = os.environ.get(ALLOW_DOWNLOAD_ENV, "") == "1"
    if not online:
        for flag in _OFFLINE_FLAGS:
            os.environ[flag] = "1"
    datasets = _optional_import("datasets", "loading Hugging Face datasets")
    if not online:
        for flag, modules in _OFFLINE_FLAGS.items():
            for module in filter(None, map(sys.modules.get, modules)):
                if hasattr(module, flag):
                    setattr(module, flag, True)
    return datasets, online


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def hf_corpus(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None,
    streaming: bool = True, val_fraction: float = VAL_FRACTION,
) -> Corpus:  # fmt: skip
    """A Hugging Face dataset by hub name or local path (saved dataset or data directory).

    ``val`` reads the ``validation`` (or ``test``) split; a dataset with neither is split by
    hashed row index, like local files. ``all`` is the ``train`` split. Hub names may download;
    local paths never do. Nothing is downloaded unless NEOFORMER_ALLOW_DOWNLOAD=1 (then hub
    names may be fetched); otherwise a hub name must already be in the local datasets cache.
    """
    _check_split(split)
    local = _looks_like_local_path(name)
    if local and not os.path.exists(os.path.expanduser(name)):
        raise DataError(f"Hugging Face dataset path not found: {name}; check the path after 'hf:'")
    datasets, online = _import_datasets_offline()
    path = os.path.expanduser(name)

    def load(hf_split: str):
        try:
            if local and any((Path(path) / marker).exists() for marker in ("dataset_dict.json", "state.json")):
                loaded = datasets.load_from_disk(path)
                return loaded[hf_split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return datasets.load_dataset(path, config, split=hf_split, streaming=streaming)
        except (KeyError, ValueError) as error:  # an unknown split (or config): callers decide
            if local or online or "split" in str(error).lower():
                raise
            raise _not_local(name) from None
        except Exception as error:  # offline hub, missing files: one line instead of a deep trace
            if not (local or online):
                raise _not_local(name) from None
            raise DataError(f"could not load Hugging Face dataset {name!r} ({type(error).__name__}: {error})") from None

    def try_load(hf_split: str):
        try:
            return load(hf_split)
        except (KeyError, ValueError):  # that split does not exist
            return None

    held_out = next((d for d in map(try_load, ("validation", "test")) if d is not None), None)
    carve = held_out is None  # no held-out split: val rows are carved out of train by hashed index
    dataset = held_out if split == "val" and not carve else load("train")

    def rows() -> Iterator[str]:
        for index, row in enumerate(dataset):
            if text_field not in row:
                fields = ", ".join(row)
                raise DataError(f"hf:{name} rows have no {text_field!r} field (has: {fields}); "
                                "pass --data.text_field NAME")
            text = row[text_field]
            if not isinstance(text, str) or not text.strip():
                continue
            if not carve or split == "all" or (_hash_fraction(f"{index}") < val_fraction) == (split == "val"):
                yield text

    stamp = _files_identity(name, *resolve_files(path)) if local else name
    identity = f"hf:{stamp}:{config}:{split}:{carve}:{val_fraction}:{text_field}"
    documents = _Reiterable(rows) if streaming else list(rows())
    return Corpus(f"hf:{name}", split, documents, identity)


def _not_local(name: str) -> DataError:
    return DataError(f"hf:{name} is not on this machine and neoformer does not download at run time: provide it "
                     "locally (a datasets.save_to_disk folder or a data directory, passed as --data hf:/path), or set "
                     f"{ALLOW_DOWNLOAD_ENV}=1 to let datasets fetch it from the Hugging Face Hub")


# ---- one entry point -------------------------------------------------------------------------
# spec prefix -> a source a feature package provides, ``loader(rest, split, val_fraction=...) -> Corpus``,
# named as "module:function" and imported on first use (data/ sits below the packages that provide them)
SOURCE_PREFIXES: dict[str, object] = {"task:": "neoformer.eval.builtin:task_corpus"}


def register_source(prefix: str, loader) -> None:
    """Teach :func:`load_documents` a spec prefix (a callable or a ``"module:function"`` string)."""
    SOURCE_PREFIXES[prefix] = loader


def _prefixed_source(spec: str):
    for prefix, loader in SOURCE_PREFIXES.items():
        if spec.startswith(prefix):
            if isinstance(loader, str):
                module, _, function = loader.partition(":")
                loader = getattr(importlib.import_module(module), function)
            return prefix, loader
    return None, None


def load_documents(
    spec: str | os.PathLike = "stdlib", split: str = "train", *, val_fraction: float = VAL_FRACTION,
    text_field: str = "text", hf_config: str | None = None, streaming: bool = True,
) -> Corpus:  # fmt: skip
    """``"stdlib"``, a file / directory / glob (text, .jsonl, .parquet), ``"hf:NAME_OR_PATH"``, or a
    registered prefix (``"task:addition"``: neoformer's built-in tasks, see :data:`SOURCE_PREFIXES`)."""
    spec = str(spec)
    prefix, loader = _prefixed_source(spec)
    if loader is not None:
        _check_split(split)
        try:
            return loader(spec[len(prefix):], split, val_fraction=val_fraction)
        except ValueError as err:
            raise DataError(f"--data {spec}: {err}") from None
    if spec == "stdlib":
        return stdlib_corpus(split, val_fraction)
    if spec.startswith("hf:"):
        return hf_corpus(spec[3:], split, text_field, hf_config, streaming, val_fraction)
    files, root = resolve_files(spec)
    return files_corpus(spec, files, root, split, val_fraction, text_field)
