"""Text generation: static KV cache, prefill / decode_one, sampling, beam search, speculative decoding.

    from neoformer.generate import generate, stream
    out = generate(model, input_ids, max_new_tokens=64, temperature=0.8, top_k=50, seed=0)
    for tokens in stream(model, input_ids, max_new_tokens=64):  # (B,) per step
        ...

``model.generate(...)`` on DecoderLM / EncoderDecoderLM delegates here. See docs/generation.md.
"""
from .api import GenerateOutput, generate, stream, stream_text
from .cache import StaticKVCache
from .config import GenerationConfig
from .engine import decode_one, prefill

__all__ = ["generate", "stream", "stream_text", "GenerateOutput", "GenerationConfig", "StaticKVCache",
           "prefill", "decode_one"]
