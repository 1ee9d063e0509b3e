"""Safetensors weights as Hugging Face writes them: one ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (``weight_map``: tensor ->
file) when a ``max_shard_size`` splits them. Shard names read from an index must stay inside the folder.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # transformers' units (KB = 1000 B)


def parse_size(size: str | int) -> int:
    """``"500MB"``, ``"2GB"``, ``"1.5GiB"`` or a byte count -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not match:
            raise ValueError(f"--max-shard-size {size!r}: give a size such as 500MB, 2GB or 1GiB")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"--max-shard-size {size!r} must be positive")
    return value


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names per shard, in order; a new shard starts when the next tensor would pass ``max_bytes``
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(t)
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: str | int | None = None) -> list[str]:
    """Write the weights (sharded when they pass ``max_shard_size``); return the files written."""
    from safetensors.torch import save_file

    shards = plan_shards(tensors, parse_size(max_shard_size)) if max_shard_size is not None else [list(tensors)]
    if len(shards) == 1:
        save_file(tensors, out / SINGLE, metadata={"format": "pt"})
        return [SINGLE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, INDEX]


def shard_files(folder: Path, index_name: str) -> list[Path]:
    """The shard files an index names, refused (one line) unless each is a plain name inside ``folder``."""
    index_path = folder / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{index_path} is not a valid index (a JSON object with a weight_map)") from None
    root = folder.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        path = (folder / str(name)).resolve()
        if path.parent != root:
            raise ValueError(f"{index_path} names the shard {name!r}, which is outside the model folder; refusing it")
        files.append(path)
    return files
