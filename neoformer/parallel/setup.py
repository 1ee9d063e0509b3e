"""Process group setup from the environment ``torchrun`` exports, and the collectives training needs.

``torchrun --nproc_per_node=N`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
Without them, :func:`setup` returns a single-process context and never touches
``torch.distributed``, so one code path serves a laptop, one GPU and many nodes.

Backend ``auto``: NCCL when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``),
otherwise Gloo on CPU. The CUDA path is written with care but is tested here only on CPU/Gloo.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

BACKENDS = ("auto", "nccl", "gloo")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class ParallelContext:
    """Where this process sits: rank among world_size, local rank on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None = no process group (single process)

    @property
    def distributed(self) -> bool:
        """True when a process group is up (even with world_size 1)."""
        return self.backend is not None and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes single-file outputs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (agree to stop on NaN / Ctrl-C)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float | torch.Tensor) -> float:
        """Average of a scalar over ranks (for logging a loss every rank computed on its shard)."""
        t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).to(self.device)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.world_size
        return float(t.item())

    def sum(self, value: float | torch.Tensor) -> float:
        t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).to(self.device)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def token_share(self, count: int | torch.Tensor | None) -> float:
        """Weight of this rank's mean loss so that the gradient average over ranks is the mean over
        *all* ranks' targets: ``world_size * count / total count`` (1.0 in one process).

        Ranks hold equal numbers of rows but not of targets (MLM masks, padding), and a plain
        average of per-rank means would weight each rank's targets differently from one process.
        """
        if not self.distributed or count is None:
            return 1.0
        local = float(count)
        total = self.sum(local)
        return self.world_size * local / total if total > 0 else 1.0

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place mean over ranks of a tensor (e.g. the RMC ``delta`` before ``apply_update``)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def agree(self, choice: str | None, options: Sequence[str]) -> str | None:
        """The same choice on every rank: the latest of ``options`` that any rank chose (None if none).
        E.g. a stop reason, so that a time budget or a signal seen by one rank stops them all."""
        if not self.distributed:
            return choice
        code = torch.tensor([options.index(choice) + 1 if choice is not None else 0], device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return options[int(code.item()) - 1] if int(code.item()) else None

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s Python object on every rank (e.g. a run directory name chosen by rank 0)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank (e.g. per-rank data positions)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


@contextlib.contextmanager
def rank0_first(ctx: ParallelContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills the data / tokenizer cache), then the others."""
    if not ctx.is_main:
        ctx.barrier()
    try:
        yield
    finally:
        if ctx.is_main:
            ctx.barrier()


@contextlib.contextmanager
def main_process_output(ctx: ParallelContext) -> Iterator[None]:
    """Standard output of ranks other than 0 goes nowhere (one copy of every report line)."""
    if ctx.is_main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def torchrun_env_present(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(key in env for key in TORCHRUN_ENV)


def env_world_size(env: dict[str, str] | None = None) -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1"))


def _pick_backend(backend: str, device: torch.device | None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend ({backend!r}) must be one of: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device is not None:
        return "nccl" if device.type == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup(backend: str = "auto", device: str | torch.device | None = None,
          timeout_s: float = 1800.0) -> ParallelContext:
    """Join the process group described by the torchrun environment; single process without it.

    ``device``: None picks ``cuda:LOCAL_RANK`` under NCCL and ``cpu`` under Gloo. Calling
    :func:`setup` again when the group is already up returns a context for it.
    """
    device = torch.device(device) if device is not None else None
    if not torchrun_env_present():
        if device is not None and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        return ParallelContext(device=device or torch.device("cpu"))

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = _pick_backend(backend, device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend nccl needs CUDA; use --backend gloo on CPU")
        if device is None or device.type != "cuda" or device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = device or torch.device("cpu")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds this rank to its GPU; avoids NCCL guessing
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                           backend=dist.get_backend())


def teardown(ctx: ParallelContext | None = None, barrier: bool | None = None) -> None:
    """Leave the process group (no-op for a single process). Safe to call twice.

    ``barrier`` (default: unless an exception is on its way out) waits for every rank first:
    with Gloo, a rank that destroys its group while a peer is still finishing can abort the peer.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier is None:
        barrier = sys.exc_info()[0] is None
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def shard_range(n: int, ctx: ParallelContext) -> slice:
    """This rank's disjoint, equal slice of ``n`` items; ``n`` must divide by world_size."""
    if n % ctx.world_size:
        raise ValueError(f"global batch size ({n}) must be divisible by the world size ({ctx.world_size})")
    per_rank = n // ctx.world_size
    return slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


def shard_batch(batch: torch.Tensor | Sequence | dict, ctx: ParallelContext):
    """This rank's rows of a *global* batch (tensor, tuple/list or dict of tensors, dim 0).

    Every rank reads the same global batch and keeps rows [rank*b, (rank+1)*b): ranks never
    overlap, no row is dropped, and the data position is the same number on every rank, so a
    run saved at one world size resumes at another on exactly the same global batches.
    """
    if ctx.world_size == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[shard_range(batch.shape[0], ctx)]
    if isinstance(batch, dict):
        return {k: shard_batch(v, ctx) if v is not None else None for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(v, ctx) if v is not None else None for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: shard_batch(getattr(batch, f.name), ctx)
                                             for f in dataclasses.fields(batch) if f.init
                                             and isinstance(getattr(batch, f.name), torch.Tensor)})
    raise TypeError(f"cannot shard a batch of type {type(batch).__name__}")


class ShardedBatches:
    """This rank's share of a *global* batch source: ``next`` takes the next global batch and
    keeps this rank's rows (:func:`shard_batch`). ``state_dict`` / ``load_state_dict`` pass
    through, and the position is the same on every rank, so a checkpoint saved at one world
    size resumes at another on exactly the same data. The global batch size must divide by
    the world size."""

    def __init__(self, batches, ctx: ParallelContext):
        self.batches, self.ctx = batches, ctx
        self._it = None

    def __iter__(self):
        self._it = iter(self.batches)
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self.batches)
        return shard_batch(next(self._it), self.ctx)

    def __getattr__(self, name: str):
        # state_dict / load_state_dict (and anything else) come from the wrapped source, so
        # hasattr(sharded, "state_dict") is true exactly when the source is resumable
        if name in ("batches", "ctx", "_it"):
            raise AttributeError(name)
        return getattr(self.batches, name)
