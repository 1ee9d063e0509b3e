"""`neoformer tokenizer train|encode`: train a tokenizer on a corpus, or show how text tokenizes."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

KINDS = ("bpe", "sentencepiece", "sentencepiece-unigram", "char")
DEFAULT_MAX_CHARS = 16_000_000  # caps training text: the stdlib corpus (~12 MB) fits, BPE trains in seconds


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train or try a tokenizer",
                              description="Train a tokenizer on a corpus, or encode text with a saved one.")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = sub.add_parser("train", help="train a tokenizer and save it to a directory",
                       description="Train a tokenizer on the train split of --data and save it to --out "
                       "(load it later with --tokenizer DIR).")
    t.add_argument("--data", default="stdlib", metavar="SPEC",
                   help="stdlib (default), a file / directory / glob, or hf:NAME")
    t.add_argument("--kind", choices=KINDS, default="bpe", help="bpe = byte-level BPE (default)")
    t.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary (ignored for char)")
    t.add_argument("--out", required=True, metavar="DIR", help="directory to save the tokenizer in")
    t.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help=f"characters of training text read at most (default {DEFAULT_MAX_CHARS:,})")
    t.add_argument("--val-fraction", type=float, default=0.02, help="held-out fraction not used for training")
    t.set_defaults(func=run_train)
    e = sub.add_parser("encode", help="print the token ids and pieces of a text")
    e.add_argument("tokenizer", metavar="TOKENIZER", help="saved tokenizer directory or tokenizer file")
    e.add_argument("text")
    e.set_defaults(func=run_encode)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def train_tokenizer(data: str, kind: str, vocab_size: int, max_chars: int = DEFAULT_MAX_CHARS,
                    val_fraction: float = 0.02):
    """A tokenizer trained on the train split of ``data`` (at most ``max_chars`` characters)."""
    from ..data import load_documents
    from ..tokenizer import CharTokenizer, TokenizerError, train_bpe, train_sentencepiece

    if max_chars < 1:
        raise TokenizerError(f"--max-chars must be positive, got {max_chars}")
    corpus = load_documents(data, "train", val_fraction=val_fraction)
    if kind == "char":
        texts, total = [], 0
        for text in corpus:
            texts.append(text[: max_chars - total])
            total += len(texts[-1])
            if total >= max_chars:
                break
        return CharTokenizer.from_texts(texts)
    if kind == "bpe":
        return train_bpe(corpus, vocab_size, max_chars=max_chars)
    model_type = "unigram" if kind.endswith("unigram") else "bpe"
    return train_sentencepiece(corpus, vocab_size, model_type=model_type, max_chars=max_chars)


def run_train(args: argparse.Namespace) -> int:
    from ..data import load_documents

    from . import UserError

    if Path(args.out).exists() and not Path(args.out).is_dir():  # checked before the tokenizer trains
        raise UserError(f"--out {args.out} is a file; pass a folder for the tokenizer")
    started = time.perf_counter()
    tok = train_tokenizer(args.data, args.kind, args.vocab_size, args.max_chars, args.val_fraction)
    out = tok.save(Path(args.out))
    seconds = time.perf_counter() - started
    sample = "".join(list(_first_chars(load_documents(args.data, "val", val_fraction=args.val_fraction), 200_000)))
    ratio = len(sample) / max(1, len(tok.encode(sample))) if sample else float("nan")
    print(f"{args.kind} tokenizer, vocab {tok.vocab_size:,}, trained in {seconds:.1f} s; "
          f"{ratio:.2f} characters/token on held-out text; saved to {out}")
    return 0


def _first_chars(texts, limit: int):
    total = 0
    for text in texts:
        if total >= limit:
            return
        yield text[: limit - total]
        total += len(text)


def run_encode(args: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text)
    pieces = [tok.decode([i]) for i in ids]
    print(f"{len(ids)} tokens: {ids}")
    print("pieces:", " | ".join(repr(p) for p in pieces))
    return 0


__all__ = ["add_parser", "train_tokenizer"]
