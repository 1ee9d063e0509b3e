"""Continuous batching: one thread owns the model and runs steps; requests join and leave rows.

Every step: drop cancelled / timed-out sequences (their rows are free at once), admit waiting
sequences into free rows, run prefill chunks of newcomers (a token budget per step, so a long
prompt cannot stall everyone's next token), then one decode step for all rows. Each sequence
keeps its own sampling settings, seed (its own ``torch.Generator``), repetition history and
model-owned state (the NeoFormer-X RMC summary, through the model's state hooks).

Results go out through ``Sequence.emit(event)``, called on the scheduler thread; the web layer
turns events into HTTP responses (it hands in a thread-safe callback).
"""
from __future__ import annotations

import collections
import itertools
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..generate.config import GenerationConfig
from ..generate.engine import CPU_COMPILE_OPTIONS, forward_tokens
from ..generate.sampling import History, choose, process
from ..generate.stops import StopStrings
from ..kinds import get as model_kind
from .rows import CrossSlots, DecodeStep, PrefillChunk, RowSlots, window


class QueueFull(Exception):
    """The waiting queue is at its bound (HTTP 429)."""


@dataclass
class Sampling:
    """One sequence's decoding settings (OpenAI names plus vLLM's extensions)."""

    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per token (0 = only the chosen one), None = off
    prompt_logprobs: bool = False  # echo + logprobs: log-probabilities of the prompt tokens too

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None,
                                min_p=self.min_p or None, repetition_penalty=self.repetition_penalty)


@dataclass
class Event:
    """A generated token (``token`` with its ``logprob`` info) or the end (``finish`` reason)."""

    token: int | None = None
    logprob: tuple | None = None  # (logprob of the token, [(id, logprob), ...] top alternatives)
    finish: str | None = None  # "stop" | "length" | "timeout" | "cancelled" | "error: ..."
    prompt_logprobs: list | None = None  # first event of an echo+logprobs sequence: one entry per prompt token


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    deadline: float = float("inf")  # time.monotonic() after which it times out (also while waiting)
    id: int = field(default_factory=lambda: next(_ids))
    row: int | None = None
    prefilled: int = 0  # prompt tokens already in the row
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    state: Any = None  # model-owned state while prefilling
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def cancel(self) -> None:  # any thread; the scheduler frees the row on its next step
        self.cancelled = True


class Scheduler:
    """Owns the model on one thread. ``submit`` a Sequence; ``call`` runs a function between steps."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 32,
                 metrics=None, compile: bool = False, batch_invariant: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.kind = model_kind(model)
        self.capacity = model.config.max_seq_len
        self.rows: list[Sequence | None] = [None] * max_batch
        self.batch_invariant = batch_invariant  # decode every row each step (see rows.py)
        # at most one chunk's worth of prompt tokens per step, while other rows wait for their next token
        self.max_queue, self.chunk = max_queue, prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.tasks: collections.deque[tuple[Callable, Future]] = collections.deque()
        self.metrics = metrics
        self.wake = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.device = next(model.parameters()).device
        self.eos = {tokenizer.eos_id} if tokenizer is not None and tokenizer.eos_id is not None else set()
        if self.kind.cache.generates:
            self.slots = RowSlots(model, max_batch, self.capacity)
            self.cross = CrossSlots(model, max_batch, self.capacity) if self.kind.cache.cross_attention else None
            self.lengths = torch.zeros(max_batch, dtype=torch.long, device=self.device)
            self.inputs = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._decode = self._compiled_decode() if compile else self._eager_decode

    # ---- the outside world (any thread) ---------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self.waiting.append(seq)
            self.wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the model thread between steps (embeddings, tokenizer-free forwards)."""
        future: Future = Future()
        with self.wake:
            self.tasks.append((fn, future))
            self.wake.notify()
        return future

    @property
    def running(self) -> int:
        return sum(seq is not None for seq in self.rows)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="neoformer-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything still waiting or running and end the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout)
        for seq in [*self.waiting, *(s for s in self.rows if s is not None)]:
            seq.emit(Event(finish="cancelled"))
        self.waiting.clear()
        self.rows = [None] * len(self.rows)

    # ---- the model thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        # The event loop thread needs the GIL for every token it sends; with the default 5 ms switch
        # interval a lone request waited ~4 handoffs per token (22 ms ITL vs 6 ms per step, measured).
        sys.setswitchinterval(0.0005)
        while True:
            with self.wake:
                while not self.stopping and not self.tasks and not self.waiting and not self.running:
                    self.wake.wait(0.5)
                if self.stopping:
                    return
                tasks, self.tasks = list(self.tasks), collections.deque()
            for fn, future in tasks:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as err:  # noqa: BLE001 - handed to the caller
                        future.set_exception(err)
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as err:  # noqa: BLE001 - one bad step must not kill the server
                for seq in [*(s for s in self.rows if s is not None)]:
                    self._finish(seq, f"error: {type(err).__name__}: {err}")
            time.sleep(0)  # hand the GIL to the event loop now, so the tokens just emitted go out at once

    def step(self) -> None:
        self._expire()
        self._admit()
        budget = self.chunk
        for seq in [s for s in self.rows if s is not None and s.prefilled < len(s.prompt)]:
            if self._next_chunk_len(seq) > budget:  # a strict bound keeps every step's cost, and so each gap, flat
                break
            budget -= self._prefill_chunk(seq)
        if any(s is not None and s.prefilled == len(s.prompt) for s in self.rows):
            self._decode_step()

    def _expire(self) -> None:
        now = time.monotonic()
        with self.wake:
            for seq in [s for s in self.waiting if s.cancelled or now > s.deadline]:
                self.waiting.remove(seq)
                seq.emit(Event(finish="cancelled" if seq.cancelled else "timeout"))
        for seq in [s for s in self.rows if s is not None and (s.cancelled or now > s.deadline)]:
            self._finish(seq, "cancelled" if seq.cancelled else "timeout")

    def _admit(self) -> None:
        with self.wake:
            for row, seq in enumerate(self.rows):
                if seq is None and self.waiting:
                    new = self.waiting.popleft()
                    new.row = row
                    self.rows[row] = new
                    self._start(new)

    def _start(self, seq: Sequence) -> None:
        s = seq.sampling
        seq.cfg = s.generation_config()
        seq.history = History(seq.cfg, [seq.prompt], self.model.config.vocab_size, self.device)
        seq.plain = not seq.cfg.sampling and not seq.history.active  # greedy, nothing to process
        seq.generator = torch.Generator(device=self.device)
        seq.generator.manual_seed(s.seed if s.seed is not None else int(torch.randint(2**62, ()).item()))
        seq.stops = StopStrings(s.stop, self.tokenizer) if s.stop else None
        seq.prompt_lp = [None] if s.prompt_logprobs else None
        self.slots.clear_row(seq.row)
        self.lengths[seq.row] = 0
        if self.cross is not None:  # encode the source once; the decoder starts from one start token
            src = torch.tensor([seq.prompt], device=self.device)
            self.cross.put(seq.row, self.model.cross_kv(self.model.encode(src)))
            seq.source, seq.prompt = seq.prompt, [self._start_token()]

    def _start_token(self) -> int:
        for tok in (self.model.config.pad_token_id, getattr(self.tokenizer, "bos_id", None), 0):
            if tok is not None:
                return tok

    def _encoded(self, rows: slice):
        from ..generate.engine import Encoded

        return None if self.cross is None else Encoded(*self.cross.rows(rows))

    def _next_chunk_len(self, seq: Sequence) -> int:
        # fixed boundaries (multiples of the chunk): a prompt gets the same math alone or not
        return min(len(seq.prompt), (seq.prefilled // self.chunk + 1) * self.chunk) - seq.prefilled

    def _prefill_chunk(self, seq: Sequence) -> int:
        """One chunk of seq's prompt; after the last one, its first token. Returns the chunk's size."""
        lo = seq.prefilled
        hi = lo + self._next_chunk_len(seq)
        ids = torch.tensor([seq.prompt[lo:hi]], device=self.device)
        positions = torch.arange(lo, hi, device=self.device)[None]
        chunk = PrefillChunk(self.slots, seq.row, lo, seq.state)
        every = seq.prompt_lp is not None
        logits = forward_tokens(self.model, chunk, ids, positions, None, self._encoded(slice(seq.row, seq.row + 1)), last_only=not every)
        seq.state, seq.prefilled = chunk.model_state, hi
        self.lengths[seq.row] = hi
        if every:
            self._prompt_logprobs(seq, logits[0], lo, hi)
            logits = logits[:, -1]
        if hi == len(seq.prompt):
            self.slots.join_state(seq.row, seq.state)
            seq.state = None
            if seq.sampling.max_tokens == 0:  # echo only: the prompt's log-probabilities, no new token
                seq.emit(Event(prompt_logprobs=seq.prompt_lp))
                self._finish(seq, "length")
            else:
                self._next(seq, logits)
        return hi - lo

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, lo: int, hi: int) -> None:
        """Log-probability of prompt tokens lo+1..hi from the logits of positions lo..hi-1."""
        lsm = torch.log_softmax(logits.float(), dim=-1)
        k = seq.sampling.logprobs or 0
        for i in range(hi - lo):
            if lo + i + 1 < len(seq.prompt):
                seq.prompt_lp.append(self._logprob_entry(lsm[i], seq.prompt[lo + i + 1], k))

    @staticmethod
    def _logprob_entry(lsm: torch.Tensor, token: int, k: int) -> tuple:
        top = []
        if k:
            values, ids = torch.topk(lsm, k)
            top = list(zip(ids.tolist(), values.tolist()))
        return float(lsm[token]), top

    def _eager_decode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Batch-invariant: every row, so every GEMM has the same M. Otherwise only the rows up to the
        last busy one (rows fill from 0): faster at low load, but a row's bits then depend on M."""
        n = len(self.rows)
        if not self.batch_invariant and self.slots.model_state is None:
            n = max(i for i, seq in enumerate(self.rows) if seq is not None) + 1
        return self._decode_rows(tokens, lengths, window(int(lengths[:n].max()) + 1, self.capacity), n)

    def _decode_rows(self, tokens: torch.Tensor, lengths: torch.Tensor, width: int, n: int) -> torch.Tensor:
        step = DecodeStep(self.slots, lengths, width, n)
        encoded = self._encoded(slice(0, n))
        return forward_tokens(self.model, step, tokens[:n, None], lengths[:n, None], None, encoded)

    def _compiled_decode(self):
        """--compile: the decode step over every row, compiled once per attention window (a
        multiple of 64 slots, so at most capacity / 64 graphs); on CPU with inductor's C++ wrapper."""
        options = CPU_COMPILE_OPTIONS if self.device.type == "cpu" else None
        compiled = torch.compile(self._decode_rows, dynamic=False, options=options)
        return lambda tokens, lengths: compiled(tokens, lengths, window(int(lengths.max()) + 1, self.capacity),
                                                len(self.rows))

    def _decode_step(self) -> None:
        """One token for every running row: one argmax, one log-softmax for the rows that want
        log-probabilities and one host copy of each per step, not per row."""
        logits = self._decode(self.inputs, self.lengths.clone())
        ready = [(row, seq) for row, seq in enumerate(self.rows[:logits.shape[0]])
                 if seq is not None and seq.prefilled == len(seq.prompt)]
        rows = torch.tensor([row for row, _ in ready], dtype=torch.long, device=self.device)
        self.lengths[rows] += 1
        greedy = logits.argmax(dim=-1).tolist()
        tokens = [self._choose(seq, logits[row:row + 1], greedy[row]) for row, seq in ready]
        logprobs = self._logprobs(logits, ready, tokens)
        now = time.monotonic()
        going = [(seq.row, token) for (row, seq), token, logprob in zip(ready, tokens, logprobs)
                 if self._emit(seq, token, logprob, now)]
        if going:
            self.inputs[torch.tensor([r for r, _ in going], device=self.device)] = torch.tensor(
                [t for _, t in going], device=self.device)

    def _logprobs(self, logits: torch.Tensor, ready: list, tokens: list[int]) -> list:
        """(logprob of the chosen token, top alternatives) per ready row, None where not asked."""
        out: list = [None] * len(ready)
        wanted = [i for i, (_, seq) in enumerate(ready) if seq.sampling.logprobs is not None]
        if not wanted:
            return out
        index = torch.tensor([ready[i][0] for i in wanted], device=self.device)
        lsm = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
        chosen = lsm.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=self.device))[:, 0].tolist()
        tops: dict[int, list] = {}
        for k in {ready[i][1].sampling.logprobs for i in wanted} - {0}:  # rows grouped by their k: topk(k) alone
            at = [j for j, i in enumerate(wanted) if ready[i][1].sampling.logprobs == k]
            values, ids = torch.topk(lsm[at], k)
            tops.update(zip(at, (list(zip(*pair)) for pair in zip(ids.tolist(), values.tolist()))))
        for j, i in enumerate(wanted):
            out[i] = (chosen[j], tops.get(j, []))
        return out

    def _next(self, seq: Sequence, logits: torch.Tensor) -> None:
        """A newly prefilled sequence's first token from its (1, V) logits."""
        token = self._choose(seq, logits, None)
        logprob = None
        if seq.sampling.logprobs is not None:
            logprob = self._logprob_entry(torch.log_softmax(logits[0].float(), dim=-1), token, seq.sampling.logprobs)
        if self._emit(seq, token, logprob, time.monotonic()):
            self.inputs[seq.row] = token

    def _choose(self, seq: Sequence, logits: torch.Tensor, greedy: int | None) -> int:
        """seq's next token from its (1, V) logits (greedy: the argmax already computed for the batch)."""
        blocked = self.eos and len(seq.generated) < seq.sampling.min_tokens
        if seq.plain and not blocked and greedy is not None:
            return greedy
        raw = logits.float()
        if blocked:
            raw = raw.clone()
            raw[:, list(self.eos)] = float("-inf")
        return int(choose(process(raw, seq.cfg, seq.history), seq.cfg.sampling, seq.generator)[0])

    def _emit(self, seq: Sequence, token: int, logprob: tuple | None, now: float) -> bool:
        """Send seq its token; finish it or return True (it goes on)."""
        s = seq.sampling
        if seq.first_token_at is None:
            seq.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - seq.arrived)
        elif self.metrics is not None:
            self.metrics.next_token(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated.append(token)
        if seq.history.active:
            seq.history.append(torch.tensor([token], device=self.device))
        first = seq.prompt_lp if len(seq.generated) == 1 else None
        seq.emit(Event(token=token, logprob=logprob, prompt_logprobs=first))
        if token in self.eos and not s.ignore_eos:
            self._finish(seq, "stop")
        elif seq.stops is not None and seq.stops.push(token):
            self._finish(seq, "stop")
        elif len(seq.generated) >= s.max_tokens:
            self._finish(seq, "length")
        else:
            return True
        return False

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.row is not None and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
            self.slots.clear_row(seq.row)
            self.lengths[seq.row] = 0
            self.inputs[seq.row] = 0
        seq.emit(Event(finish=reason))
