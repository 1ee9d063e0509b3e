"""Quantized checkpoints: written with the checkpoint package's atomic save, loaded by ``load_checkpoint``.

A quantized checkpoint is a plain checkpoint directory whose ``config.json`` says
``"contents": "quantized"`` and ``"quantization": {scheme, group_size, skip, modules}``; its
``model.safetensors`` holds each quantized Linear as ``<name>.qweight`` + scales (see
:mod:`.kernels`) and every other tensor as it was. Nothing is pickled; the manifest covers it all.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import WEIGHTS, CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from ..checkpoint.plain import _read_safetensors, load_checkpoint_tokenizer, read_owned_tensors, verify_checkpoint
from ..config import ConfigError, ModelConfig
from ..model.weights import mark_like
from .embedding import QuantizedEmbedding
from .modules import GROUPED, STORED, QuantizedLinear
from .swap import DEFAULT_GROUP, QUANTIZATION_ATTR, check_request, quantization_of, quantize_model, replace_module, \
    tied_head


class QuantizeError(ConfigError):
    """A quantization request that cannot be done (one line)."""


def save_quantized(model: nn.Module, out: str | os.PathLike, *, config: dict | None = None, tokenizer=None,
                   step: int = 0) -> Path:
    """Write a quantized model as ``out/step-N`` (+ ``out/latest``), atomically; returns the directory."""
    settings = quantization_of(model)
    if settings is None:
        raise QuantizeError("the model is not quantized; call quantize_model first")
    data = {k: v for k, v in (config or {}).items() if k not in ("format", "format_version", "step", "tokenizer")}
    data.update(contents="quantized", quantization=settings)
    data["model"] = model.config.to_dict()
    return save_checkpoint(out, step, model, config=data, tokenizer=tokenizer, keep_last=1)


def _refuse_overlap(out: Path, checkpoint: Path) -> None:
    """--out must be a new (or empty) folder away from the checkpoint and its run folder."""
    out, source = out.resolve(), checkpoint.resolve()
    if out == source or source in out.parents or out in source.parents:
        raise QuantizeError(f"--out {out} overlaps the checkpoint {checkpoint}; choose a separate folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"--out {out} already exists and is not an empty folder; choose a new one")


def quantize_checkpoint(path, out, scheme: str, group_size: int | None = None,
                        skip: tuple[str, ...] = ("lm_head", "embed")) -> tuple[Path, nn.Module, dict]:
    """Load a float checkpoint, quantize it and save it to ``out``: (written dir, model, config)."""
    source = resolve_checkpoint(path)
    _refuse_overlap(Path(out), source)
    model, tokenizer, config = load_checkpoint(source, command="quantize")
    if config.get("contents", "full") != "full":
        raise QuantizeError(f"{source} is already a {config['contents']} checkpoint "
                            f"({config.get('quantization', {}).get('scheme', '')}); quantize the float one")
    if group_size is None and scheme in GROUPED:
        group_size = DEFAULT_GROUP
    check_request(model, scheme, group_size, tuple(skip))  # refuse before anything is written
    quantize_model(model, scheme, group_size, skip)
    written = save_quantized(model, out, config=config, tokenizer=tokenizer, step=int(config.get("step", 0)))
    return written, model, config


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _tensor_sizes(path) -> dict[str, tuple[int, int]]:
    """name -> (bytes, element size) of every tensor in a checkpoint's model.safetensors (header only)."""
    from safetensors import safe_open

    sizes = {}
    with safe_open(str(resolve_checkpoint(path) / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            element = _DTYPE_BYTES[piece.get_dtype()]
            count = 1
            for n in piece.get_shape():
                count *= n
            sizes[key] = (count * element, element)
    return sizes


def tensor_bytes(path) -> int:
    """Bytes of all tensors in a checkpoint's model.safetensors (read from its header)."""
    return sum(size for size, _ in _tensor_sizes(path).values())


def quantized_summary(path, config: dict) -> dict:
    """What `neoformer info` shows for a quantized checkpoint: its settings, the exact tensor bytes
    in the file and the planner's figure for the same settings (they agree; a test checks it)."""
    from ..planner import weight_bytes

    settings = config.get("quantization") or {}
    sizes = _tensor_sizes(path)
    quantized = [*settings.get("modules", []), *settings.get("embeddings", [])]
    packed = {f"{name}.{key}" for name in quantized for key in (*STORED.get(settings.get("scheme"), ()), "bias")}
    floats = [element for key, (_, element) in sizes.items() if key not in packed]
    float_bytes = max(set(floats), key=floats.count) if floats else 4
    scheme = settings.get("scheme")
    planned = weight_bytes(ModelConfig.from_dict(config["model"]), "int8" if scheme == "int8-dynamic" else scheme,
                           group_size=settings.get("group_size") or 64, skip=tuple(settings.get("skip", ())),
                           float_bytes=float_bytes, embeddings=bool(settings.get("embeddings")))
    linears, embeddings = len(settings.get("modules", [])), len(settings.get("embeddings", []))
    return {"scheme": scheme, "group_size": settings.get("group_size"), "skip": settings.get("skip", []),
            "quantized": f"{linears} Linears" + (f" + {embeddings} embedding(s)" if embeddings else ""),
            "quantized_linears": linears, "quantized_embeddings": embeddings, "tensor_bytes": sum(s for s, _ in sizes.values()),
            "float_bytes": float_bytes, "planned_bytes": planned}


def load_quantized_checkpoint(path, config: dict, *, device=None, dtype=None):
    """The ``"quantized"`` loader of :data:`neoformer.checkpoint.CONTENTS_LOADERS`: (model, tokenizer).

    The float model is built from the config, each quantized Linear is replaced by a
    QuantizedLinear holding the stored packed tensors, and the remaining tensors are loaded.
    ``dtype`` casts the float parts (norms, embeddings, skipped Linears); packed tensors keep theirs."""
    from ..model import build_model

    path = Path(path)
    verify_checkpoint(path)
    settings = config.get("quantization")
    if not isinstance(settings, dict) or not isinstance(settings.get("modules"), list):
        raise CheckpointError(f"{path / 'config.json'} says contents 'quantized' but has no valid 'quantization' "
                              "section (scheme, group_size, modules)")
    scheme, group_size = settings.get("scheme"), settings.get("group_size")
    if scheme not in STORED:
        raise CheckpointError(f"{path} uses quantization scheme {scheme!r}, which this neoformer does not know; upgrade")
    try:  # on the meta device: no float copy of the weights that are about to be replaced is ever allocated
        model = build_model(ModelConfig.from_dict(config["model"]), device="meta")
    except ConfigError as err:
        raise CheckpointError(f"{path / 'config.json'} holds an invalid model config: {err}") from None
    tensors, metadata = _read_safetensors(path / WEIGHTS)
    # the packed tensors in own memory, not as pages of the file's mapping: a CPU kernel layout takes them over on
    # first use, and touched pages of the mapping stay resident while the float tensors keep it open (measured:
    # int8 "all" on the 162M model, RSS growth 1.53x of its bytes through the mapping)
    packed = [key for name in [*settings["modules"], *settings.get("embeddings", [])] for key in
              (f"{name}.{stored}" for stored in STORED[scheme]) if key in tensors]
    tensors.update(read_owned_tensors(path / WEIGHTS, packed))
    aliases = _resolve_aliases(tensors, metadata, path)
    modules = dict(model.named_modules())
    for name in settings["modules"]:
        linear = _module_of(modules, name, nn.Linear, path)
        quantized = _build_module(scheme, linear, _pop_stored(tensors, name, scheme, path), group_size, path, name)
        replace_module(model, name, mark_like(quantized, linear))
    for name in settings.get("embeddings", []):
        embedding = _module_of(modules, name, nn.Embedding, path)
        stored = _pop_stored(tensors, name, scheme, path)
        _check_shapes(scheme, embedding.num_embeddings, embedding.embedding_dim, stored, group_size, path, name)
        quantized = QuantizedEmbedding(scheme, embedding.num_embeddings, embedding.embedding_dim, stored, group_size)
        replace_module(model, name, quantized)
        for head, owner in settings.get("tied", {}).items():
            if owner == name:
                _module_of(modules, head, nn.Linear, path)
                for key in STORED[scheme]:  # the aliases of the embedding's tensors
                    tensors.pop(f"{head}.{key}", None)
                replace_module(model, head, tied_head(quantized, modules[head]))
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(k for k in expected if k not in tensors and not _is_quantized_buffer(model, k))
    if unexpected or missing:
        raise CheckpointError(f"{path} does not fit its model config: "
                              + "; ".join([f"unexpected {k}" for k in unexpected[:2]] + [f"missing {k}" for k in missing[:2]]))
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as err:  # a shape that does not fit the config
        raise CheckpointError(f"{path} does not fit its model config: {str(err).splitlines()[-1].strip()}") from None
    for alias, target in aliases.items():  # assign=True gave each tied name its own Parameter: share one again
        if _is_quantized_buffer(model, alias):  # a tied quantized head: shares the embedding's buffers already
            continue
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(target))
    setattr(model, QUANTIZATION_ATTR, dict(settings))
    if dtype is not None:
        _cast_floats(model, dtype)
    if device is not None:
        model = model.to(device)
    return model, load_checkpoint_tokenizer(path)


def _resolve_aliases(tensors: dict, metadata: dict, path: Path) -> dict[str, str]:
    """Add every tied name (stored once) to ``tensors``; returns {alias: stored name}."""
    import json

    try:
        aliases = dict(json.loads(metadata.get("aliases", "{}")))
        for alias, target in aliases.items():
            tensors[alias] = tensors[target]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
        raise CheckpointError(f"{path / WEIGHTS} has corrupt alias metadata") from None
    return aliases


def _module_of(modules: dict, name: str, kind: type, path: Path) -> nn.Module:
    module = modules.get(name)
    if type(module) is not kind:
        raise CheckpointError(f"{path} quantizes {name!r}, which is not an {kind.__name__} of this model config")
    return module


def _pop_stored(tensors: dict, name: str, scheme: str, path: Path) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized module (+ its bias), taken out of ``tensors``."""
    stored = {key: tensors.pop(f"{name}.{key}", None) for key in (*STORED[scheme], "bias")}
    missing = [key for key in STORED[scheme] if stored[key] is None]
    if missing:
        raise CheckpointError(f"{path / WEIGHTS} lacks {name}.{missing[0]}; the checkpoint is corrupt")
    if stored["bias"] is None:
        del stored["bias"]
    return stored


def _build_module(scheme, linear: nn.Linear, stored: dict, group_size, path: Path, name: str) -> QuantizedLinear:
    """A QuantizedLinear from stored tensors, their shapes and dtypes checked against the Linear."""
    _check_shapes(scheme, linear.out_features, linear.in_features, stored, group_size, path, name)
    return QuantizedLinear(scheme, linear.in_features, linear.out_features, stored, group_size)


def _check_shapes(scheme, out_f: int, in_f: int, stored: dict, group_size, path: Path, name: str) -> None:
    """Stored tensors of an (out_f, in_f) weight: shapes and dtypes as :func:`quantize_weight` writes them."""
    groups = in_f // group_size if group_size else None
    want = {"qweight": ((out_f, in_f), torch.int8) if scheme.startswith("int8") else ((out_f, in_f // 2), torch.uint8),
            "scales": ((out_f,), torch.float32) if scheme.startswith("int8") else ((out_f, groups), torch.bfloat16),
            "absmax": ((out_f, groups), torch.float32), "zeros": ((out_f, groups), torch.bfloat16),
            "bias": ((out_f,), None)}
    for key, tensor in stored.items():
        shape, dtype = want[key]
        if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
            raise CheckpointError(f"{path / WEIGHTS}: {name}.{key} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                                  f"{dtype or 'float'} {shape} for {scheme}; the checkpoint is corrupt")


def _is_quantized_buffer(model: nn.Module, key: str) -> bool:
    owner = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
    return isinstance(owner, (QuantizedLinear, QuantizedEmbedding))


def _cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast float parameters and buffers, but not the packed tensors or their scales."""
    for module in model.modules():
        if isinstance(module, QuantizedEmbedding):
            module.dtype = dtype
            continue
        if isinstance(module, QuantizedLinear):
            if module.bias is not None:
                module.bias = module.bias.to(dtype)
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(dtype))
