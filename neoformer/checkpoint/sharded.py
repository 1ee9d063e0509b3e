"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resumable at any world size.

Every rank writes its own shards of the model and optimizer state in parallel; nobody gathers
the full model. A save at world size N loads at world size M (FSDP, DDP or one process):
each shard records its tensor's global offsets and DCP reads back whatever pieces the loading
ranks need. A sharded checkpoint is the training package's checkpoint directory
(:mod:`neoformer.checkpoint.plain`) with the weights and optimizer in shard files instead of
``model.safetensors``::

    step-000200/
      shards/shard-<rank+1>-model-00001-of-00001.safetensors
                                     tensors of {"model": ..., "optim": ...} held by that rank
      config.json                    model config, train config, run settings, step (+ "sharded")
      tokenizer/                     the tokenizer's files, when there is one
      training_state.{json,safetensors}   rank 0's state: step, schedule, data position, RNG...
      ranks/rank<r>.{json,safetensors}    optional per-rank state
      sharded.json                   world size, parallel mode, and the state's non-tensor parts
                                     (optimizer param_groups...) as JSON with references to tensors
      manifest.json                  size + sha256 of every file; written last

Nothing is pickled, in either direction. DCP's default ``FileSystemReader`` unpickles its
``.metadata`` file and calls ``torch.load`` on non-tensor items (``weights_only=False``), so a crafted
checkpoint could run code; here the shards are written with DCP's safetensors writer
(``HuggingFaceStorageWriter(save_distributed=True)``, which writes no ``.metadata``) and read
with ``HuggingFaceStorageReader``, which builds DCP's metadata from the safetensors headers
(JSON) and reads tensors with ``safe_open``. Only tensors go through DCP; every other value is
JSON in ``sharded.json``, so no byte item (the ``torch.load`` path) can exist. A checkpoint of
the first format (version 1, with a pickled ``.metadata``) is refused with one line.

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
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_state_dict, set_model_state_dict, set_optimizer_state_dict, set_state_dict,
)

from ..safepath import inside
from . import plain

FORMAT = "neoformer-sharded"
VERSION = 2  # 1: DCP FileSystemWriter with a pickled .metadata (refused when loading)
MARKER = "sharded.json"
RANKS_DIR = "ranks"
SHARDS_DIR = "shards"
PICKLED_METADATA = ".metadata"


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
    marker = inside(path, MARKER, what="file", error=plain.CheckpointError)
    if not marker.is_file():
        raise plain.CheckpointError(f"{path} is not a complete sharded checkpoint (no {MARKER}); "
                                    "was the save interrupted?")
    try:
        meta = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise plain.CheckpointError(f"{marker} is corrupt (not a JSON object); use an earlier checkpoint")
    if (path / PICKLED_METADATA).exists() or meta.get("version") == 1:
        raise plain.CheckpointError(
            f"{path} is a sharded checkpoint of the first format, whose {PICKLED_METADATA} file is read with pickle "
            "(which can run code); neoformer refuses to load it. Consolidate or resume it with the neoformer "
            "version that wrote it, and only if you trust where it came from")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION or not isinstance(meta.get("state"), dict):
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
    state_json = inside(directory, f"{stem}.json", what="file", error=plain.CheckpointError)
    if not state_json.is_file():
        return None
    tensors, _ = plain._read_safetensors(inside(directory, f"{stem}.safetensors", what="file",
                                                error=plain.CheckpointError))
    try:
        return plain.decode_state(json.loads(state_json.read_text()), tensors)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise plain.CheckpointError(f"{state_json} is corrupt; use an earlier checkpoint") from None


def _cause(err: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (a BaseException that carries
    every rank's traceback in its message)."""
    if isinstance(err, CheckpointException) and err.failures:
        return next(iter(err.failures.values()))[0]
    return err


@contextlib.contextmanager
def _quiet_no_dist():
    """DCP warns when it runs in one process without a group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---- state <-> (JSON skeleton, tensors) ---------------------------------------------------------
def _storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for two views of the same memory (tied weights: safetensors refuses to store both)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if local.numel() == 0:  # empty shards have no storage to compare
        return (id(tensor),)
    return (local.device, local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape),
            tuple(local.stride()), local.dtype)


def _split_tensors(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[tuple, str], name: str) -> Any:
    """A JSON skeleton of a state dict whose tensors (DTensors too, untouched) move into ``tensors``
    under their path; a tensor met twice (tied weights) is stored once. Other values are JSON."""
    if isinstance(obj, torch.Tensor):
        key = _storage_key(obj)
        if key not in seen:
            seen[key] = name
            tensors[name] = obj
        return {"__tensor__": seen[key]}
    if isinstance(obj, dict) and all(isinstance(k, str) and not k.startswith("__") for k in obj):
        return {k: _split_tensors(v, tensors, seen, f"{name}.{k}" if name else k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_split_tensors(v, tensors, seen, f"{name}.{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    stray: dict[str, torch.Tensor] = {}
    encoded = plain.encode_state(obj, stray)  # numbers, strings, None
    if stray:
        raise TypeError(f"{name}: tensors under non-string keys cannot be sharded")
    return encoded


def _tensor_names(skeleton: Any) -> set[str]:
    if isinstance(skeleton, dict):
        if isinstance(skeleton.get("__tensor__"), str):
            return {skeleton["__tensor__"]}
        return set().union(*(_tensor_names(v) for v in skeleton.values()))
    if isinstance(skeleton, list):
        return set().union(*(_tensor_names(v) for v in skeleton))
    return set()


def _live_state(model: nn.Module, optims: list) -> tuple[dict, dict[str, torch.Tensor]]:
    """(skeleton, tensors) of the model (+ optimizer) state as sharded now."""
    model_sd, optim_sd = get_state_dict(model, optims)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors({"model": model_sd, **({"optim": optim_sd} if optims else {})}, tensors, {}, "")
    return skeleton, tensors


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
        (tmp / SHARDS_DIR).mkdir()
    tmp = Path(ctx.broadcast_object(str(tmp) if tmp else None))
    try:
        optims = _optimizers(optimizer)
        skeleton, tensors = _live_state(model, optims)
        writer = HuggingFaceStorageWriter(str(tmp / SHARDS_DIR), save_distributed=True)
        with _quiet_no_dist():
            dcp.save(tensors, storage_writer=writer)
        if rank_state is not None:
            _write_state(tmp / RANKS_DIR, f"rank{ctx.rank}", rank_state)
        ctx.barrier()  # every rank's files are on disk
        if ctx.is_main:
            _finish_save(path, tmp, model, optims, ctx, extra, rank_state is not None, config, tokenizer, skeleton)
    except BaseException as err:
        if ctx.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(_cause(err), OSError):  # a full disk: one line that names the checkpoint kept
            raise plain.save_failed(path.parent, path.name, _cause(err)) from None
        raise
    ctx.barrier()
    return path


def _finish_save(path: Path, tmp: Path, model: nn.Module, optims: list, ctx, extra: dict | None,
                 has_rank_states: bool, config: dict | None, tokenizer, skeleton: dict) -> None:
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
            "optimizer": bool(optims), "rank_states": has_rank_states, "state": skeleton}
    (tmp / MARKER).write_text(json.dumps(meta, indent=1, allow_nan=True) + "\n")
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
    ``training_state`` must not hold the optimizer (it goes into the shard files)."""
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
def _shard_reader(path: Path) -> HuggingFaceStorageReader:
    """DCP's safetensors reader over ``path/shards``, after checking that every entry there is a plain
    file inside the checkpoint and listed in its manifest (the reader opens every *.safetensors)."""
    shards = inside(path, SHARDS_DIR, what="folder", error=plain.CheckpointError)
    if not shards.is_dir():
        raise plain.CheckpointError(f"{path} has no {SHARDS_DIR}/ folder; the sharded checkpoint is incomplete")
    try:
        listed = set(json.loads((path / plain.MANIFEST).read_text())["files"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise plain.CheckpointError(f"{path / plain.MANIFEST} is corrupt; use an earlier checkpoint") from None
    for entry in shards.iterdir():
        rel = f"{SHARDS_DIR}/{entry.name}"
        inside(path, rel, what="shard file", error=plain.CheckpointError)
        if entry.is_symlink() or not entry.is_file() or rel not in listed:
            raise plain.CheckpointError(f"{entry} is not a shard this checkpoint's manifest lists; refused")
    return HuggingFaceStorageReader(str(shards))


def _read_shards(path: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill ``targets`` (name -> tensor, DTensors as sharded now) from the shard files, in place."""
    try:
        with _quiet_no_dist():
            dcp.load(targets, storage_reader=_shard_reader(path))
    except plain.CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # DCP wraps per-rank failures; keep one line
        cause = _cause(err)
        detail = " ".join(str(cause).split())[:300]
        raise plain.CheckpointError(f"{path}: cannot read the shards into this model ({type(cause).__name__}: "
                                    f"{detail}); resume with the same model config, or use an earlier checkpoint") from None


def _check_names(path: Path, wanted: set[str], have: set[str], strict: bool) -> None:
    unknown = sorted(wanted - have)  # the checkpoint has tensors this model/optimizer lacks
    missing = sorted(have - wanted)  # and the other way round
    if unknown or (strict and missing):
        problems = [f"unexpected {n}" for n in unknown[:2]] + [f"missing {n}" for n in missing[:2]]
        raise plain.CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}; resume with "
                                    "the same model config and train.optimizer")


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
    live, targets = _live_state(model, optims)
    saved = {key: meta["state"].get(key) for key in live}
    if any(value is None for value in saved.values()):
        raise plain.CheckpointError(f"{path / MARKER} lacks part of the state ({', '.join(live)}); it is corrupt")
    wanted = _tensor_names(saved)
    _check_names(path, wanted, set(targets), strict)
    _read_shards(path, {name: targets[name] for name in wanted})
    try:
        state = plain.decode_state(saved, targets)
    except (KeyError, TypeError, ValueError):
        raise plain.CheckpointError(f"{path / MARKER} is corrupt; use an earlier checkpoint") from None
    set_state_dict(model, optims, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                   options=StateDictOptions(strict=strict))
    same_world = meta.get("world_size") == ctx.world_size
    return {
        "extra": _read_state(path, Path(plain.STATE_JSON).stem) or {},
        "rank_state": _read_state(path / RANKS_DIR, f"rank{ctx.rank}") if same_world else None,
        "world_size": meta.get("world_size"),
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
    path, meta = _resolve(path)
    saved = {key: meta["state"][key] for key in keys if key in meta["state"]}
    wanted = _tensor_names(saved)
    reader = _shard_reader(path)
    found = reader.read_metadata().state_dict_metadata
    if not wanted <= set(found):
        raise plain.CheckpointError(f"{path}: the shards lack {sorted(wanted - set(found))[:2]}; it is corrupt")
    targets = {name: torch.empty(found[name].size, dtype=found[name].properties.dtype) for name in wanted}
    _read_shards(path, targets)
    return plain.decode_state(saved, targets)


def _saved_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype of the saved weights, from the shard headers (nothing is loaded)."""
    found = _shard_reader(path).read_metadata().state_dict_metadata
    dtypes = [md.properties.dtype for name, md in found.items() if name.startswith("model.")]
    return next((d for d in dtypes if d.is_floating_point), None)


def read_trainer_state(path: str | os.PathLike) -> dict:
    path, _ = _resolve(path)
    return _read_state(path, Path(plain.STATE_JSON).stem) or {}


def consolidate(sharded_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the normal single-file checkpoint directory ``out_dir`` (config.json,
    model.safetensors, tokenizer/, manifest.json: what ``load_model`` and ``neoformer generate``
    read) from a sharded one. One process, no process group; needs memory for the full model.
    The optimizer is left out: resume from the sharded directory (at any world size) instead."""
    from ..config import ConfigError, ModelConfig
    from ..model import build_model

    path, _ = _resolve(sharded_dir)
    out_dir = Path(out_dir)
    if out_dir.resolve() == path.resolve():
        raise ValueError("consolidate needs an output directory different from the sharded checkpoint")
    if out_dir.is_file() or (out_dir.exists() and any(out_dir.iterdir())):
        raise ValueError(f"output {out_dir} exists and is not an empty directory; choose a new one")
    plain.verify_checkpoint(path)
    config = plain.read_config(path)
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except ConfigError as err:
        raise plain.CheckpointError(f"{path / plain.CONFIG} holds an invalid model config: {err}") from None
    # built on CPU (not meta): non-persistent buffers such as RoPE tables are rebuilt, ties kept
    model = build_model(model_config, dtype=_saved_dtype(path))
    load_sharded(path, model, verify=False)
    tokenizer = plain.load_checkpoint_tokenizer(path)
    settings = {k: v for k, v in config.items() if k not in ("format", "format_version", "step", "sharded", "tokenizer")}
    step = int(config.get("step", 0))
    return plain.save_single_checkpoint(out_dir, model, settings, tokenizer, step=step)
