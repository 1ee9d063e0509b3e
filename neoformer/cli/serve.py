"""`neoformer serve CKPT`: an OpenAI-compatible HTTP server (continuous batching, streaming, playground at /).

Needs the `serve` extra (fastapi, uvicorn). Binds 127.0.0.1 unless --host says otherwise; with
--api-key (or NEOFORMER_API_KEY) every /v1/* request must send `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .generate import dtype_arg


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (full, quantized or adapter)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this bearer key on /v1/* (default: $NEOFORMER_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-tokens-default", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request, queueing included")
    p.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (default 1 MiB)")
    p.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="decode only the busy rows: faster at low load, but a request's tokens may then "
                        "differ in the last bits with the load")
    p.add_argument("--prefill-chunk", type=int, default=32, metavar="N",
                   help="prompt tokens prefilled per step (default 32): smaller keeps the other requests' "
                        "inter-token latency flatter, larger gives a sooner first token")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (one shape)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", type=dtype_arg, default=None, metavar="bf16|fp16|fp32",
                   help="weight dtype for inference (default: as saved)")
    p.add_argument("--quantize", metavar="SCHEME", help="quantize on load: int8 | int8-dynamic | nf4 | int4 "
                   "(see `neoformer quantize`)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _check(args) -> None:
    for name in ("max_batch", "max_queue", "max_tokens_default", "max_body", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    if not 0 < args.timeout:
        raise ValueError(f"--timeout must be > 0 seconds, not {args.timeout}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], not {args.port}")


def run(args) -> int:
    from ..serve import require_extra

    _check(args)
    require_extra()
    import torch

    from ..checkpoint import load_checkpoint, resolve_checkpoint
    from ..serve.app import ServeOptions, serve
    from ..train.fit import resolve_device

    device = resolve_device(args.device) if args.device else None
    model, tokenizer, config = load_checkpoint(args.checkpoint, device=device,
                                               dtype=getattr(torch, args.dtype) if args.dtype else None,
                                               command="serve")
    if args.quantize:
        from ..quantize import quantize_model

        model = quantize_model(model, args.quantize)  # one-line refusal for an already quantized model
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model_name or Path(resolve_checkpoint(args.checkpoint)).resolve().name
    if name.startswith("step-"):  # a run folder's checkpoint: name it after the run
        name = Path(resolve_checkpoint(args.checkpoint)).resolve().parent.name
    options = ServeOptions(api_key=args.api_key or os.environ.get("NEOFORMER_API_KEY") or None,
                           max_batch=args.max_batch, max_queue=args.max_queue,
                           max_tokens_default=args.max_tokens_default, timeout=args.timeout,
                           max_body_bytes=args.max_body, compile=args.compile,
                           batch_invariant=args.batch_invariant, prefill_chunk=args.prefill_chunk)
    print(f"serving {name} ({model.config.kind}, context {model.config.max_seq_len}) on http://{args.host}:{args.port}"
          f"  (playground: /, API: /v1)", file=sys.stderr, flush=True)
    serve(model, tokenizer, config, name, options, host=args.host, port=args.port, log_level=args.log_level)
    return 0
