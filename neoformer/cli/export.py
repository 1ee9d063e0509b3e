"""`neoformer export CKPT --out DIR`: a training checkpoint as a Hugging Face transformers folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint to a Hugging Face transformers folder",
        description="Write config.json + model.safetensors (+ the tokenizer) that "
                    "transformers.AutoModelForCausalLM.from_pretrained loads with identical logits. "
                    "Llama-, Mistral- and GPT-2-shaped decoders export; other features (RMC/NSB, MoE, ALiBi, "
                    "T5 bias, nGPT, encoders) are refused with the reason.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint or run directory (from `neoformer train`)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    from ..checkpoint import TOKENIZER_DIR, CheckpointError, load_checkpoint, resolve_checkpoint
    from ..hf import to_hf
    from ..safepath import inside

    checkpoint = resolve_checkpoint(args.checkpoint)
    _refuse_overlap(Path(args.out), checkpoint)
    model, _, _ = load_checkpoint(checkpoint, command="export")
    tokenizer_dir = inside(checkpoint, TOKENIZER_DIR, what="tokenizer folder", error=CheckpointError)
    out = to_hf(model, args.out, tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None)
    print(f"exported {model.config.name} ({model.num_parameters():,} parameters) to {out}")
    return 0


def _refuse_overlap(out: Path, checkpoint: Path) -> None:
    """The export must not write into the checkpoint it reads, nor its checkpoints/ or run folder."""
    out, source = out.resolve(), checkpoint.resolve()
    if out == source or source in out.parents or out in list(source.parents)[:2]:
        raise ValueError(f"--out {out} overlaps the checkpoint {checkpoint} being exported; choose a separate folder")
