"""Checkpoints: the plain directory format (:mod:`.plain`), the sharded DCP format (:mod:`.sharded`)
and the one loader every command uses.

    from neoformer.checkpoint import load_checkpoint
    model, tokenizer, config = load_checkpoint("runs/demo", device="cpu", dtype=torch.bfloat16)

This package sits below ``train``, ``parallel``, ``generate`` and the CLI; it imports only the
model, config and tokenizer modules. ``config.json`` records what a checkpoint is (``model.kind``
and ``contents``), so a command can refuse the wrong kind with one line (:func:`require`).

``contents`` names how the model is rebuilt: ``"full"`` (plain weights), ``"quantized"`` (packed
weights + scales, neoformer.quantize) or ``"adapter"`` (LoRA weights + a verified reference to the
base, neoformer.finetune). Each maps to a loader in :data:`CONTENTS_LOADERS`, named as a
``"module:function"`` string and imported on first use, so this package stays below the feature
packages that implement them. A loader is ``loader(path, config, *, device, dtype) -> (model, tokenizer)``.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from .plain import (
    CONFIG, LATEST, MANIFEST, STATE_JSON, TOKENIZER_DIR, WEIGHTS, CheckpointError, CheckpointInfo, capture_rng_state,
    decode_state, encode_state, inspect_checkpoint, list_checkpoints, load_model, load_training_state, load_weights,
    read_config, resolve_checkpoint, restore_rng_state, save_checkpoint, save_single_checkpoint, unwrap,
    verify_checkpoint,
)

# the public short names the issue tracker and docs use
save = save_checkpoint
resolve = resolve_checkpoint


def is_sharded(path: str | os.PathLike) -> bool:
    """True for a sharded (DCP) checkpoint, or a run directory whose latest checkpoint is one."""
    from .sharded import is_sharded_checkpoint  # torch.distributed is imported only when asked

    return is_sharded_checkpoint(path)


def _load_full(path, config: dict, *, device=None, dtype=None):
    model, tokenizer = load_model(path, device=device)
    return (model.to(dtype=dtype) if dtype is not None else model), tokenizer


# contents -> its loader; register a new one with register_contents()
CONTENTS_LOADERS: dict[str, object] = {
    "full": _load_full,
    "quantized": "neoformer.quantize:load_quantized_checkpoint",
    "adapter": "neoformer.finetune:load_adapter_checkpoint",
}


def register_contents(name: str, loader) -> None:
    """Teach :func:`load_checkpoint` a new ``contents`` word (a callable or a ``"module:function"``)."""
    CONTENTS_LOADERS[name] = loader


def _contents_loader(name: str):
    loader = CONTENTS_LOADERS[name]
    if isinstance(loader, str):
        module, _, function = loader.partition(":")
        try:
            loader = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError):
            raise CheckpointError(f"this neoformer cannot load {name} checkpoints ({loader} is missing)") from None
    return loader


def _is_sharded_model(model) -> bool:
    """An FSDP2 model (its parameters are DTensors); read off the model so this package needs no ``parallel``."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_training(root, step: int, model, optimizer, ctx=None, *, config: dict | None = None, tokenizer=None,
                  training_state: dict | None = None, keep_last: int = 3):
    """The one save ``fit()`` calls: the sharded format for an FSDP model (collective: every rank writes its
    shards), the plain directory otherwise (rank 0 writes; other ranks get the path it writes)."""
    if _is_sharded_model(model):
        from .sharded import save_train_checkpoint

        return save_train_checkpoint(root, step, model, optimizer, ctx, config=config, tokenizer=tokenizer,
                                     training_state=training_state, keep_last=keep_last)
    if ctx is not None and not ctx.is_main:  # DDP replicas are identical: rank 0 writes
        return Path(root) / f"step-{step:06d}"
    return save_checkpoint(root, step, model, config=config, tokenizer=tokenizer, training_state=training_state,
                           keep_last=keep_last)


def load_training(path, model, optimizer, ctx=None) -> dict:
    """The one resume ``fit()`` calls: weights and optimizer state into ``model``/``optimizer`` (plain or
    sharded checkpoint, plain or FSDP model, any world size); returns the rest of the training state."""
    path = resolve_checkpoint(path)
    if is_sharded(path) or _is_sharded_model(model):
        from .sharded import SingleProcess, load_train_checkpoint

        return load_train_checkpoint(path, model, optimizer, ctx or SingleProcess())
    load_weights(model, path)
    state = load_training_state(path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"optimizer state in {path} does not fit this model/optimizer ({err}); "
                              "resume with the same model config and train.optimizer") from None
    return state


def require(config: dict, *, kinds: tuple[str, ...] | None = None, contents: tuple[str, ...] | None = None,
            command: str = "this command", path=None) -> None:
    """Refuse, in one line, a checkpoint whose model kind or contents ``command`` cannot use."""
    where = f"{path} " if path is not None else "the checkpoint "
    kind = config.get("model", {}).get("kind", "decoder")
    if kinds is not None and kind not in kinds:
        raise CheckpointError(f"{where}holds a model of kind {kind!r}; {command} needs {' or '.join(kinds)}")
    have = config.get("contents", "full")
    if have not in CONTENTS_LOADERS:
        raise CheckpointError(f"{where}holds {have!r} contents, which this neoformer does not know; upgrade it")
    contents = tuple(CONTENTS_LOADERS) if contents is None else contents
    if have not in contents:
        raise CheckpointError(f"{where}holds a {have} checkpoint; {command} takes {' or '.join(contents)} ones")


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, kinds: tuple[str, ...] | None = None,
                    contents: tuple[str, ...] | None = None, command: str = "this command"):
    """``(model, tokenizer, config)`` from a checkpoint or run directory, in eval mode.

    ``device``/``dtype`` place the weights; ``kinds`` (e.g. ``("decoder", "encoder_decoder")``)
    refuses other model kinds, and ``contents`` (default: every registered one) other contents,
    with one :class:`CheckpointError` line naming ``command``. The tokenizer is None when the
    checkpoint holds none; ``config`` is the parsed config.json.
    """
    resolved = resolve_checkpoint(path)
    if is_sharded(resolved):
        raise CheckpointError(f"{resolved} is a sharded (FSDP) checkpoint; merge it first: "
                              f"neoformer checkpoint consolidate {resolved} OUT_DIR")
    config = read_config(resolved)
    require(config, kinds=kinds, contents=contents, command=command, path=resolved)
    loader = _contents_loader(config.get("contents", "full"))
    model, tokenizer = loader(resolved, config, device=device, dtype=dtype)
    return model.eval(), tokenizer, config


__all__ = [
    "CONFIG", "CONTENTS_LOADERS", "LATEST", "MANIFEST", "STATE_JSON", "TOKENIZER_DIR", "WEIGHTS", "CheckpointError", "CheckpointInfo",
    "capture_rng_state", "decode_state", "encode_state", "inspect_checkpoint", "is_sharded", "list_checkpoints",
    "load_checkpoint", "load_model", "load_training", "load_training_state", "load_weights", "read_config", "register_contents", "require", "resolve",
    "resolve_checkpoint", "restore_rng_state", "save", "save_checkpoint", "save_single_checkpoint", "save_training", "unwrap", "verify_checkpoint",
]
