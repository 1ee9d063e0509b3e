"""`neoformer serve`: an OpenAI-compatible HTTP server with continuous batching (fastapi + uvicorn).

    from neoformer.serve import Scheduler, Sequence, Sampling   # the batching engine, no HTTP
    from neoformer.serve.app import serve, ServeOptions         # needs the `serve` extra

Layout: ``rows.py`` (per-row KV slots behind the cache protocol), ``scheduler.py`` (the step loop:
admit, chunked prefill, batch-invariant decode), ``protocol.py`` (request checks, OpenAI errors),
``choices.py`` (text, stop strings, logprobs), ``app.py`` (routes), ``encoders.py`` (embeddings,
fill-mask), ``metrics.py`` (Prometheus text), ``playground.html`` (the page at ``/``).
See docs/serving.md.
"""
from .scheduler import Event, QueueFull, Sampling, Scheduler, Sequence

__all__ = ["Scheduler", "Sequence", "Sampling", "Event", "QueueFull", "require_extra"]


def require_extra() -> None:
    """One line instead of an ImportError traceback when the `serve` extra is missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"serving needs {' and '.join(missing)}: pip install 'neoformer[serve]'")
