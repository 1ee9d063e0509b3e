"""`neoformer export CKPT --format FMT --out DIR`: a checkpoint for another runtime, verified after writing."""
from __future__ import annotations

import argparse
from pathlib import Path

FORMAT_NAMES = ("hf", "onnx", "torch-export", "aoti", "torchscript", "gguf")  # = neoformer.export.FORMATS (torch-free here)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint (hf, onnx, torch-export, aoti, torchscript, gguf), verified",
        description="Write the checkpoint for another runtime, then load what was written with that runtime's "
                    "own library and compare logits over a prefill plus three cached decode steps (gguf: "
                    "every tensor read back). hf: stock transformers classes where one fits (Llama, Mistral, "
                    "GPT-2, Mixtral), neoformer's own code (trust_remote_code=True) for every other kind. "
                    "docs/export.md has the table of formats and model kinds.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint or run directory (from `neoformer train`)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty, or --force)")
    parser.add_argument("--format", default="hf", choices=FORMAT_NAMES)
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    parser.add_argument("--quant", default=None, help="gguf only: q8_0 | q4_0")
    parser.add_argument("--max-shard-size", metavar="SIZE", default=None,
                        help="hf only: split the weights into safetensors shards of at most SIZE (500MB, 2GB, "
                             "1GiB) with model.safetensors.index.json, as transformers writes them")
    parser.add_argument("--llama-cpp", metavar="DIR", default=None,
                        help="gguf only: llama.cpp's build/bin folder; verification then runs llama-completion on "
                             "the file and checks its greedy text equals neoformer's (default: "
                             "$NEOFORMER_LLAMA_CPP_DIR, else skipped)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the check after writing")
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    from ..checkpoint import resolve_checkpoint
    from ..export import export

    checkpoint = resolve_checkpoint(args.checkpoint)
    _refuse_overlap(Path(args.out), checkpoint)
    options = {"max_shard_size": args.max_shard_size} if args.max_shard_size is not None else {}
    if args.llama_cpp is not None:
        if args.format != "gguf":
            raise ValueError("--llama-cpp checks a gguf export; use it with --format gguf")
        options["llama_cpp"] = args.llama_cpp
    result = export(checkpoint, args.out, args.format, dtype=args.dtype, quant=args.quant, verify=args.verify,
                    force=args.force, **options)
    print(f"exported {checkpoint} as {args.format} to {result.path} ({result.size_bytes / 1e6:.2f} MB: "
          f"{', '.join(result.files)})")
    if result.max_diff is None:
        print("not verified (--no-verify)")
    else:
        print(f"verified: max |Δlogit| {result.max_diff:.3g} — {result.checked}")
    return 0


def _refuse_overlap(out: Path, checkpoint: Path) -> None:
    """The export must not write into the checkpoint it reads, nor its checkpoints/ or run folder."""
    out, source = out.resolve(), checkpoint.resolve()
    if out == source or source in out.parents or out in list(source.parents)[:2]:
        raise ValueError(f"--out {out} overlaps the checkpoint {checkpoint} being exported; choose a separate folder")
