"""Weight-only (and int8 dynamic) quantization: quantize the weights, then swap every nn.Linear.

    from neoformer.quantize import quantize_model, save_quantized
    model = quantize_model(model, scheme="int8")             # int8 | int8-dynamic | nf4 | int4
    model = quantize_model(model, "int8", skip=())            # the token embedding (and a tied head) too
    save_quantized(model, "runs/q8", config=config, tokenizer=tokenizer)
    model, tokenizer, config = load_checkpoint("runs/q8")     # generate / eval / info load it directly

Kernels and formats: :mod:`.kernels` and :mod:`.modules`; docs/quantize.md has the measured table.
"""
from __future__ import annotations

from .checkpoint import (
    QuantizeError, load_quantized_checkpoint, quantize_checkpoint, quantized_summary, save_quantized,
    tensor_bytes,
)
from .embedding import QuantizedEmbedding
from .modules import GROUPED, SCHEMES, QuantizedLinear
from .swap import DEFAULT_SKIP, quantization_of, quantize_model, quantized_embeddings, quantized_modules, skipped

__all__ = ["DEFAULT_SKIP", "GROUPED", "SCHEMES", "QuantizeError", "QuantizedEmbedding", "QuantizedLinear",
           "load_quantized_checkpoint", "quantization_of", "quantize_checkpoint", "quantize_model", "quantized_embeddings",
           "quantized_summary", "quantized_modules", "save_quantized", "skipped", "tensor_bytes"]
