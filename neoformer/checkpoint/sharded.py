"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resumable at any world size.

Every rank writes its own shards of the model and optimizer state in parallel; nobody gathers
the full model. A save at world size N loads at world size M (FSDP, DDP or one process):
DCP stores each tensor's global shape and offsets and reads back whatever pieces the loading
ranks need. A sharded checkpoint is the training package's checkpoint directory
(:mod:`neoformer.checkpoint.plain`) with the weights and optimizer in DCP files instead of
``model.safetensors``::

    step-000200/
      .metadata, __<rank>_0.distcp   DCP: {"model": ..., "optim": ...} with FQN keys
      config.json                    model config, train config, run settings, step (+ "sharded")
      tokenizer/                     the tokenizer's files, when there is one
      training_state.{json,safetensors}   rank 0's state: step, schedule, data position, RNG...
      ranks/rank<r>.{json,safetensors}    optional per-rank state
      sharded.json                   world size and parallel mode of the save
      manifest.json                  size + sha256 of every file; written last

So ``latest``, pruning, manifest checks and ``load_training_state`` work unchanged; only the
weights need :func:`load_sharded` (any world size) or :func:`consolidate` (one process, gives
the normal single-file checkpoint directory that ``load_model`` and ``neoformer generate`` read).
Saves go to a temporary directory that is renamed into place: a crash never leaves a half one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_state_dict, set_model_state_dict, set_optimizer_state_dict, set_state_dict,
)

from . import plain

FORMAT = "neoformer-sharded"
VERSION = 1
MARKER = "sharded.json"
RANKS_DIR = "ranks"


class SingleProcess:
    """The process context when no process group is up (``neoformer.parallel.ParallelContext`` has the
    same members; this package sits below ``parallel`` and must not import it)."""

    rank, world_size, is_main = 0, 1, True

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        return obj


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True for a sharded checkpoint directory, or a run directory / root whose ``latest`` is one."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        return (plain.resolve_checkpoint(path) / MARKER).is_file()
    except (ValueError, OSError):
        return False


def _resolve(path: str | os.PathLike) -> tuple[Path, dict]:
    """(checkpoint directory, sharded.json) or a CheckpointError / FileNotFoundError line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not (path / MARKER).is_file():
        try:
            path = plain.resolve_checkpoint(path)
        except ValueError:
            pass
    marker = path / MARKER
    if not marker.is_file():
        raise plain.CheckpointError(f"{path} is not a complete sharded checkpoint (no {MARKER}); "
                                      "was the save interrupted?")
    meta = json.loads(marker.read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise plain.CheckpointError(f"{path}: unsupported sharded checkpoint format "
                                      f"{meta.get('format')!r} v{meta.get('version')}")
    if not (path / plain.MANIFEST).is_file():
        raise plain.CheckpointError(f"{path} is not a complete checkpoint (no manifest.json); it was probably "
                                      "cut off mid-save, use an earlier one")
    return path, meta


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def _write_state(directory: Path, stem: str, state: Any) -> None:
    """``state`` as ``stem.json`` + ``stem.safetensors`` (the training package's no-pickle encoding)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = plain.encode_state(state, tensors)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(encoded, indent=2, allow_nan=True) + "\n")


def _read_state(directory: Path, stem: str) -> Any:
    from safetensors.torch import load_file

    if not (directory / f"{stem}.json").is_file():
        return None
    tensors = load_file(str(directory / f"{stem}.safetensors"))
    return plain.decode_state(json.loads((directory / f"{stem}.json").read_text()), tensors)


@contextlib.contextmanager
def _quiet_no_dist():
    """DCP warns when it runs in one process without a group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---- save --------------------------------------------------------------------------------------
def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 ctx=None, *, extra: dict | None = None, rank_state: Any = None,
                 config: dict | None = None, tokenizer=None) -> Path:
    """Collective (every rank calls it): write a sharded checkpoint directory at ``path``.

    ``extra``: rank 0's training state (tensors, numbers, strings, lists, dicts; no pickle).
    ``rank_state``: each rank's own state, returned by :func:`load_sharded` at the same world size.
    ``config``: the JSON settings for config.json (default: the model config and ``extra["step"]``).
    """
    ctx = ctx or SingleProcess()
    path = Path(path)
    tmp = None
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
        (tmp / RANKS_DIR).mkdir(parents=True)
    tmp = Path(ctx.broadcast_object(str(tmp) if tmp else None))
    try:
        optims = _optimizers(optimizer)
        model_sd, optim_sd = get_state_dict(model, optims)
        state = {"model": model_sd, **({"optim": optim_sd} if optims else {})}
        with _quiet_no_dist():
            dcp.save(state, checkpoint_id=str(tmp))
        if rank_state is not None:
            _write_state(tmp / RANKS_DIR, f"rank{ctx.rank}", rank_state)
        ctx.barrier()  # every rank's files are on disk
        if ctx.is_main:
            _finish_save(path, tmp, model, optims, ctx, extra, rank_state is not None, config, tokenizer)
    except BaseException:
        if ctx.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    ctx.barrier()
    return path


def _finish_save(path: Path, tmp: Path, model: nn.Module, optims: list, ctx, extra: dict | None,
                 has_rank_states: bool, config: dict | None, tokenizer) -> None:
    """Rank 0: config, tokenizer, training state, marker, manifest, then rename into place."""
    mode = getattr(model, "parallel_mode", "none")
    data = dict(config or {})
    if "model" not in data and hasattr(model, "config"):
        data["model"] = model.config.to_dict()
    if tokenizer is not None:
        tokenizer.save(tmp / plain.TOKENIZER_DIR)
        data["tokenizer"] = json.loads((tmp / plain.TOKENIZER_DIR / "tokenizer_meta.json").read_text())
    step = int((extra or {}).get("step", data.get("step", 0)))
    data = {"format": plain.FORMAT, "format_version": plain.FORMAT_VERSION, "step": step, **data,
            "sharded": {"world_size": ctx.world_size, "parallel": mode}}
    (tmp / plain.CONFIG).write_text(json.dumps(data, indent=2) + "\n")
    if extra is not None:
        _write_state(tmp, Path(plain.STATE_JSON).stem, extra)
    meta = {"format": FORMAT, "version": VERSION, "world_size": ctx.world_size, "parallel": mode,
            "optimizer": bool(optims), "rank_states": has_rank_states}
    (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / plain.MANIFEST).write_text(json.dumps(plain._manifest(tmp), indent=2) + "\n")
    if path.exists():
        old = path.parent / f".tmp-old-{path.name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def save_train_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer, ctx, *,
                          config: dict | None = None, tokenizer=None, training_state: dict | None = None,
                          keep_last: int = 3) -> Path:
    """Collective twin of ``neoformer.checkpoint.save_checkpoint`` for sharded models:
    writes ``root/step-NNNNNN`` (sharded), points ``root/latest`` at it and prunes old ones.
    ``training_state`` must not hold the optimizer (it goes into the DCP files)."""
    root = Path(root)
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        plain._clean_stale(root)
    state = {k: v for k, v in (training_state or {}).items() if k != "optimizer"}
    state.setdefault("step", step)
    path = save_sharded(root / f"step-{step:06d}", model, optimizer, ctx, extra=state, config=config,
                        tokenizer=tokenizer)
    if ctx.is_main:
        plain._write_pointer(root, path.name)
        plain.prune_checkpoints(root, keep_last)
    ctx.barrier()
    return path


# ---- load --------------------------------------------------------------------------------------
def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 ctx=None, *, strict: bool = True, verify: bool = True) -> dict:
    """Collective: load a sharded checkpoint into ``model`` (and ``optimizer``) as they are
    sharded *now*, whatever world size saved it. Build the optimizer (after ``parallel.apply``)
    first. ``path``: the checkpoint, or a root / run directory with ``latest``.

    Returns ``{"extra", "rank_state", "world_size", "parallel", "path"}``; ``rank_state`` is this
    rank's saved state when the world size is unchanged, else None. ``verify``: rank 0 checks
    the manifest (sizes and sha256) first.
    """
    ctx = ctx or SingleProcess()
    path, meta = _resolve(path)
    if verify and ctx.is_main:
        plain.verify_checkpoint(path)
    ctx.barrier()
    optims = _optimizers(optimizer)
    if optims and not meta.get("optimizer"):
        raise plain.CheckpointError(f"{path} holds no optimizer state; load the model only (optimizer=None)")
    model_sd, optim_sd = get_state_dict(model, optims)
    state = {"model": model_sd, **({"optim": optim_sd} if optims else {})}
    with _quiet_no_dist():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optims, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                   options=StateDictOptions(strict=strict))
    same_world = meta["world_size"] == ctx.world_size
    return {
        "extra": _read_state(path, Path(plain.STATE_JSON).stem) or {},
        "rank_state": _read_state(path / RANKS_DIR, f"rank{ctx.rank}") if same_world else None,
        "world_size": meta["world_size"],
        "parallel": meta.get("parallel"),
        "path": path,
    }


def load_train_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, ctx) -> dict:
    """Collective: the training state of a checkpoint, with weights and optimizer loaded into a
    (possibly sharded) model. Sharded checkpoints load at any world size; a normal
    (single-file) checkpoint is loaded into an FSDP model by sharding the full tensors."""
    if is_sharded_checkpoint(path):
        return load_sharded(path, model, optimizer, ctx)["extra"]
    path = plain.resolve_checkpoint(path)
    state = plain.load_training_state(path)  # verifies the manifest
    weights, metadata = plain._read_safetensors(path / plain.WEIGHTS)
    for alias, target in json.loads(metadata.get("aliases", "{}")).items():
        weights[alias] = weights[target]
    load_full_state(model, optimizer, weights, state.get("optimizer"))
    return state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict[str, torch.Tensor],
                    optim_state: dict | None = None) -> None:
    """Load *full* (unsharded) weights and a plain ``optimizer.state_dict()`` into a model that
    may be sharded: every rank passes the same full tensors and keeps its own shards."""
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, weights, options=options)
    if optimizer is None or optim_state is None:
        return
    # plain state dicts number parameters in param_groups order; DCP wants their names
    names = {id(p): name for name, p in model.named_parameters()}  # a tied parameter: its first name
    numbered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in optim_state["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(numbered):
        raise plain.CheckpointError(f"optimizer state has {len(saved_ids)} parameters, the model's optimizer "
                                      f"{len(numbered)}; resume with the same model config and optimizer")
    fqn = dict(zip(saved_ids, numbered))
    named = {"state": {fqn[i]: s for i, s in optim_state["state"].items()},
             "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=options)


# ---- offline tools -------------------------------------------------------------------------------
def read_full_state(path: str | os.PathLike, keys: tuple[str, ...] = ("model",)) -> dict:
    """The whole state (unsharded, plain tensors) of a sharded checkpoint, in one process.
    Returns ``{"model": {fqn: tensor}, ...}`` for the requested top-level keys."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path, _ = _resolve(path)
    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys=set(keys)), no_dist=True)
    return state


def read_trainer_state(path: str | os.PathLike) -> dict:
    path, _ = _resolve(path)
    return _read_state(path, Path(plain.STATE_JSON).stem) or {}


def consolidate(sharded_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the normal single-file checkpoint directory ``out_dir`` (config.json,
    model.safetensors, tokenizer/, manifest.json: what ``load_model`` and ``neoformer generate``
    read) from a sharded one. One process, no process group; needs memory for the full model.
    The optimizer is left out: resume from the sharded directory (at any world size) instead."""
    from ..config import ModelConfig
    from ..model import build_model

    path, _ = _resolve(sharded_dir)
    out_dir = Path(out_dir)
    if out_dir.resolve() == path.resolve():
        raise ValueError("consolidate needs an output directory different from the sharded checkpoint")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output directory {out_dir} exists and is not empty; choose a new one")
    plain.verify_checkpoint(path)
    config = plain.read_config(path)
    weights = read_full_state(path, ("model",))["model"]
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), None)
    # built on CPU (not meta): non-persistent buffers such as RoPE tables are rebuilt, ties kept
    model = build_model(ModelConfig.from_dict(config["model"]), dtype=dtype)
    model.load_state_dict(weights, strict=True)
    tokenizer = None
    if (path / plain.TOKENIZER_DIR).is_dir():
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path / plain.TOKENIZER_DIR)
    settings = {k: v for k, v in config.items() if k not in ("format", "format_version", "step", "sharded", "tokenizer")}
    step = int(config.get("step", 0))
    staging = out_dir.parent / f".tmp-consolidate-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        written = plain.save_checkpoint(staging, step, model, config=settings, tokenizer=tokenizer, keep_last=1)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(written, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
