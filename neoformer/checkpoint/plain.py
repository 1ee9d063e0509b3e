"""Checkpoints: one directory per save, written atomically, never pickled.

Layout of a run's checkpoint root (``runs/<out>/checkpoints``)::

    latest                      name of the newest complete checkpoint (replaced atomically)
    step-000200/
      config.json               model config, train config, run settings, tokenizer meta, step
      model.safetensors         weights; a tied tensor is stored once (aliases in the metadata)
      tokenizer/                the tokenizer's own files (tokenizer_meta.json + vocabulary)
      training_state.safetensors  optimizer moments, RNG states: every tensor of the training state
      training_state.json       everything else (step, schedule, sampler position, RNG lists, ...)
      manifest.json             size and sha256 of every file above; written last

A save goes to ``.tmp-*`` in the same root, every file is fsynced, the directory is renamed
into place and only then ``latest`` is replaced; a crash at any point leaves the previous
checkpoint intact and pointed to (a failed save, e.g. a full disk, says so in one line).
Pruning renames a checkpoint to ``.tmp-*`` before deleting it, so a kill mid-delete leaves
nothing that looks like a checkpoint. Loading verifies the manifest, so a truncated or corrupt
file, or a checkpoint that does not fit the model, fails with one :class:`CheckpointError` line.
Every name read from a checkpoint (``latest``, manifest entries, the tokenizer's file) must
resolve inside it (:func:`neoformer.safepath.inside`); nothing is unpickled.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..safepath import inside

FORMAT = "neoformer-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
TOKENIZER_DIR = "tokenizer"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model. One line, names the fix."""


def _in_checkpoint(path: Path, name: str, what: str = "checkpoint file") -> Path:
    """``path / name``, refused with a CheckpointError unless it stays inside the checkpoint."""
    return inside(path, name, what=what, error=CheckpointError)


# ---- tensors <-> JSON without pickle -----------------------------------------------------------
def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (referenced by name).

    Handles dicts with non-string keys (optimizer state), tuples (betas, RNG states) and small
    numpy arrays; anything else that JSON cannot hold raises TypeError (no silent pickling).
    """
    if isinstance(obj, torch.Tensor):
        name = prefix or f"t{len(tensors)}"
        while name in tensors:
            name += "_"
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors, f"{prefix}.k{i}"), encode_state(v, tensors, f"{prefix}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors, numbers, strings, lists, dicts)")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


# ---- RNG state -------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Python, numpy and torch (CPU and every CUDA device) generator states."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- weights ---------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / DDP / FSDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def weights_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, aliases): each shared (tied) tensor is stored once under its first name."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in unwrap(model).state_dict().items():
        key = _storage_key(tensor)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as err:  # safetensors raises its own error types for truncated / bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt") from None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def read_owned_tensors(path: Path, keys) -> dict[str, torch.Tensor]:
    """Some tensors of a safetensors file read into the process's own memory with ordinary reads, not through
    a file mapping: the touched pages of a mapping stay resident while any tensor keeps it open, so a weight
    that is re-laid out on load (the CPU kernels' layouts) would otherwise be held twice."""
    import json as json_module
    import struct

    out = {}
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json_module.loads(f.read(header_len))
            for key in keys:
                entry = header[key]
                begin, end = entry["data_offsets"]
                f.seek(8 + header_len + begin)
                data = bytearray(f.read(end - begin))
                if len(data) != end - begin:
                    raise ValueError(f"{key} is cut short")
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                out[key] = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(entry["shape"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt") from None
    return out


def load_weights(model: nn.Module, checkpoint: str | os.PathLike, strict: bool = True) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model``; shape or name mismatches raise CheckpointError."""
    path = resolve_checkpoint(checkpoint)
    verify_checkpoint(path)
    if (path / "sharded.json").is_file():  # parallel: written by `neoformer train --parallel fsdp`
        raise CheckpointError(f"{path} is a sharded (FSDP) checkpoint; resume it with --resume (any number of "
                              f"processes) or merge it first: neoformer checkpoint consolidate {path} OUT_DIR")
    tensors, metadata = _read_safetensors(_in_checkpoint(path, WEIGHTS))
    try:
        for alias, target in json.loads(metadata.get("aliases", "{}")).items():
            tensors[alias] = tensors[target]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path / WEIGHTS} has corrupt alias metadata; use an earlier checkpoint") from None
    target_model = unwrap(model)
    expected = target_model.state_dict()
    problems = [f"{k} has shape {tuple(v.shape)} in the checkpoint but {tuple(expected[k].shape)} in the model"
                for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if strict and (missing or unexpected):
        problems += [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
    if problems:
        more = f" (+{len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(problems[:2])}{more}; "
                              "build the model from the checkpoint's config.json (load_model) or fix the config")
    target_model.load_state_dict(tensors, strict=strict)


# ---- files -----------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files}


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file but config.json against manifest.json; returns the manifest or raises CheckpointError.

    config.json is left out on purpose: it may be edited (a longer max_seq_len for inference);
    a config that no longer fits the weights fails the shape check of :func:`load_weights`."""
    path = Path(path)
    try:
        manifest = json.loads(_in_checkpoint(path, MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(info, dict) for info in files.values()):
            raise TypeError("files must map names to {size, sha256}")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}); it was probably cut off "
                              "mid-save, use an earlier one") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path / MANIFEST} is corrupt; use an earlier checkpoint") from None
    if not isinstance(files, dict) or not all(isinstance(info, dict) and isinstance(info.get("size"), int)
                                              and isinstance(info.get("sha256"), str) for info in files.values()):
        raise CheckpointError(f"{path / MANIFEST} is corrupt ('files' must map names to size and sha256); "
                              "use an earlier checkpoint")
    for rel in files:  # every name first: nothing outside the checkpoint is even stat'ed
        _in_checkpoint(path, rel, what=f"{MANIFEST} entry")
    for rel, info in files.items():
        file = path / rel
        if rel == CONFIG:  # may be edited by hand (e.g. max_seq_len); parsed and shape-checked on load
            continue
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {rel}; it is incomplete, use an earlier one")
        size = file.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint file {file} has {size} bytes, expected {info['size']} "
                                  "(truncated or overwritten); use an earlier checkpoint")
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {file} fails its sha256 check (corrupt); use an earlier checkpoint")
    return manifest


def checkpoint_step(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete-looking ``step-*`` directories of a root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and not p.is_symlink() and p.is_dir()
             and (p / MANIFEST).exists()]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from: itself, a root holding ``latest``, a run directory holding
    ``checkpoints/latest``, or ``RUN/latest``. Raises CheckpointError when none is there."""
    path = Path(path).expanduser()
    if path.is_symlink() and path.name == LATEST:  # RUN/latest, written by us: must stay in the run
        inside(path.parent, path.name, what="symlink", error=CheckpointError)
    if path.is_symlink() and path.exists():
        path = path.resolve()  # runs/demo/latest -> runs/demo/checkpoints/step-N
    if not path.exists() and path.name == LATEST and (path.parent / "checkpoints" / LATEST).is_file():
        path = path.parent / "checkpoints"  # `runs/demo/latest` names the run's latest checkpoint
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file() and path.name == LATEST:
        path = path.parent
    for root in (path, path / "checkpoints"):
        pointer = root / LATEST
        if pointer.is_file():
            try:
                name = pointer.read_text().strip()
            except UnicodeDecodeError:
                raise CheckpointError(f"{pointer} is not a text file naming a checkpoint; it is corrupt") from None
            target = inside(root, name, what=f"{LATEST} entry", error=CheckpointError, child=True) if name else root
            if not name or not target.is_dir():
                raise CheckpointError(f"{pointer} points to {name!r}, which does not exist; "
                                      f"pass one of the checkpoint directories in {root} explicitly")
            return target
    if (path / CONFIG).is_file() or (path / MANIFEST).is_file() or _STEP_DIR.match(path.name):
        return path
    raise CheckpointError(f"no checkpoint in {path}: expected a checkpoint directory (config.json, model.safetensors) "
                          "or a run directory with checkpoints/latest")


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint (resolved as in :func:`resolve_checkpoint`)."""
    path = resolve_checkpoint(path)
    try:
        data = json.loads(_in_checkpoint(path, CONFIG).read_text())
    except UnicodeDecodeError:
        raise CheckpointError(f"{path / CONFIG} is not UTF-8 JSON; it is corrupt") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {CONFIG}; it is not a neoformer checkpoint") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / CONFIG} is corrupt ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise CheckpointError(f"{path / CONFIG} is not a neoformer checkpoint config (format {FORMAT!r} expected)")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer neoformer (format {data['format_version']}); upgrade")
    return data


def _write_pointer(root: Path, name: str) -> None:
    """Point ``root/latest`` at ``name``; in a run directory also (re)link ``RUN/latest`` to it."""
    temporary = root / f".{LATEST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    temporary.write_text(name + "\n")
    _fsync_file(temporary)
    os.replace(temporary, root / LATEST)
    _fsync_dir(root)
    run_link = root.parent / LATEST
    if root.name == "checkpoints" and (run_link.is_symlink() or not run_link.exists()):
        # convenience for tools that take a directory: runs/demo/latest -> checkpoints/step-N
        link = root.parent / f".{LATEST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            os.symlink(f"{root.name}/{name}", link, target_is_directory=True)
            os.replace(link, run_link)
        except OSError:  # no symlinks here (e.g. Windows without privileges): `latest` files suffice
            if link.is_symlink():
                link.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(root: Path) -> None:
    """Remove temporary directories left by saves that crashed (their process is gone)."""
    for path in root.glob(".tmp-*"):
        match = re.match(r"^\.tmp-.*-pid(\d+)-", path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _remove_checkpoint(path: Path) -> None:
    """Rename to ``.tmp-*`` first: a kill mid-delete then leaves a leftover that :func:`_clean_stale`
    removes, never a ``step-*`` folder that looks like a (broken) checkpoint."""
    doomed = path.parent / f".tmp-pruned-{path.name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names), and
    ``step-*`` folders without a manifest: saves are renamed into place complete, so those are
    remains of a deletion that was killed (by an older neoformer) and can never be loaded."""
    pointed = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    found = list_checkpoints(root)
    doomed = found[: max(0, len(found) - keep_last)]
    doomed += [p for p in root.iterdir() if _STEP_DIR.match(p.name) and not p.is_symlink() and p.is_dir()
               and not (p / MANIFEST).exists()]
    for path in doomed:
        if path.name != pointed:
            _remove_checkpoint(path)


def save_failed(root: Path, name: str, err: OSError) -> CheckpointError:
    """One line for a save that failed (disk full, permissions): what failed and what is kept."""
    try:
        previous = resolve_checkpoint(root)
        kept = f"the previous checkpoint {previous} is intact and still the latest"
    except (CheckpointError, OSError):
        kept = "no earlier checkpoint exists"
    reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    return CheckpointError(f"could not save checkpoint {name} in {root}: {reason}; {kept}. "
                           "Free space (or fix the folder) and continue with --resume")


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, *, config: dict | None = None,
                    tokenizer=None, training_state: dict | None = None, keep_last: int = 3) -> Path:
    """Write ``root/step-{step:06d}`` atomically, point ``root/latest`` at it, keep the newest ``keep_last``.

    ``config`` holds the JSON-able settings (``{"model": ..., "train": ..., ...}``); the model config
    is taken from ``model.config`` when not given. ``training_state`` may hold tensors anywhere.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    name = f"step-{step:06d}"
    temporary = root / f".tmp-{name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        raw = unwrap(model)
        data = dict(config or {})
        if "model" not in data and hasattr(raw, "config"):
            data["model"] = raw.config.to_dict()
        if tokenizer is not None:
            tokenizer.save(temporary / TOKENIZER_DIR)
            data["tokenizer"] = json.loads((temporary / TOKENIZER_DIR / "tokenizer_meta.json").read_text())
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **data}
        _write_json(temporary / CONFIG, data)

        tensors, aliases = weights_state(raw)
        save_file(tensors, str(temporary / WEIGHTS), metadata={"aliases": json.dumps(aliases), "format": "pt"})

        if training_state is not None:
            state_tensors: dict[str, torch.Tensor] = {}
            encoded = encode_state(training_state, state_tensors)
            save_file(state_tensors, str(temporary / STATE_TENSORS))
            _write_json(temporary / STATE_JSON, encoded)

        for path in temporary.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        _write_json(temporary / MANIFEST, _manifest(temporary))
        _fsync_file(temporary / MANIFEST)
        for directory in [temporary, *[p for p in temporary.rglob("*") if p.is_dir()]]:
            _fsync_dir(directory)

        final = root / name
        if final.exists():  # saving the same step again (e.g. interrupt right after a periodic save)
            old = root / f".tmp-old-{name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temporary, final)
        _fsync_dir(root)
    except BaseException as err:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(err, OSError):
            raise save_failed(root, name, err) from None
        raise
    try:
        _write_pointer(root, name)
    except OSError as err:
        raise save_failed(root, name, err) from None
    prune_checkpoints(root, keep_last)
    return final


def save_single_checkpoint(out_dir: str | os.PathLike, model: nn.Module, config: dict, tokenizer, step: int = 0) -> Path:
    """Write a normal checkpoint directory at ``out_dir`` (new or empty), atomically."""
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.exists() and any(out_dir.iterdir())):
        raise ValueError(f"--out {out_dir} exists and is not an empty folder; choose a new one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        written = save_checkpoint(staging, step, model, config=config, tokenizer=tokenizer, keep_last=1)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(written, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def load_training_state(path: str | os.PathLike) -> dict:
    """The training state (optimizer, schedule, RNG, sampler, ...) saved with a checkpoint."""
    path = resolve_checkpoint(path)
    verify_checkpoint(path)
    if not (path / STATE_JSON).is_file():
        raise CheckpointError(f"{path} holds weights only (no training state); it cannot be resumed, "
                              "start a new run from it instead")
    tensors, _ = _read_safetensors(_in_checkpoint(path, STATE_TENSORS))
    try:
        encoded = json.loads(_in_checkpoint(path, STATE_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / STATE_JSON} is corrupt ({getattr(err, 'msg', err)})") from None
    try:
        return decode_state(encoded, tensors)
    except KeyError as err:
        raise CheckpointError(f"{path} training state refers to a missing tensor {err}; the checkpoint is corrupt") from None


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    config: dict
    num_parameters: int
    size_bytes: int


def inspect_checkpoint(path: str | os.PathLike, verify: bool = True) -> CheckpointInfo:
    path = resolve_checkpoint(path)
    manifest = verify_checkpoint(path) if verify else json.loads(_in_checkpoint(path, MANIFEST).read_text())
    config = read_config(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception as err:
        raise CheckpointError(f"{path / WEIGHTS} is not readable ({err})") from None
    size = sum(info["size"] for info in manifest["files"].values())
    return CheckpointInfo(path, int(config.get("step", 0)), config, count, size)


def load_model(path: str | os.PathLike, device: str | torch.device | None = None):
    """(model, tokenizer) from a checkpoint directory or a run directory; model in eval mode.

    The tokenizer is None when the checkpoint holds none.
    """
    from ..config import ConfigError, ModelConfig
    from ..model import build_model

    path = resolve_checkpoint(path)
    verify_checkpoint(path)
    config = read_config(path)
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG} holds an invalid model config: {err}") from None
    model = build_model(model_config)
    load_weights(model, path)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, load_checkpoint_tokenizer(path)


def load_checkpoint_tokenizer(path: Path):
    """The tokenizer saved in checkpoint ``path`` (its ``tokenizer/`` folder), or None."""
    directory = _in_checkpoint(path, TOKENIZER_DIR, what="tokenizer folder")
    if not directory.is_dir():
        return None
    from ..tokenizer import load_tokenizer

    return load_tokenizer(directory)


__all__ = ["CheckpointError", "save_checkpoint", "load_model", "load_weights", "load_training_state",
           "resolve_checkpoint", "read_config", "list_checkpoints", "verify_checkpoint", "inspect_checkpoint",
           "capture_rng_state", "restore_rng_state", "encode_state", "decode_state", "unwrap"]
