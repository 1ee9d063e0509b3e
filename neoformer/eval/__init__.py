"""Evaluation: lm-evaluation-harness through a neoformer ``LM`` (``harness``), perplexity and
bits per byte with a sliding window (``perplexity``), built-in offline tasks (``builtin``) and
ablation grids with a report (``ablate``). See docs/evaluation.md and docs/ablations.md.

lm-eval is an optional extra (``pip install 'neoformer[eval]'``), imported only by ``harness``.
"""
from .scoring import continuation_logprobs, rolling_windows, window_logprobs

__all__ = ["continuation_logprobs", "rolling_windows", "window_logprobs"]
