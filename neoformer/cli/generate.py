"""`neoformer generate CKPT --prompt TEXT [options]`: stream a continuation to the terminal.

One prompt (no beams) streams token by token; several prompts (repeat --prompt) or beam search
print whole results. Speed goes to stderr: tokens/s, prefill time, draft acceptance rate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UserError
from .train import threads_arg


WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_arg(value: str) -> str:
    """--dtype: bf16 | fp16 | fp32 (or torch's names) -> torch's name; weights are kept in it."""
    name = WEIGHT_DTYPES.get(value, value)
    if name not in WEIGHT_DTYPES.values():
        raise argparse.ArgumentTypeError(f"unknown dtype {value!r}; choose bf16, fp16 or fp32")
    return name


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (from `neoformer train`)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", help="read the prompt from a file ('-' = stdin)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128)
    g = p.add_argument_group("sampling (greedy unless one of these is set)")
    g.add_argument("--temperature", "--temp", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--greedy", action="store_true", help="greedy decoding even if sampling options are set")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--no-repeat-ngram-size", type=int)
    s = p.add_argument_group("stopping")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--eos-id", type=int, action="append", help="EOS token id (default: the tokenizer's)")
    s.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens regardless of EOS")
    b = p.add_argument_group("beam search")
    b.add_argument("--num-beams", type=int, default=1)
    b.add_argument("--length-penalty", type=float, default=1.0)
    b.add_argument("--early-stopping", choices=["true", "false", "never"], default="false")
    b.add_argument("--num-return-sequences", type=int, default=1)
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--draft", help="checkpoint of a smaller draft model with the same vocabulary")
    d.add_argument("--num-draft-tokens", type=int, default=4)
    d.add_argument("--prompt-lookup", type=int, metavar="N", dest="prompt_lookup_num_tokens",
                   help="speculative decoding without a draft model: propose the N tokens that followed the "
                        "last earlier match of the text's final n-gram (pays on repetitive text)")
    d.add_argument("--max-matching-ngram-size", type=int, help="longest n-gram --prompt-lookup matches (default 2)")
    c = p.add_argument_group("context and runtime")
    c.add_argument("--context-window", type=int, metavar="TOKENS",
                   help="tokens kept in the cache before trimming (default: the model's max_seq_len)")
    c.add_argument("--max-seq-len", dest="context_window", type=int, help=argparse.SUPPRESS)  # its old name
    c.add_argument("--trim-keep", type=int, help="tokens kept when the window is full (default: half)")
    c.add_argument("--trim", choices=["slice", "refill"], default="slice")
    c.add_argument("--device", default=None)
    c.add_argument("--dtype", type=dtype_arg, default=None, metavar="bf16|fp16|fp32",
                   help="weight dtype for inference (default: as saved); bf16/fp16 keep fp32 norms, "
                        "softmax and matmul accumulation")
    c.add_argument("--threads", type=threads_arg, default="auto", metavar="N|auto",
                   help="CPU threads for torch (default auto: drops to 1 while another process keeps the CPU busy)")
    c.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    c.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                   help="keep PyTorch's matmuls on CPU (by default the linear layers move to neoformer's decode "
                        "kernels where the CPU has AVX-512; see docs/generation.md)")
    c.add_argument("--onnx", action="store_true",
                   help="CHECKPOINT is a `neoformer export --format onnx` folder: greedy decoding with onnxruntime")
    c.add_argument("--quantize", metavar="SCHEME", help="quantize on load: int8 | int8-dynamic | nf4 | int4 "
                   "(see `neoformer quantize`)")
    c.add_argument("--no-stream", action="store_true", help="print the result at the end")
    p.set_defaults(func=run)


def _options(args) -> dict:
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, stop=args.stop, num_beams=args.num_beams,
                length_penalty=args.length_penalty, num_return_sequences=args.num_return_sequences,
                early_stopping={"true": True, "false": False}.get(args.early_stopping, args.early_stopping),
                num_draft_tokens=args.num_draft_tokens, context_window=args.context_window, trim_keep=args.trim_keep,
                trim=args.trim, compile=args.compile, prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
                max_matching_ngram_size=args.max_matching_ngram_size)
    if args.greedy:
        opts["do_sample"] = False
    if args.ignore_eos:
        opts["eos_token_id"] = []
    elif args.eos_id:
        opts["eos_token_id"] = args.eos_id
    return {k: v for k, v in opts.items() if v is not None}


def _load(path: str, device, dtype, quantize: str | None = None, cpu_kernels: bool = True):
    import torch

    from .. import kinds as model_kinds
    from ..checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(path, device=device, dtype=getattr(torch, dtype) if dtype else None,
                                          kinds=model_kinds.names(generating=True), command="generate")
    if quantize:
        from ..quantize import quantize_model

        model = quantize_model(model, quantize)
    if cpu_kernels:  # the float linears left (quantized ones pick the kernels themselves)
        from ..kernels import pack_linears

        pack_linears(model)  # CPU fp32 / bf16 nn.Linear only; nothing where the kernels cannot load
    return model, tokenizer


def _check_draft_tokenizer(tokenizer, draft_tokenizer, args) -> None:
    """Same vocabulary size is not enough: the ids must mean the same tokens."""
    if tokenizer is None or draft_tokenizer is None or tokenizer.fingerprint == draft_tokenizer.fingerprint:
        return
    raise UserError(f"--draft {args.draft} has a different tokenizer than {args.checkpoint} ({draft_tokenizer.kind}, "
                    f"vocab {draft_tokenizer.vocab_size:,} vs {tokenizer.kind}, vocab {tokenizer.vocab_size:,}); "
                    "speculative decoding needs a draft trained with the same tokenizer")


def _read_prompt_file(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    path = Path(name)
    if path.is_dir():
        raise UserError(f"--prompt-file {name} is a directory; pass a text file")
    if not path.is_file():
        raise UserError(f"--prompt-file {name} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--prompt-file {name} is not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts.append(_read_prompt_file(args.prompt_file))
    if not prompts:
        raise UserError("give a prompt: --prompt TEXT or --prompt-file PATH")
    for number, prompt in enumerate(prompts, start=1):
        if not prompt:
            which = "the prompt" if len(prompts) == 1 else f"prompt {number}"
            raise UserError(f"{which} is empty; give some text to continue")
    return prompts


def _report(stats: dict, notes: list[str] = ()) -> None:
    n_tokens, total = stats.get("new_tokens", 0), stats.get("total_s", 0.0)
    rate = n_tokens / total if total > 0 else float("inf")
    line = f"[{n_tokens} tokens in {total:.2f} s: {rate:.1f} tokens/s; prefill {stats.get('prefill_s', 0) * 1e3:.0f} ms"
    if "acceptance_rate" in stats:
        line += f"; draft acceptance {stats['acceptance_rate']:.0%}"
    print(line + "]", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)


def _lead(prompt: str, seq2seq: bool) -> str:
    """What goes before the generated text: the prompt it continues, or (encoder-decoder) the
    source on its own line and an ``output:`` label."""
    return f"source: {prompt}\noutput: " if seq2seq else prompt


def run(args) -> int:
    from .. import kinds as model_kinds
    from ..generate.api import generate, stream_text
    from ..train.fit import resolve_device
    from ..train.monitor import apply_threads, tuned

    prompts = _prompts(args)
    if args.onnx:
        return _run_onnx(args, prompts)
    opts = _options(args)
    device = resolve_device(args.device) if args.device else None
    model, tokenizer = _load(args.checkpoint, device, args.dtype, args.quantize, args.cpu_kernels)
    draft = None
    if args.draft:
        draft, draft_tokenizer = _load(args.draft, device, args.dtype, cpu_kernels=args.cpu_kernels)
        _check_draft_tokenizer(tokenizer, draft_tokenizer, args)
    notes: list[str] = []  # thread-tuner notes, printed after the text rather than inside it
    tuner = apply_threads(args.threads, next(model.parameters()).device.type, notes.append)
    streaming = len(prompts) == 1 and args.num_beams == 1 and args.num_return_sequences == 1 and not args.no_stream
    seq2seq = model_kinds.get(model).cache.cross_attention  # the output is a new text, not a continuation
    if streaming:
        stats: dict = {}
        pieces = tuned(stream_text(model, tokenizer, prompts[0], draft_model=draft, stats=stats, **opts), tuner)
        first = next(pieces, "")  # bad options fail here, before the prompt is printed
        print(_lead(prompts[0], seq2seq) + first, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        _report(stats, notes)
        return 0
    ids = [tokenizer.encode(p) for p in prompts]
    out = generate(model, ids, tokenizer=tokenizer, draft_model=draft, return_dict=True, **opts)
    per_prompt = len(out.texts) // len(prompts)
    for i, text in enumerate(out.texts):
        if per_prompt > 1 or len(prompts) > 1:
            print(f"--- {i // per_prompt + 1}" + (f".{i % per_prompt + 1}" if per_prompt > 1 else ""))
        print(_lead(prompts[i // per_prompt], seq2seq) + text)
    _report(out.stats, notes)
    return 0



def _run_onnx(args, prompts: list[str]) -> int:
    """Greedy tokens from onnxruntime on an ONNX export (the same tokens neoformer picks greedily)."""
    import time

    from ..export.onnx_format import onnx_greedy
    from ..tokenizer import load_tokenizer

    if args.temperature or args.top_k or args.top_p or args.min_p or args.num_beams != 1 or args.draft \
            or args.prompt_lookup_num_tokens:
        raise UserError("--onnx decodes greedily: drop the sampling, beam and draft options")
    tokenizer = load_tokenizer(Path(args.checkpoint) / "tokenizer")
    eos = () if args.ignore_eos else tuple(args.eos_id or [tokenizer.eos_id])
    for prompt in prompts:
        start = time.perf_counter()
        new = onnx_greedy(args.checkpoint, tokenizer.encode(prompt), args.max_new_tokens, eos)
        print(prompt + tokenizer.decode(new))
        _report({"new_tokens": len(new), "total_s": time.perf_counter() - start})
    return 0
