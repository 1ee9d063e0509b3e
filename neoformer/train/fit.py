"""One training loop for every objective: ``fit(model, objective, batches, cfg)``.

fit() knows models only through ``objective(model, batch) -> (loss, stats)`` and a few optional
hooks every neoformer model has: ``model.after_optimizer_step(delta, memory_lr)`` (called after
each optimizer step with the mean of ``stats["delta"]``: the NeoFormer-X memory write, the nGPT
renormalisation) and ``model.set_gradient_checkpointing``. One optimizer step::

    lr = warmup_cosine(step)
    for each of grad_accum micro-batches:
        with autocast: loss, stats = objective(model, batch)
        scaler.scale(loss / grad_accum).backward()
    stop if loss or grad norm is NaN/inf (no checkpoint is written: the last good one stays)
    clip grads; optimizer step; model.after_optimizer_step (RMC update, nGPT normalisation)
    stop if any weight became NaN/inf (an update that overflowed, e.g. a huge lr)
    log / evaluate / checkpoint on schedule; SIGINT or SIGTERM -> checkpoint and return
    (a second Ctrl-C aborts at once, without saving)

A time budget counts the training time of this start (a resumed run gets the whole budget
again and the cosine stretches over the total) unless ``budget_across_resumes`` is set; the
validation before the first step does not count.

Resume restores weights, optimizer, GradScaler, step, RNG states (python, numpy, torch) and the
batch source position (``state_dict`` / ``load_state_dict``, or by replaying the batches a
stateless iterator already produced), so a resumed run is bit-identical to an uninterrupted one
on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import capture_rng_state, load_training, resolve_checkpoint, restore_rng_state, save_training, unwrap
from ..parallel import (  # parallel: DDP / FSDP2 under torchrun (no-ops in one process)
    ParallelContext, ShardedBatches, clip_grad_norm_, set_grad_sync,
)
from ..kernels import kernels_available
from ..parallel import apply as apply_parallel
from .monitor import MetricsLog, ProgressBar, StopSignals, apply_threads
from .objectives import Objective
from .optim import WarmupCosine, build_optimizer, set_lr
from .run_config import TrainConfig

Callback = Callable[[str, dict], None]
# stop reasons in rising priority: under torchrun the highest any rank reports stops all (parallel)
STOP_REASONS = ("max_steps", "max_tokens", "time_budget", "terminated", "interrupted")


def _silent(*args, **kwargs) -> None:  # parallel: the log of ranks other than 0
    pass


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the weights became NaN/inf. The message names the last good checkpoint."""


def weights_are_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite: fused norms, one host sync (~0.1% of a step on CPU)."""
    # parallel: FSDP parameters are DTensors; each rank checks its own shard
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    tensors = [t.detach() for t in local if t.numel()]

    def all_finite(order: float) -> bool:
        return not tensors or bool(torch.stack([n.float() for n in torch._foreach_norm(tensors, order)]).isfinite().all())

    # the L2 norm is ~20x faster than max-abs on CPU; it also overflows for huge finite weights,
    # so only a non-finite L2 norm is confirmed with the exact max-abs
    return all_finite(2.0) or all_finite(float("inf"))


@dataclass
class FitResult:
    step: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    stop_reason: str  # max_steps | max_tokens | time_budget | data_exhausted | interrupted | terminated
    checkpoint: Path | None
    elapsed: float
    out_dir: Path | None

    @property
    def val_ppl(self) -> float | None:
        return None if self.val_loss is None else math.exp(min(self.val_loss, 50.0))


# ---- small helpers ---------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """auto | cpu | cuda[:N] | mps as a torch.device; a ValueError naming the flag if it is not available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} requested but MPS is not available; use --device cpu")
    return device


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (Linux CPU flags): bf16 matmuls run in hardware. Without them CPU bf16 is
    emulated and slower than fp32, so ``auto`` keeps fp32 there (and on non-Linux hosts, untested)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto`` = bf16 (else fp16) on CUDA; on CPU bf16 where the CPU
    has native bf16 (same val loss, 1.3-1.7x faster steps; BENCHMARKS.md), else fp32; fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def describe_precision(precision: str, device: torch.device) -> str:
    """What ``precision`` means on ``device``, for the run header."""
    dtype = resolve_precision(precision, device)
    text = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]
    if precision == "auto" and device.type == "cpu" and dtype is not None:
        text += " (auto: this CPU has native bf16; attention stays fp32; --precision fp32 to turn off)"
    return text


def move_batch(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (tensor, tuple, list, dict or dataclass) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_batch(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: Iterable, max_batches: int | None = None,
             device: torch.device | None = None, amp_dtype: torch.dtype | None = None) -> float | None:
    """Mean loss per target position over ``batches`` (None when there are none). RNG untouched."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0.0
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for number, batch in enumerate(batches):
                if max_batches is not None and number >= max_batches:
                    break
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, stats = objective(model, move_batch(batch, device))
                count = float(stats.get("targets", 1))
                total += float(loss) * count
                weight += count
    finally:
        model.train(was_training)
    return total / weight if weight else None


# ---- the loop --------------------------------------------------------------------------------
class Trainer:
    """State of one fit() call. Use :func:`fit`; the class only splits the loop into readable parts."""

    def __init__(self, model: nn.Module, objective: Objective, batches: Iterable, cfg: TrainConfig, *,
                 val_batches: Callable[[], Iterable] | Iterable | None = None, out_dir: str | os.PathLike | None = None,
                 tokenizer=None, run_config: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                 callbacks: Sequence[Callback] = (), log: Callable[[str], None] = print,
                 parallel: ParallelContext | None = None, parallel_mode: str | None = None):
        # parallel: only rank 0 logs, shows progress and writes metrics; see neoformer.parallel
        self.ctx = parallel if parallel is not None else ParallelContext()
        if not self.ctx.is_main:
            log = _silent
        self.cfg, self.objective, self.tokenizer = cfg, objective, tokenizer
        self.batches, self.val_batches = batches, val_batches
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_config, self.callbacks, self._log = dict(run_config or {}), list(callbacks), log
        if isinstance(cfg.threads, int):
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.device = self.ctx.device if self.ctx.distributed else resolve_device(cfg.device)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu":
            kernels_available()  # the fused cross-entropy of the chunked loss (PyTorch's ops where it cannot load)
        self.raw = unwrap(model).to(self.device)
        self.model = model
        if cfg.gradient_checkpointing and hasattr(self.raw, "set_gradient_checkpointing"):
            self.raw.set_gradient_checkpointing(True)
        if self.ctx.distributed:  # parallel: AC -> compile (per block) -> DDP/FSDP, before the optimizer
            apply_parallel(self.raw, self.ctx, parallel_mode, activation_checkpointing=cfg.gradient_checkpointing,
                           compile=cfg.compile, mixed_precision=self.amp_dtype)
            self.batches = batches = ShardedBatches(batches, self.ctx)  # each rank: its rows of the global batch
        self.optimizer = optimizer or build_optimizer(self.raw, cfg)
        self.schedule = WarmupCosine.from_config(cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step_fn = torch.compile(objective) if cfg.compile and not self.ctx.distributed else objective
        self.step = self.tokens = self.consumed = 0
        self.elapsed_before = 0.0
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.ckpt_root = self.out_dir / "checkpoints" if self.out_dir is not None else None

    # -- resume -------------------------------------------------------------------------------
    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        path = resolve_checkpoint(checkpoint)
        state = load_training(path, self.raw, self.optimizer, self.ctx)  # parallel: any world size, sharded or not
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.consumed, self.elapsed_before = int(state["consumed"]), float(state["elapsed"])
        self.train_loss, self.val_loss = state.get("train_loss"), state.get("val_loss")
        self.last_checkpoint = path
        data_state = state.get("data")
        if data_state is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(data_state)
            self._iter = iter(self.batches)
        else:  # a stateless iterator: replay the batches it already produced
            self._iter = iter(self.batches)
            for _ in range(self.consumed):
                next(self._iter)
        restore_rng_state(state["rng"])

    # -- one optimizer step -------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> tuple[float, float | None, int] | None:
        """One optimizer step; (loss, grad norm or None, tokens), or None when the data ran out."""
        cfg = self.cfg
        set_lr(self.optimizer, self.lr)
        loss_sum, tokens, deltas = None, 0, []
        for micro in range(cfg.grad_accum):
            try:
                batch = next(self._iter)
            except StopIteration:
                set_grad_sync(self.raw, True)
                return None
            self.consumed += 1
            with self._autocast():
                loss, stats = self.step_fn(self.model, move_batch(batch, self.device))
            loss = loss * self.ctx.token_share(stats.get("targets"))  # parallel: weigh ranks by their targets
            # parallel: gradients are reduced once per step, after the last micro-batch (no-op in one process)
            set_grad_sync(self.raw, micro == cfg.grad_accum - 1)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
            tokens += int(stats.get("tokens", 0))
            if stats.get("delta") is not None:
                deltas.append(stats["delta"])
        mean_loss = loss_sum / cfg.grad_accum
        norm = None
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)  # parallel: plain tensor for DTensors
        bad = ~torch.isfinite(mean_loss)
        if norm is not None and not self.scaler.is_enabled():  # fp16: the scaler skips inf steps itself
            bad = bad | ~torch.isfinite(norm)
        if self.ctx.any(bool(bad)):  # parallel: every rank stops together
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(float(mean_loss), None if norm is None else float(norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # parallel: the mean over all ranks' rows
        delta = self.ctx.all_reduce_mean_(torch.cat(deltas).float().mean(0)) if deltas else None
        if hasattr(self.raw, "after_optimizer_step"):
            self.raw.after_optimizer_step(delta, memory_lr=cfg.rmc_lr)
        if self.ctx.any(not weights_are_finite(self.raw)):  # an overflowing update (e.g. lr 1e38): never train on
            raise self._diverged(float(mean_loss), None if norm is None else float(norm), weights=True)
        # parallel: loss averaged over ranks, tokens of the global batch (ranks hold equal shares)
        return self.ctx.mean(mean_loss), (None if norm is None else float(norm)), tokens * self.ctx.world_size

    def _diverged(self, loss: float, norm: float | None, weights: bool = False) -> TrainingDiverged:
        if weights:
            what = f"the weights became NaN/inf in the update (lr {self.optimizer.param_groups[0]['lr']:.3g})"
        else:
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        self.metrics.write({"step": self.step + 1, "event": "diverged", "weights_finite": not weights,
                            "loss": loss if math.isfinite(loss) else str(loss)})
        return TrainingDiverged(f"{what} at step {self.step + 1}; training stopped, {where}. "
                                "Lower train.lr, raise train.warmup_steps or use --precision fp32, then --resume")

    # -- schedule and limits ------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    @property
    def time_fraction(self) -> float:
        return self.elapsed / self.budget_end if self.budget_end else 0.0

    @property
    def lr(self) -> float:
        return self.schedule(self.step, self.time_fraction)

    def stop_reason(self) -> str | None:
        """Why to stop now (None = go on); under torchrun every rank gets the same answer."""
        return self.ctx.agree(self._local_stop_reason(), STOP_REASONS)

    def _local_stop_reason(self) -> str | None:
        cfg = self.cfg
        if self.signals.received is not None:
            return "interrupted" if self.signals.received == signal.SIGINT else "terminated"
        if self.step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_tokens is not None and self.tokens >= cfg.max_tokens:
            return "max_tokens"
        if self.budget_end is not None and self.elapsed >= self.budget_end:
            return "time_budget"
        return None

    # -- evaluation, checkpoints, logging -----------------------------------------------------
    def run_eval(self) -> float | None:
        if self.val_batches is None:
            return None
        source = self.val_batches() if callable(self.val_batches) else self.val_batches
        self._evaluated_at = self.step
        self.val_loss = evaluate(self.model, self.objective, source, self.cfg.eval_batches, self.device, self.amp_dtype)
        if self.val_loss is not None:
            ppl = math.exp(min(self.val_loss, 50.0))
            train = "" if self.train_loss is None else \
                f"train loss {self.train_loss:.4f} ppl {math.exp(min(self.train_loss, 50.0)):.2f} | "
            self.log(f"step {self.step:>6} | {train}val loss {self.val_loss:.4f} ppl {ppl:.2f}")
            self.metrics.write({"step": self.step, "val_loss": self.val_loss, "val_ppl": ppl, "tokens": self.tokens,
                                "elapsed": round(self.elapsed, 3)})
            self._emit("eval", {"step": self.step, "val_loss": self.val_loss})
        return self.val_loss

    def training_state(self) -> dict:
        state = {"step": self.step, "tokens": self.tokens, "consumed": self.consumed, "elapsed": self.elapsed,
                 "train_loss": self.train_loss, "val_loss": self.val_loss,
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "schedule": self.schedule.state_dict(), "rng": capture_rng_state()}
        if hasattr(self.batches, "state_dict"):
            state["data"] = self.batches.state_dict()
        return state

    def save(self) -> Path | None:
        if self.ckpt_root is None:
            return None
        config = {"model": self.raw.config.to_dict() if hasattr(self.raw, "config") else None,
                  "train": self.cfg.to_dict(), **self.run_config}
        # parallel: FSDP ranks each write their shards; DDP replicas are identical, so rank 0 writes
        self.last_checkpoint = save_training(self.ckpt_root, self.step, self.raw, self.optimizer, self.ctx,
                                             config=config, tokenizer=self.tokenizer,
                                             training_state=self.training_state(), keep_last=self.cfg.keep_last)
        self.ctx.barrier()
        self._emit("save", {"step": self.step, "path": self.last_checkpoint})
        return self.last_checkpoint

    def log(self, message: str) -> None:
        (self.progress.log if getattr(self, "progress", None) else self._log)(message)

    def _emit(self, event: str, info: dict) -> None:
        for callback in self.callbacks:
            callback(event, info)

    def _after_step(self, loss: float, norm: float | None, tok_rate: float) -> None:
        cfg = self.cfg
        self.train_loss = loss
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            record = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                      "tokens": self.tokens, "tok_per_s": round(tok_rate, 1), "elapsed": round(self.elapsed, 3)}
            if norm is not None:
                record["grad_norm"] = norm
            self.metrics.write(record)
            self._emit("step", record)
            if self.progress.bar is None:
                self.log(f"step {self.step:>6} | loss {loss:.4f} | lr {record['lr']:.2e} | {tok_rate:,.0f} tok/s")
        estimated = None
        if cfg.time_budget:
            per_step = max(1e-9, (self.elapsed - self._elapsed_at_start) / max(1, self.step - self._start_step))
            estimated = min(cfg.max_steps, self.step + int(max(0.0, self.budget_end - self.elapsed) / per_step))
        self.progress.update(self.step, {"loss": f"{loss:.3f}", "tok/s": f"{tok_rate:,.0f}"}, estimated)
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            self.run_eval()
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save()

    def run(self, resume: str | os.PathLike | bool | None = None) -> FitResult:
        cfg = self.cfg
        self._iter = iter(self.batches)
        resume_path = None
        if resume:
            resume_path = self.ckpt_root if resume is True else resume
            if resume_path is None:
                raise ValueError("resume=True needs out_dir (the run directory holding checkpoints/)")
            self.resume_from(resume_path)
        self.metrics = MetricsLog(self.out_dir if self.ctx.is_main else None,  # parallel: rank 0 writes
                                self.step if resume_path is not None else None)
        self.model.train()
        self._t0 = time.perf_counter()
        self._start_step, self._elapsed_at_start = self.step, self.elapsed_before
        self.budget_end = None  # elapsed seconds at which the time budget runs out
        if cfg.time_budget:
            self.budget_end = cfg.time_budget + (0.0 if cfg.budget_across_resumes else self.elapsed_before)
        self.progress = ProgressBar(cfg if self.ctx.is_main else cfg.replace(progress=False), self.step, self._log)
        self._evaluated_at = None
        self.tuner = apply_threads(cfg.threads, self.device.type, self.log)
        reason, rate = None, 0.0
        try:
            with StopSignals() as self.signals:
                if self.step == 0 and cfg.eval_every:
                    self.run_eval()
                    self._t0 = time.perf_counter()  # the budget is for training: a short one must not go to eval
                while (reason := self.stop_reason()) is None:
                    started = time.perf_counter()
                    result = self.train_step()
                    if result is None:
                        reason = "data_exhausted"
                        break
                    loss, norm, tokens = result
                    self.step += 1
                    self.tokens += tokens
                    seconds = max(time.perf_counter() - started, 1e-9)
                    if self.tuner is not None:
                        self.tuner.after_step(seconds)
                    rate = tokens / seconds if rate == 0.0 else 0.9 * rate + 0.1 * tokens / seconds
                    self._after_step(loss, norm, rate)
        except KeyboardInterrupt:  # a second Ctrl-C: abort at once; mid-step, a save would be torn
            self._close()
            kept = f"; the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            self._log(f"aborted during step {self.step + 1} without saving{kept}")
            raise
        except BaseException:  # divergence or a bug: close the bar and metrics, keep checkpoints as they are
            self._close()
            raise
        self.progress.close()
        return self._finish(reason)

    def _why_no_steps(self, reason: str) -> str:
        cfg = self.cfg
        if reason == "max_steps":
            return f"the run is already at step {self.step} and train.max_steps is {cfg.max_steps}; raise --max-steps"
        if reason == "max_tokens":
            return (f"the run has already seen {self.tokens:,} tokens (train.max_tokens {cfg.max_tokens:,}); "
                    "raise --max-tokens")
        if reason == "time_budget":
            return (f"the time budget of {cfg.time_budget:g} s was already spent ({self.elapsed_before:.0f} s counted "
                    "across resumes); raise --time-budget or set --train.budget_across_resumes false")
        return "the training data gave no batch; add data or lower --batch / --seq"

    def _close(self) -> None:
        self.progress.close()
        self.metrics.close()

    def _finish(self, reason: str) -> FitResult:
        cfg = self.cfg
        interrupted = reason in ("interrupted", "terminated")
        if not interrupted and self._evaluated_at != self.step:
            self.run_eval()
        saved_now = self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.step:06d}"
        if self.ckpt_root is not None and not saved_now and self.step > 0:
            self.save()
        if interrupted:
            where = f"; checkpoint {self.last_checkpoint}, continue with --resume" if self.last_checkpoint else ""
            self._log(f"{reason} at step {self.step}{where}")
        elif self.step == self._start_step:
            self._log(f"note: no steps trained: {self._why_no_steps(reason)}")
        self.metrics.write({"step": self.step, "event": "end", "reason": reason, "tokens": self.tokens,
                            "elapsed": round(self.elapsed, 3)})
        self.metrics.close()
        if cfg.plot and self.out_dir is not None and self.metrics.path is not None:
            from ..plotting import plot_metrics

            png = plot_metrics(self.metrics.path, self.out_dir / "loss_curve.png")
            if png is not None:
                self._log(f"loss curve: {png}")
        result = FitResult(self.step, self.tokens, self.train_loss, self.val_loss, reason, self.last_checkpoint,
                           self.elapsed, self.out_dir)
        self._emit("end", dataclasses.asdict(result))
        return result


def fit(model: nn.Module, objective: Objective, batches: Iterable, cfg: TrainConfig | None = None, *,
        val_batches: Callable[[], Iterable] | Iterable | None = None, out_dir: str | os.PathLike | None = None,
        tokenizer=None, run_config: dict | None = None, resume: str | os.PathLike | bool | None = None,
        optimizer: torch.optim.Optimizer | None = None, callbacks: Sequence[Callback] = (),
        log: Callable[[str], None] = print, parallel: ParallelContext | None = None,
        parallel_mode: str | None = None) -> FitResult:
    """Train ``model`` with ``objective`` on ``batches`` until a limit of ``cfg`` is reached.

    Args:
        objective: ``(model, batch) -> (loss, stats)``; see :mod:`neoformer.train.objectives`.
        batches: an iterator of batches; if it has ``state_dict``/``load_state_dict`` its position
            is checkpointed, otherwise resume replays it from the start.
        val_batches: a zero-argument callable returning fresh validation batches (or a list).
        out_dir: run directory for ``metrics.jsonl``, ``checkpoints/`` and ``loss_curve.png``;
            None trains in memory only.
        run_config: extra JSON-able settings stored in every checkpoint's config.json.
        resume: True (``out_dir/checkpoints``) or a checkpoint / run directory to continue from.
        parallel: the ``neoformer.parallel.setup()`` context under torchrun; ``parallel_mode``
            ddp | fsdp | none (default ddp). ``batches`` then yield *global* batches that each
            rank slices; build ``optimizer`` (if given) after ``neoformer.parallel.apply``.
    Raises:
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is left in place).
    """
    trainer = Trainer(model, objective, batches, cfg or TrainConfig(), val_batches=val_batches, out_dir=out_dir,
                      tokenizer=tokenizer, run_config=run_config, optimizer=optimizer, callbacks=callbacks, log=log,
                      parallel=parallel, parallel_mode=parallel_mode)
    return trainer.run(resume)


__all__ = ["fit", "evaluate", "FitResult", "TrainingDiverged", "Trainer", "resolve_device", "resolve_precision",
           "describe_precision", "move_batch", "seed_everything"]
