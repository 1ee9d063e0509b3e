"""Bookkeeping around the training loop: stop signals, metrics log, CPU thread tuning, progress bar.

The thread policy (:func:`apply_threads`, :class:`ThreadTuner`) serves every command that runs a
model on the CPU: train, eval and generate all take ``--threads N|auto``.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import torch

from .run_config import TrainConfig


class StopSignals:
    """SIGINT / SIGTERM set a flag that the loop checks between steps (a second Ctrl-C raises)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl up to ``step``. A torn last line (killed mid-append) is dropped;
    any other line that is not a JSON record is a one-line error naming the file and line."""
    numbered = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    kept = []
    for n, line in numbered:
        try:
            record = json.loads(line)
            at = record.get("step", 0)
            if not isinstance(at, (int, float)):
                raise ValueError
        except (ValueError, AttributeError):
            if n == numbered[-1][0]:
                break
            raise ValueError(f"{path} line {n} is not a JSON record; fix or delete that line, then resume") from None
        if at <= step:
            kept.append(line)
    return kept


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, when installed, TensorBoard."""

    def __init__(self, out_dir: Path | None, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl" if out_dir is not None else None
        self.history: list[dict] = []
        self._tb = None
        if self.path is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():  # drop lines written after the checkpoint
            kept = _lines_up_to(self.path, resume_step)
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"), flush_secs=10)  # readable while training
        except ImportError:
            self._tb = None

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class ThreadTuner:
    """``train.threads: auto`` on CPU: time a few steps with torch's thread count and with one
    thread, keep the faster, and check again every ``every`` seconds.

    Why: when another process keeps a core busy, OpenMP threads spin against it and a step
    can get ~9x slower with 2 threads than with 1 (measured on 2 vCPUs); on an idle machine
    2 threads are ~1.7x faster. (The thread count can change float rounding, so runs that must
    be bit-reproducible should pin ``threads``.)
    """

    def __init__(self, log: Callable[[str], None], every: float = 60.0, probe: int = 3, warmup: int = 2):
        self.log, self.every, self.probe, self.warmup = log, every, probe, warmup
        self.most = torch.get_num_threads()
        self.current = self.most
        self.times: list[float] = []
        self.phase, self.baseline, self.idle_since = "warmup", 0.0, 0.0

    def after_step(self, seconds: float) -> None:
        if self.most < 2:
            return
        if self.phase == "warmup":
            self.warmup -= 1
            if self.warmup <= 0:
                self.phase, self.times = "current", []
            return
        if self.phase == "idle":
            if time.perf_counter() - self.idle_since >= self.every:
                self.phase, self.times = "current", []
            return
        self.times.append(seconds)
        if len(self.times) < self.probe:
            return
        median = sorted(self.times)[len(self.times) // 2]
        if self.phase == "current":
            self.baseline, self.times, self.phase = median, [], "other"
            torch.set_num_threads(1 if self.current == self.most else self.most)
            return
        other = torch.get_num_threads()
        if median < 0.9 * self.baseline:  # the other setting is clearly faster: keep it
            if other != self.current:
                why = "the CPU is busy with another process" if other == 1 else "the CPU is free again"
                self.log(f"note: {other} CPU thread{'s' if other > 1 else ''} now ({why}: "
                         f"{self.baseline / median:.1f}x faster steps than with {self.current})")
            self.current = other
        else:
            torch.set_num_threads(self.current)
        self.phase, self.idle_since, self.times = "idle", time.perf_counter(), []


def apply_threads(threads: int | str | None, device_type: str, log: Callable[[str], None]) -> ThreadTuner | None:
    """``--threads``: a number pins torch's CPU threads; ``auto`` on a CPU device returns a
    :class:`ThreadTuner` for the caller to feed with step times; None leaves torch's default."""
    if isinstance(threads, int):
        torch.set_num_threads(threads)
    elif threads == "auto" and device_type == "cpu":
        return ThreadTuner(log)
    return None


def tuned(items: Iterable, tuner: ThreadTuner | None) -> Iterator:
    """``items`` unchanged, feeding ``tuner`` the time to produce and consume each one
    (an eval batch, a generated piece of text)."""
    if tuner is None:
        yield from items
        return
    last = time.perf_counter()
    for item in items:
        yield item
        now = time.perf_counter()
        tuner.after_step(now - last)
        last = now


class ProgressBar:
    """tqdm bar over steps with loss, tokens/s and ETA (the total adapts to a time budget).

    Only on a terminal: without a TTY (CI, ``| tee``, nohup) the carriage-return frames would pile up
    into one huge line, so ``bar`` stays None and the loop prints one log line per interval instead.
    """

    def __init__(self, cfg: TrainConfig, start_step: int, log: Callable[[str], None], stream: TextIO | None = None):
        stream = sys.stderr if stream is None else stream
        self.bar = None
        self.log = log
        if cfg.progress and _can_redraw(stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=True,
                            file=stream)
            self.log = self.bar.write

    def update(self, step: int, postfix: dict, estimated_total: int | None = None) -> None:
        if self.bar is None:
            return
        if estimated_total is not None and estimated_total != self.bar.total:
            self.bar.total = estimated_total
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _can_redraw(stream) -> bool:
    """A terminal, or a Jupyter kernel (where tqdm.auto draws a widget)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
