"""`neoformer fill-mask CKPT --text "The <mask> is ..."`: the most likely fillers of each <mask> (encoder checkpoints)."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fill-mask", help="fill <mask> tokens with a masked-LM encoder",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--text", required=True, help="text with one or more literal <mask>")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import load_checkpoint
    from ..serve.encoders import fill_mask

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, not {args.top_k}")
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device, kinds=("encoder",), command="fill-mask")
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer; fill-mask needs one")
    results = fill_mask(model, tokenizer, args.text, args.top_k)
    if args.json:
        print(json.dumps(results))
        return 0
    for number, fillers in enumerate(results, 1):
        if len(results) > 1:
            print(f"--- mask {number}")
        for f in fillers:
            print(f"{f['score']:.4f}  {f['token']!r:<16} {f['sequence']}")
    return 0
