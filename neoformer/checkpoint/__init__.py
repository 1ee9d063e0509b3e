"""Checkpoints: the plain directory format (:mod:`.plain`), the sharded DCP format (:mod:`.sharded`)
and the one loader every command uses.

    from neoformer.checkpoint import load_checkpoint
    model, tokenizer, config = load_checkpoint("runs/demo", device="cpu", dtype=torch.bfloat16)

This package sits below ``train``, ``parallel``, ``generate`` and the CLI; it imports only the
model, config and tokenizer modules. ``config.json`` records what a checkpoint is (``model.kind``
and ``contents``: ``"full"`` today; quantized, adapter and distilled checkpoints add their own
word), so a command can refuse the wrong kind with one line (:func:`require`).
"""
from __future__ import annotations

import os

import torch

from .plain import (
    CONFIG, LATEST, MANIFEST, STATE_JSON, TOKENIZER_DIR, WEIGHTS, CheckpointError, CheckpointInfo, capture_rng_state,
    decode_state, encode_state, inspect_checkpoint, list_checkpoints, load_model, load_training_state, load_weights,
    read_config, resolve_checkpoint, restore_rng_state, save_checkpoint, unwrap, verify_checkpoint,
)

# the public short names the issue tracker and docs use
save = save_checkpoint
resolve = resolve_checkpoint


def is_sharded(path: str | os.PathLike) -> bool:
    """True for a sharded (DCP) checkpoint, or a run directory whose latest checkpoint is one."""
    from .sharded import is_sharded_checkpoint  # torch.distributed is imported only when asked

    return is_sharded_checkpoint(path)


def require(config: dict, *, kinds: tuple[str, ...] | None = None, contents: tuple[str, ...] = ("full",),
            command: str = "this command", path=None) -> None:
    """Refuse, in one line, a checkpoint whose model kind or contents ``command`` cannot use."""
    where = f"{path} " if path is not None else "the checkpoint "
    kind = config.get("model", {}).get("kind", "decoder")
    if kinds is not None and kind not in kinds:
        raise CheckpointError(f"{where}holds a model of kind {kind!r}; {command} needs {' or '.join(kinds)}")
    have = config.get("contents", "full")
    if have not in contents:
        raise CheckpointError(f"{where}holds a {have} checkpoint; {command} takes {' or '.join(contents)} ones")


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, kinds: tuple[str, ...] | None = None,
                    command: str = "this command"):
    """``(model, tokenizer, config)`` from a checkpoint or run directory, in eval mode.

    ``device``/``dtype`` place the weights; ``kinds`` (e.g. ``("decoder", "encoder_decoder")``)
    refuses other model kinds with one :class:`CheckpointError` line naming ``command``. The
    tokenizer is None when the checkpoint holds none; ``config`` is the parsed config.json.
    """
    resolved = resolve_checkpoint(path)
    if is_sharded(resolved):
        raise CheckpointError(f"{resolved} is a sharded (FSDP) checkpoint; merge it first: "
                              f"neoformer checkpoint consolidate {resolved} OUT_DIR")
    config = read_config(resolved)
    require(config, kinds=kinds, command=command, path=resolved)
    model, tokenizer = load_model(resolved, device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model, tokenizer, config


__all__ = [
    "CONFIG", "LATEST", "MANIFEST", "STATE_JSON", "TOKENIZER_DIR", "WEIGHTS", "CheckpointError", "CheckpointInfo",
    "capture_rng_state", "decode_state", "encode_state", "inspect_checkpoint", "is_sharded", "list_checkpoints",
    "load_checkpoint", "load_model", "load_training_state", "load_weights", "read_config", "require", "resolve",
    "resolve_checkpoint", "restore_rng_state", "save", "save_checkpoint", "unwrap", "verify_checkpoint",
]
