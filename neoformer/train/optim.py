"""Optimizers (AdamW, Lion, Muon + AdamW) and the warmup + cosine learning-rate schedule.

Weight decay applies to matrices only (linear weights, embeddings, RMC memory, NSB rules);
norm gains, biases and nGPT scales are never decayed, and nGPT models get no decay at all
(their weights live on the unit sphere).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .run_config import TrainConfig


def _closure_loss(closure):
    """The loss of an optimizer step's closure (run with grad on), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):

        c = beta1 * m + (1 - beta1) * g
        p = p - lr * (sign(c) + weight_decay * p)        (decoupled decay: p *= 1 - lr * wd)
        m = beta2 * m + (1 - beta2) * g

    Updates have unit magnitude per coordinate, so Lion wants a 3-10x smaller lr than AdamW.
    The step is written with ``torch._foreach`` ops over all parameters of a group.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion lr ({lr}) must be positive")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lion betas {betas} must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            moments = [self.state[p]["exp_avg"] for p in params]
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            update = torch._foreach_mul(moments, beta1)  # c = beta1 * m + (1 - beta1) * g
            torch._foreach_add_(update, grads, alpha=1.0 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_mul_(moments, beta2)  # m = beta2 * m + (1 - beta2) * g
            torch._foreach_add_(moments, grads, alpha=1.0 - beta2)
        return loss


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(("alpha", "scale"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and everything else (not decayed). Tied weights appear once."""
    ngpt = bool(getattr(getattr(model, "config", None), "ngpt", False))
    decay, keep = [], []
    for name, param in model.named_parameters():  # named_parameters() already skips tied duplicates
        if not param.requires_grad:
            continue
        (keep if ngpt or _no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _is_hidden_matrix(model: nn.Module, name: str, param: nn.Parameter) -> bool:
    """A 2-D weight inside a transformer block (attention and FFN projections): what Muon
    orthogonalises. Embeddings, the LM head, norms, gains and the memory layers stay on AdamW
    (Jordan et al. 2024; Moonshot's "Muon is Scalable for LLM Training", 2025)."""
    from ..model.block import Block

    if param.ndim != 2:
        return False
    modules = dict(model.named_modules())
    parts = name.split(".")[:-1]
    return any(isinstance(modules.get(".".join(parts[:i])), Block) for i in range(1, len(parts) + 1))


def muon_param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[dict]]:
    """(Muon groups: the blocks' 2-D weights, AdamW groups: everything else, decay-aware as
    ``param_groups``). nGPT models are not decayed."""
    ngpt = bool(getattr(getattr(model, "config", None), "ngpt", False))
    hidden = [p for n, p in model.named_parameters() if p.requires_grad and _is_hidden_matrix(model, n, p)]
    hidden_ids = {id(p) for p in hidden}
    rest = [g | {"params": [p for p in g["params"] if id(p) not in hidden_ids]} for g in param_groups(model, weight_decay)]
    muon = [{"params": hidden, "weight_decay": 0.0 if ngpt else weight_decay}]
    return [g for g in muon if g["params"]], [g for g in rest if g["params"]]


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz iterations of same-shaped matrices run as one batched
    matmul. torch 2.13 runs them one matrix at a time (no foreach path): for the 28 matrices of nanoGPT's
    Tiny Shakespeare shape that measured 22.5 ms per step, batched 14.7 ms (BENCHMARKS.md, issue 15
    update of 2026-12-07), against a ~78 ms fp32 step. Same update rule, state
    and state-dict format as torch's (so its checkpoints resume here): momentum lerp, Nesterov, the
    quintic iteration in bf16, ``adjust_lr_fn``, decoupled weight decay."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            momentum = group["momentum"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            by_shape: dict[tuple, list[int]] = {}
            for i, update in enumerate(updates):  # wide orientation: the Gram matrix is the smaller side
                by_shape.setdefault(tuple(sorted(update.shape)), []).append(i)
            for indices in by_shape.values():
                stacked = torch.stack([updates[i] if updates[i].shape[0] <= updates[i].shape[1] else updates[i].T
                                       for i in indices]).bfloat16()
                ortho = _newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for row, i in zip(ortho, indices):
                    param = params[i]
                    row = row if param.shape[0] <= param.shape[1] else row.T
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.add_(row, alpha=-_adjusted_lr(group["lr"], group["adjust_lr_fn"], param.shape))
        return loss


def _newton_schulz(x: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """(n, rows, cols) with rows <= cols -> each matrix's approximate orthogonalisation (Jordan et al. 2024)."""
    a, b, c = coefficients
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's lr adjustment for a matrix of ``shape`` (its private helper, re-stated)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    return lr


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` (Newton-Schulz orthogonalised momentum, Jordan et al. 2024) for the
    blocks' 2-D weights and AdamW for the rest, as one optimizer for fit(): its ``param_groups``
    are the two optimizers' own group dicts (so the schedule's ``set_lr`` reaches both), its
    state dict holds both states (bit-exact resume)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        muon_groups, adam_groups = muon_param_groups(model, cfg.weight_decay)
        # match_rms_adamw scales Muon's orthogonal updates to AdamW's RMS (Moonshot 2025), so the
        # schedule's one lr (train.lr) serves both optimizers
        self.muon = BatchedMuon(muon_groups, lr=cfg.lr, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
        self.adamw = _adamw(adam_groups, cfg)
        self.defaults = {"lr": cfg.lr}
        self.state = {}  # per-parameter state lives in the two inner optimizers
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @property
    def param_groups(self) -> list[dict]:  # read each time: load_state_dict replaces the inner group dicts
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """Fused AdamW kernels exist for CUDA/MPS/CPU (torch >= 2.4) floating tensors."""
    return all(p.is_floating_point() and p.device.type in ("cuda", "cpu", "mps", "xpu") for p in params)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused kernel when available, else foreach), Lion, or Muon + AdamW, with decay-aware groups."""
    if cfg.optimizer == "muon":
        return MuonWithAdamW(model, cfg)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lion":
        return Lion(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return _adamw(groups, cfg)


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    betas = (cfg.beta1, cfg.beta2)
    if _fused_ok(params):
        try:
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=True)
        except (RuntimeError, TypeError, ValueError):  # older torch or an unsupported device
            pass
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, foreach=True)


class WarmupCosine:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``.

    ``progress`` in [0, 1] is how far past warmup the run is: (step - warmup) / (max_steps -
    warmup), or -- with a time budget -- the larger of that and elapsed / budget, so a run cut
    short by its budget still ends at ``min_lr``.
    """

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, max_steps: int):
        self.lr, self.min_lr, self.warmup_steps, self.max_steps = lr, min_lr, warmup_steps, max_steps

    def progress(self, step: int, time_fraction: float = 0.0) -> float:
        span = max(1, self.max_steps - self.warmup_steps)
        return min(1.0, max((step - self.warmup_steps) / span, time_fraction, 0.0))

    def __call__(self, step: int, time_fraction: float = 0.0) -> float:
        """Learning rate for optimizer step ``step`` (0-based: the first step uses ``lr_at(0)``)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress(step, time_fraction)))
        return self.min_lr + (self.lr - self.min_lr) * cosine

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "WarmupCosine":
        return cls(cfg.lr, cfg.final_lr, cfg.warmup, cfg.max_steps)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps, "max_steps": self.max_steps}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


__all__ = ["Lion", "BatchedMuon", "MuonWithAdamW", "WarmupCosine", "build_optimizer", "param_groups", "muon_param_groups", "set_lr"]
