"""Teacher logits cached on disk, so several distillation runs (or a resumed one) skip the teacher.

For every training batch the teacher's ``top_k`` largest logits (values, fp16 by default, and
their token ids) and the log-normaliser of all its logits at the distillation temperature (fp32)
at every position are stored in safetensors shards, keyed by a hash of the batch's input ids; ``manifest.json`` records what the cache was built from (a fingerprint of the teacher's
weights, dtype and kept vocabulary, the data and batch settings) and which shard holds each batch.
A distillation reads them through :meth:`LogitCache.lookup`; the KD loss over the top-k is
``neoformer.train.distill.sparse_kd_loss``: exact probabilities of the k tokens plus one bucket for
the rest of the vocabulary on both sides (exact when ``top_k`` is the whole vocabulary). Opening a cache built for
another teacher or other data is refused with one line; nothing is unpickled.

    cache = build_logit_cache("runs/logits", key, objective.teacher_logits, batches, n_batches=600, temperature=2.0)
    objective.cached_logits = cache.lookup
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import ConfigError
from ..safepath import inside

FORMAT = "neoformer-logit-cache/1"
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def tensor_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def teacher_fingerprint(teacher: nn.Module, teacher_ids: torch.Tensor | None = None) -> str:
    """Hash of the teacher's weights (in their current dtype) and of the student -> teacher id map."""
    state = teacher.state_dict()
    parts = [state[name] for name in sorted(state)]
    if teacher_ids is not None:
        parts.append(teacher_ids.to(torch.int64))
    return tensor_digest(*parts)


class LogitCache:
    """A built cache: ``lookup(input_ids) -> (values (B, L, k) float32, indices (B, L, k) int64,
    log_norm (B, L) float32)``."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.top_k, self.where = manifest["top_k"], manifest["batches"]
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.where)

    def _shard(self, name: str):
        from safetensors import safe_open

        if name not in self._open:
            if len(self._open) > 4:  # bound the open memory maps
                self._open.clear()
            # shard names come from manifest.json: a stranger's cache may only name files inside itself
            path = inside(self.root, name, what="logit-cache shard", error=ConfigError, child=True)
            self._open[name] = safe_open(str(path), framework="pt")
        return self._open[name]

    def lookup(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tensor_digest(input_ids.to(torch.int64))
        shard = self.where.get(key)
        if shard is None:
            raise ConfigError(f"the logit cache {self.root} has no teacher logits for this batch (it holds "
                              f"{len(self)} batches); rebuild it for at least as many steps as the distillation")
        f = self._shard(shard)
        values, indices, norm = (f.get_tensor(f"{key}.{part}") for part in ("values", "indices", "log_norm"))
        device = input_ids.device
        return values.to(device, torch.float32), indices.to(device, torch.int64), norm.to(device)


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a logit-cache manifest ({err}); delete {root} to rebuild it") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{root} is not a neoformer logit cache ({FORMAT}); pass another --logit-cache")
    return manifest


def _check_key(root: Path, manifest: dict, key: dict, top_k: int | None, dtype: str | None) -> None:
    """One line naming the first field that differs: a stale cache is never used."""
    wanted = {**key, **({"top_k": top_k} if top_k is not None else {}), **({"dtype": dtype} if dtype else {})}
    held = {**manifest["key"], "top_k": manifest["top_k"], "dtype": manifest["dtype"]}
    for name, value in wanted.items():
        if held.get(name) != value:
            raise ConfigError(f"the logit cache {root} was built for another {name} ({held.get(name)!r}, this run: "
                              f"{value!r}); delete it or pass another --logit-cache")


def open_logit_cache(root, key: dict, temperature: float, top_k: int | None = None,
                     dtype: str | None = None) -> LogitCache:
    """The cache at ``root`` if it was built for ``key`` (teacher fingerprint, data settings) at ``temperature``."""
    root, key = Path(root), {**key, "temperature": temperature}
    manifest = _read_manifest(root)
    if manifest is None:
        raise ConfigError(f"{root} holds no logit cache; build one first (neoformer compress --logit-cache)")
    _check_key(root, manifest, key, top_k, dtype)
    return LogitCache(root, manifest)


def _save_shard(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = root / (name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(root / name)


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(root / MANIFEST)


def build_logit_cache(root, key: dict, teacher_logits: Callable[[torch.Tensor], torch.Tensor],
                      batches: Iterable, n_batches: int, top_k: int = 64, dtype: str = "float16",
                      temperature: float = 1.0, shard_batches: int = 32,
                      log: Callable[[str], None] = print) -> LogitCache:
    """Run the teacher over the first ``n_batches`` of ``batches`` and store its top-k logits.

    ``teacher_logits(input_ids) -> (B, L, V)`` is the distillation's own teacher call (kept vocabulary
    already applied); ``temperature`` is the distillation's (the stored log-normaliser depends on
    it, so it is part of the cache's key). A cache already built for ``key`` is extended: batches it holds are skipped, so
    a longer distillation reuses the shorter one's logits.
    """
    root = Path(root)
    if dtype not in DTYPES:
        raise ConfigError(f"logit cache dtype {dtype!r} must be one of: {', '.join(DTYPES)}")
    if top_k < 1:
        raise ConfigError(f"--logit-top-k ({top_k}) must be a positive integer")
    key = {**key, "temperature": temperature}
    manifest = _read_manifest(root)
    if manifest is not None:
        _check_key(root, manifest, key, top_k, dtype)
    else:
        root.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "key": key, "top_k": top_k, "dtype": dtype, "batches": {}}
    where, pending, added, tail_mass = manifest["batches"], {}, 0, 0.0
    shard_no = len({*where.values()})

    def flush():
        nonlocal pending, shard_no
        if pending:
            name = f"shard-{shard_no:05d}.safetensors"
            _save_shard(root, name, pending)
            where.update({k.split(".")[0]: name for k in pending})
            _write_manifest(root, manifest)  # after the shard: the manifest never names a missing file
            pending, shard_no = {}, shard_no + 1

    for number, batch in enumerate(batches):
        if number >= n_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch["input_ids"]
        digest = tensor_digest(x.to(torch.int64))
        if digest in where or f"{digest}.values" in pending:
            continue
        logits = teacher_logits(x)
        values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        index_dtype = torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
        pending[f"{digest}.values"] = values.to(DTYPES[dtype]).cpu().contiguous()
        pending[f"{digest}.indices"] = indices.to(index_dtype).cpu().contiguous()
        log_norm = torch.logsumexp(logits.float() / temperature, dim=-1)
        pending[f"{digest}.log_norm"] = log_norm.cpu().contiguous()
        tail_mass += float(1 - (values.float() / temperature - log_norm[..., None]).exp().sum(-1).mean())
        added += 1
        if len(pending) // 3 >= shard_batches:
            flush()
    flush()
    _write_manifest(root, manifest)
    log(f"logit cache {root}: {added} batches added, {len(where)} held (top {top_k}, {dtype})" + (
        f"; teacher probability outside the top {top_k} at T={temperature:g}: {tail_mass / added:.1%} (the KD term "
        "sees it as one bucket; raise --logit-top-k or lower --temperature if it is large)" if added else ""))
    return LogitCache(root, manifest)





def distillation_batches(train) -> int:
    """Micro-batches a distillation with TrainConfig ``train`` draws (its steps, or its token budget)."""
    steps = train.max_steps
    if train.max_tokens is not None and train.seq_len:
        steps = min(steps, -(-train.max_tokens // (train.batch_size * train.grad_accum * train.seq_len)))
    return steps * train.grad_accum


def cache_for_distillation(root, objective, sampler, train, data: dict, top_k: int = 64, dtype: str = "float16",
                           log: Callable[[str], None] = print) -> LogitCache:
    """The cache at ``root`` for this distillation, built or extended first; ``sampler`` (fit()'s batch
    source) is rewound to where it was, so fit() draws exactly the batches the cache holds."""
    key = {"teacher": teacher_fingerprint(objective.teacher, objective.teacher_ids), "data": data,
           "batch_size": train.batch_size, "seq_len": train.seq_len, "seed": train.seed}
    state = sampler.state_dict() if hasattr(sampler, "state_dict") else None
    if state is None:
        raise ConfigError("the logit cache needs a batch source that can be rewound (state_dict / load_state_dict)")
    cache = build_logit_cache(root, key, objective.teacher_logits, sampler, distillation_batches(train), top_k, dtype,
                              objective.temperature, log=log)
    sampler.load_state_dict(state)
    return cache
__all__ = ["LogitCache", "build_logit_cache", "cache_for_distillation", "distillation_batches", "open_logit_cache",
           "teacher_fingerprint", "tensor_digest"]
