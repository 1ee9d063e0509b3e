"""`neoformer quantize CKPT --out DIR --scheme SCHEME`: a weight-quantized checkpoint (docs/quantize.md)."""
from __future__ import annotations

import argparse

SCHEMES = ("int8", "int8-dynamic", "nf4", "int4")  # neoformer.quantize.SCHEMES (kept here: --help imports no torch)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="write an int8 / int8-dynamic / nf4 / int4 quantized checkpoint",
        description="Quantize every nn.Linear and token embedding of a float checkpoint (except --skip) and write "
                    "a checkpoint that "
                    "generate, eval and info load directly. int8: per-row int8 weights; int8-dynamic: the same "
                    "weights with int8 activations; nf4 / int4: 4-bit weights in groups of --group-size.")
    p.add_argument("checkpoint", metavar="CKPT", help="float checkpoint or run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="new output folder")
    p.add_argument("--scheme", required=True, metavar="SCHEME", help=f"one of: {', '.join(SCHEMES)}")
    p.add_argument("--group-size", type=int, metavar="N", help="nf4 / int4 group (default 64)")
    p.add_argument("--skip", default="lm_head,embed", metavar="WORDS",
                   help="comma-separated words: Linears and embeddings whose name contains one stay float (default "
                        "lm_head,embed; 'embed' quantizes the head too, '' also the embedding and a head tied to it)")
    p.set_defaults(func=run)


def skip_words(text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


def run(args: argparse.Namespace) -> int:
    from ..planner import human_bytes
    from ..quantize import quantize_checkpoint, quantized_summary

    written, _, config = quantize_checkpoint(args.checkpoint, args.out, args.scheme, args.group_size,
                                             skip_words(args.skip))
    from ..checkpoint import read_config

    summary = quantized_summary(written, read_config(written))
    group = f" g{summary['group_size']}" if summary["group_size"] else ""
    print(f"wrote {written}: {args.scheme}{group}, {summary['quantized']} quantized, "
          f"{human_bytes(summary['tensor_bytes'])} of tensors ({summary['tensor_bytes']:,} bytes)")
    return 0


__all__ = ["add_parser"]
