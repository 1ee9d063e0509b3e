"""`neoformer embed CKPT --input FILE`: one JSON line {"index", "embedding"} per input line (or JSONL "text")."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embedding vectors of texts (JSONL out)", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--input", required=True, help="text file, one input per line, or JSONL with a 'text' field ('-' = stdin)")
    p.add_argument("--output", default="-", help="JSONL file to write ('-' = stdout)")
    p.add_argument("--pooling", choices=["mean", "cls", "last"], default=None,
                   help="default: mean for encoders, last token for decoders")
    p.add_argument("--no-normalize", action="store_true", help="keep raw vectors (default: unit length)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def _texts(name: str) -> list[str]:
    if name != "-" and not Path(name).is_file():
        raise ValueError(f"--input {name} not found")
    lines = (sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")).splitlines()
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"--input {name} line {number} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"--input {name} line {number}: a JSON line needs a string 'text' field")
            line = record["text"]
        texts.append(line)
    if not texts:
        raise ValueError(f"--input {name} holds no text")
    return texts


def run(args) -> int:
    from ..checkpoint import load_checkpoint
    from ..serve.encoders import embed

    texts = _texts(args.input)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device, command="embed")
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer; embed needs one")
    prompts = [tokenizer.encode(t)[:model.config.max_seq_len] for t in texts]
    if any(not p for p in prompts):
        raise ValueError("an input encodes to zero tokens")
    vectors = embed(model, prompts, args.pooling, not args.no_normalize, args.batch_size)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for i, vector in enumerate(vectors):
            out.write(json.dumps({"index": i, "embedding": vector}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
