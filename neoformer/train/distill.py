"""Knowledge distillation as one more objective for the one ``fit()`` (Hinton et al. 2015).

    loss = (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(teacher_T || student_T)
           [+ hidden_weight * MSE(final hidden states)]

``*_T`` are softmaxes at temperature T; T^2 keeps the soft-target gradients on the scale of the
hard ones. The teacher runs in eval mode without gradients (optionally in bf16) and is not part of
the model fit() optimises or checkpoints; it is deterministic, so a resumed distillation is
bit-identical like any other run. A student with a reduced vocabulary reads the teacher's
distribution over its kept tokens only, renormalised (``teacher_ids``: the teacher id of each
student id; student inputs are mapped to teacher ids before the teacher sees them).

With ``cached_logits`` (e.g. ``neoformer.compress.logit_cache.LogitCache.lookup``) the teacher is not
run: its top-k logits per position are read back and the KD term is :func:`sparse_kd_loss`.

In eval mode (fit()'s validation) the objective returns the plain CE, so validation loss and
perplexity mean the same thing for students and teachers.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IGNORE_INDEX, ConfigError
from .objectives import _field


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * mean over target positions of KL(softmax(t/T) || softmax(s/T)); logits (B, L, V)."""
    V = student_logits.shape[-1]
    keep = (targets != IGNORE_INDEX).reshape(-1)
    s = F.log_softmax(student_logits.float().reshape(-1, V)[keep] / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, V)[keep] / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="sum") / max(int(keep.sum()), 1)
    return kl * temperature ** 2


def sparse_kd_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                   teacher_log_norm: torch.Tensor | None, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """kd_loss against a teacher known by its top-k logits ``values`` at token ids ``indices`` (B, L, k).

    With ``teacher_log_norm`` (B, L) = logsumexp(all teacher logits / T), the teacher's probabilities of
    the k tokens are exact and the rest of the vocabulary is one "tail" bucket on both sides:
    T^2 * [sum_k p (log p - log q) + p_tail (log p_tail - log q_tail)], q the student's softmax at T.
    That is the KL between the two distributions coarse-grained to k + 1 outcomes (a lower bound of
    the full KL); how the teacher spreads its tail is lost. Without it the teacher is renormalised over
    its k tokens (it looks more confident than it is). With k = the whole vocabulary both are :func:`kd_loss`.
    """
    keep = (targets != IGNORE_INDEX).reshape(-1)
    k, V = values.shape[-1], student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, V)[keep] / temperature, dim=-1)
    top = indices.reshape(-1, k)[keep]
    s = student.gather(-1, top)
    t = values.float().reshape(-1, k)[keep] / temperature
    if teacher_log_norm is None or k == V:
        t = F.log_softmax(t, dim=-1)
        kl = (t.exp() * (t - s)).sum()
    else:
        t = t - teacher_log_norm.float().reshape(-1)[keep, None]
        p_tail = (1 - t.exp().sum(-1)).clamp_min(0)
        s_tail = torch.logsumexp(student.scatter(-1, top, float("-inf")), dim=-1)
        kl = (t.exp() * (t - s)).sum() + (torch.xlogy(p_tail, p_tail) - p_tail * s_tail).sum()
    return kl / max(int(keep.sum()), 1) * temperature ** 2


class Distillation:
    """``objective(student, batch) -> (loss, stats)`` distilling ``teacher`` into the student."""

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0,
                 hidden_weight: float = 0.0, teacher_ids: torch.Tensor | None = None,
                 teacher_dtype: torch.dtype | None = None,
                 cached_logits: Callable[[torch.Tensor], tuple] | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distillation alpha ({alpha}) must be in [0, 1]")
        if not temperature > 0:
            raise ConfigError(f"distillation temperature ({temperature}) must be positive")
        if hidden_weight < 0:
            raise ConfigError(f"distillation hidden_weight ({hidden_weight}) must be >= 0")
        self.teacher = teacher.eval().requires_grad_(False)
        if teacher_dtype is not None:
            self.teacher.to(teacher_dtype)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.teacher_ids = teacher_ids
        if cached_logits is not None and hidden_weight:
            raise ConfigError("the hidden-state loss needs the live teacher; drop the logit cache or hidden_weight")
        self.cached_logits = cached_logits  # input_ids -> (values, indices, log_norm): the teacher is not run

    def _teacher(self, x: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self.teacher
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        ids = x if self.teacher_ids is None else self.teacher_ids.to(device)[x]
        with torch.no_grad():
            out = teacher.forward_hidden(ids, use_cache=False)
            logits = teacher.logits(out.hidden)
            if self.teacher_ids is not None:  # the kept tokens only; log_softmax renormalises them
                logits = logits[..., self.teacher_ids.to(device)]
        return logits.float(), out.hidden

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (B, L, V) over the student's vocabulary, as the KD term sees them."""
        return self._teacher(x, x.device)[0]

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x = _field(batch, "input_ids", index=0)
        y = _field(batch, "targets", "labels", index=1)
        out = model.forward_hidden(x, use_cache=False)
        logits = model.logits(out.hidden)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)
        stats = {"tokens": x.numel(), "targets": (y != IGNORE_INDEX).sum(), "ce": ce.detach()}
        if not model.training or self.alpha == 0.0 and self.hidden_weight == 0.0:
            return ce, stats
        if self.cached_logits is not None:
            kd = sparse_kd_loss(logits, *self.cached_logits(x), y, self.temperature)
        else:
            teacher_logits, teacher_hidden = self._teacher(x, x.device)
            kd = kd_loss(logits, teacher_logits, y, self.temperature)
        loss = (1 - self.alpha) * ce + self.alpha * kd
        if self.hidden_weight:
            if teacher_hidden.shape != out.hidden.shape:
                raise ConfigError("the hidden-state loss needs a student as wide as the teacher "
                                  f"({teacher_hidden.shape[-1]} vs {out.hidden.shape[-1]})")
            loss = loss + self.hidden_weight * F.mse_loss(out.hidden.float(), teacher_hidden.float())
        stats["kd"] = kd.detach()
        return loss, stats


def distillation(teacher: nn.Module, **options) -> Distillation:
    """The KD objective for fit(); options as :class:`Distillation`."""
    return Distillation(teacher, **options)


__all__ = ["Distillation", "distillation", "kd_loss", "sparse_kd_loss"]
