"""`neoformer import DIR --out CKPT`: a Hugging Face folder as a neoformer checkpoint, checked against transformers."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "import", help="import a Hugging Face folder (Llama, Mistral, Qwen2, Mixtral, GPT-2, neoformer exports)",
        description="Read config.json + safetensors + tokenizer.json (+ the chat template) of a local Hugging Face "
                    "folder, write a neoformer checkpoint, and compare its logits with transformers running the "
                    "original folder (prefill + three cached decode steps).")
    parser.add_argument("folder", help="local Hugging Face model folder")
    parser.add_argument("--out", required=True, metavar="CKPT", help="checkpoint (run) folder to write")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the folder's)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the logits check")
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    parser.set_defaults(func=run_import)


def run_import(args) -> int:
    from ..export.common import parse_dtype
    from ..export.importer import import_hf

    result = import_hf(args.folder, args.out, dtype=parse_dtype(args.dtype), force=args.force, verify=args.verify)
    print(f"imported {result.architecture} ({result.model.num_parameters():,} parameters) to {result.path}")
    if result.max_diff is not None:
        print(f"verified against transformers: max |Δlogit| {result.max_diff:.3g}")
    return 0
