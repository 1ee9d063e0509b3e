"""Export a neoformer model to other runtimes, and check every file against the original.

    from neoformer.export import export
    result = export("runs/demo", "out/hf", format="hf")          # or a model object
    print(result.max_diff)                                        # max |Δlogit| measured after writing

Formats (``FORMATS``): ``hf`` (transformers folder: stock class or neoformer's own code),
``onnx`` (onnxruntime, KV cache as inputs/outputs), ``torch-export`` (ExportedProgram .pt2),
``aoti`` (AOTInductor packages of the prefill and decode steps), ``torchscript`` and ``gguf`` (llama.cpp). After writing, ``verify=True`` (the default) loads the
output with the consumer's own library and compares logits over a prefill plus three cached
decode steps (gguf: every tensor read back, dequantized); a mismatch raises :class:`ExportError`.
The reverse direction, Hugging Face folder -> checkpoint, is :func:`neoformer.export.importer.import_hf`.
"""
from __future__ import annotations

import copy
import importlib
import os
import time

from .common import DTYPES, ExportError, ExportResult, Source, parse_dtype, prepare_out

# format -> "module:writer", "module:verifier"; writer(source, out, dtype, **options) -> facts,
# verifier(source, out, dtype, facts) -> (max |Δ|, what was compared)
FORMATS = {
    "hf": ("neoformer.export.hf_folder:write_hf", "neoformer.export.hf_folder:verify_hf"),
    "onnx": ("neoformer.export.onnx_format:write_onnx", "neoformer.export.onnx_format:verify_onnx"),
    "torch-export": ("neoformer.export.torch_formats:write_exported_program",
                     "neoformer.export.torch_formats:verify_exported_program"),
    "aoti": ("neoformer.export.aoti_format:write_aoti", "neoformer.export.aoti_format:verify_aoti"),
    "torchscript": ("neoformer.export.torch_formats:write_torchscript",
                    "neoformer.export.torch_formats:verify_torchscript"),
    "gguf": ("neoformer.export.gguf_format:write_gguf", "neoformer.export.gguf_format:verify_gguf"),
}
QUANTS = ("q8_0", "q4_0")


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def load_source(checkpoint_or_model, device="cpu") -> Source:
    """A checkpoint path (loaded through neoformer.checkpoint) or a model object, in fp32 eval mode."""
    if isinstance(checkpoint_or_model, Source):
        return checkpoint_or_model
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        from ..checkpoint import load_checkpoint

        model, tokenizer, config = load_checkpoint(checkpoint_or_model, device=device, command="export",
                                                   contents=("full",))
        return Source(model.float().eval(), tokenizer, config)
    if not hasattr(checkpoint_or_model, "config"):
        raise ExportError(f"export takes a checkpoint path or a neoformer model, not {type(checkpoint_or_model).__name__}")
    return Source(checkpoint_or_model.eval())


def export(checkpoint_or_model, out: str | os.PathLike, format: str = "hf", *, dtype: str | None = None,
           quant: str | None = None, verify: bool = True, force: bool = False, tokenizer=None,
           checkpoint_config: dict | None = None, **options) -> ExportResult:
    """Write ``checkpoint_or_model`` to ``out`` in ``format``; verify it unless ``verify=False``.

    ``dtype``: fp32 | bf16 | fp16 (default fp32); ``quant``: q8_0 | q4_0 (gguf only).
    ``tokenizer`` / ``checkpoint_config``: for a model object (a checkpoint brings its own).
    ``options``: ``max_shard_size="2GB"`` (hf: sharded safetensors + index), ``llama_cpp=DIR`` (gguf: run
    llama.cpp on the file as part of verification).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    torch_dtype = parse_dtype(dtype) or DTYPES["fp32"]
    if quant is not None and (format != "gguf" or quant not in QUANTS):
        raise ExportError(f"--quant {quant} is only for --format gguf, one of {', '.join(QUANTS)}")
    if options.get("max_shard_size") is not None:
        if format != "hf":
            raise ExportError("--max-shard-size splits the weights of an hf export; use it with --format hf")
        from ..hf.shards import parse_size

        parse_size(options["max_shard_size"])  # a bad size is refused before anything is written
    source = load_source(checkpoint_or_model)
    if tokenizer is not None:
        source.tokenizer = tokenizer
    if checkpoint_config is not None:
        source.config = checkpoint_config
    writer, verifier = (_load(ref) for ref in FORMATS[format])
    check = getattr(importlib.import_module(FORMATS[format][0].partition(":")[0]), "check_supported", None)
    if check is not None:  # refuse before touching the output folder
        check(source, torch_dtype, quant)
    path = prepare_out(out, force)
    if next(source.model.parameters()).dtype != torch_dtype:  # a copy: the caller's model stays as it was
        source.model = copy.deepcopy(source.model).to(torch_dtype)
    facts = writer(source, path, torch_dtype, quant=quant, **options) if format == "gguf" else \
        writer(source, path, torch_dtype, **options)
    result = ExportResult(format, path, None, files=sorted(p.name for p in path.iterdir()))
    if verify:
        start = time.perf_counter()
        result.max_diff, result.checked = verifier(source, path, torch_dtype, facts)
        result.checked += f" (loaded and checked in {time.perf_counter() - start:.1f} s)"
    return result


def import_hf(folder, out, **kwargs):
    """Hugging Face folder -> neoformer checkpoint (see :mod:`neoformer.export.importer`)."""
    from .importer import import_hf as run

    return run(folder, out, **kwargs)


__all__ = ["export", "import_hf", "load_source", "ExportError", "ExportResult", "FORMATS", "QUANTS", "Source"]
