"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resumable at any world size.

Every rank writes its own shards of the model and optimizer state in parallel; nobody gathers
the full model. A save at world size N loads at world size M (FSDP, DDP or one process):
DCP stores each tensor's global shape and offsets and reads back whatever pieces the loading
ranks need. Directory layout::

    DIR/.metadata, DIR/__<rank>_0.distcp   DCP: {"model": ..., "optim": ...} (FQN keys)
    DIR/config.json                        model config
    DIR/trainer_state.pt                   rank 0's extra state (step, scheduler, data position...)
    DIR/ranks/rank<r>.pt                   optional per-rank state (RNG, per-rank data position)
    DIR/sharded.json                       format marker, written last: the save is complete

Saves go to ``DIR.tmp`` first and are renamed into place, so a crash never leaves a half
checkpoint at ``DIR``. :func:`consolidate` turns a sharded directory into the normal
single-file checkpoint directory (offline, one process, no process group).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .setup import ParallelContext

FORMAT = "neoformer-sharded"
VERSION = 1
MARKER = "sharded.json"
TRAINER_STATE = "trainer_state.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _read_marker(path: Path) -> dict:
    marker = path / MARKER
    if not marker.is_file():
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        raise ValueError(f"{path} is not a complete sharded checkpoint (no {MARKER}); was the save interrupted?")
    meta = json.loads(marker.read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: unsupported sharded checkpoint format {meta.get('format')!r} v{meta.get('version')}")
    return meta


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 ctx: ParallelContext | None = None, *, extra: dict | None = None,
                 rank_state: Any = None) -> Path:
    """Collective: every rank calls it. ``extra`` (rank 0's) and ``rank_state`` (each rank's)
    hold anything torch.save can write with plain containers and tensors."""
    ctx = ctx or ParallelContext()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "ranks").mkdir(parents=True)
    ctx.barrier()

    optims = _optimizers(optimizer)
    model_sd, optim_sd = get_state_dict(model, optims)
    state = {"model": model_sd}
    if optims:
        state["optim"] = optim_sd
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    if rank_state is not None:
        torch.save(rank_state, tmp / "ranks" / f"rank{ctx.rank}.pt")
    ctx.barrier()  # every rank's files are on disk

    if ctx.is_main:
        cfg = getattr(model, "config", None)
        if cfg is not None:
            cfg.to_json(tmp / "config.json")
        torch.save(extra or {}, tmp / TRAINER_STATE)
        meta = {"format": FORMAT, "version": VERSION, "world_size": ctx.world_size,
                "parallel": getattr(model, "parallel_mode", "none"), "optimizer": bool(optims),
                "rank_states": rank_state is not None}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    ctx.barrier()
    return path


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 ctx: ParallelContext | None = None, *, strict: bool = True) -> dict:
    """Collective: load a sharded checkpoint into ``model`` (and ``optimizer``) as they are
    sharded *now*, whatever world size saved it. Build the optimizer (after ``parallel.apply``)
    before calling. Returns ``{"extra", "rank_state", "world_size", "parallel"}``; ``rank_state``
    is this rank's saved state when the world size is unchanged, else None."""
    ctx = ctx or ParallelContext()
    path = Path(path)
    meta = _read_marker(path)
    optims = _optimizers(optimizer)
    if optims and not meta.get("optimizer"):
        raise ValueError(f"{path} holds no optimizer state; load the model only (optimizer=None)")
    model_sd, optim_sd = get_state_dict(model, optims)
    state = {"model": model_sd}
    if optims:
        state["optim"] = optim_sd
    with warnings.catch_warnings():  # DCP warns when it loads in one process without a group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optims, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                   options=StateDictOptions(strict=strict))
    rank_file = path / "ranks" / f"rank{ctx.rank}.pt"
    same_world = meta["world_size"] == ctx.world_size
    return {
        "extra": torch.load(path / TRAINER_STATE, weights_only=True) if (path / TRAINER_STATE).exists() else {},
        "rank_state": torch.load(rank_file, weights_only=True) if same_world and rank_file.exists() else None,
        "world_size": meta["world_size"],
        "parallel": meta.get("parallel"),
    }


def read_full_state(path: str | Path, keys: tuple[str, ...] = ("model",)) -> dict:
    """The whole state (unsharded, plain tensors) of a sharded checkpoint, in one process.
    Returns ``{"model": {fqn: tensor}, ...}`` for the requested top-level keys."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    _read_marker(path)
    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys=set(keys)), no_dist=True)
    return state


def read_trainer_state(path: str | Path) -> dict:
    path = Path(path)
    _read_marker(path)
    file = path / TRAINER_STATE
    return torch.load(file, weights_only=True) if file.exists() else {}


def consolidate(sharded_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the normal single-file checkpoint directory (what ``neoformer generate`` and
    ``load_model`` read) from a sharded one. Runs in one process; needs memory for the full
    model. Optimizer state is not carried over (resume from the sharded directory instead)."""
    from ..config import ModelConfig
    from ..model import build_model

    sharded_dir, out_dir = Path(sharded_dir), Path(out_dir)
    _read_marker(sharded_dir)
    if not (sharded_dir / "config.json").is_file():
        raise ValueError(f"{sharded_dir} has no config.json; cannot rebuild the model")
    if out_dir.resolve() == sharded_dir.resolve():
        raise ValueError("consolidate needs an output directory different from the sharded one")
    cfg = ModelConfig.from_json(sharded_dir / "config.json")
    weights = read_full_state(sharded_dir, ("model",))["model"]
    model = build_model(cfg)  # on CPU: non-persistent buffers (RoPE tables) are rebuilt, ties kept
    model.load_state_dict(weights, strict=True)
    _write_normal_checkpoint(out_dir, model, read_trainer_state(sharded_dir))
    return out_dir


def _write_normal_checkpoint(out_dir: Path, model: nn.Module, trainer_state: dict) -> None:
    """The training package's single-file checkpoint format (weights + config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_json(out_dir / "config.json")
    torch.save(model.state_dict(), out_dir / "model.pt")

