"""Hugging Face folder -> neoformer checkpoint (``neoformer import DIR --out CKPT``).

Reads config + safetensors (Llama, Mistral, Qwen2, Mixtral, GPT-2, BERT through :mod:`neoformer.hf`,
or a folder ``neoformer export`` wrote with its own code), the fast tokenizer (tokenizer.json)
and the chat template, writes a plain checkpoint, then checks the imported model's logits
against transformers running the original folder. import(export(ckpt)) gives the same weights bit
for bit (tests/test_export.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import kinds
from .common import ExportError, Source, check_tolerance, max_abs_diff, prepare_out, probe_ids, verify_steps


@dataclass
class ImportResult:
    path: Path
    model: object
    max_diff: float | None
    architecture: str


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON ({err.msg})") from None


def _neoformer_folder_model(folder: Path, hf_cfg: dict):
    """A folder with neoformer's own code: our config is stored whole, weights under ``model.``."""
    from ..config import ModelConfig
    from ..hf import read_weights
    from ..model import build_model

    cfg = ModelConfig.from_dict(hf_cfg["neoformer"])
    weights = read_weights(folder)
    sd = {k.removeprefix("model."): v for k, v in weights.items()}
    model = build_model(cfg).to(next(iter(sd.values())).dtype)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _tokenizer(folder: Path):
    from ..tokenizer import HFTokenizer

    file = folder / "tokenizer.json"
    return HFTokenizer.from_file(file) if file.is_file() else None


def import_hf(folder: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
              force: bool = False, verify: bool = True) -> ImportResult:
    """Write ``out/step-000000`` (+ ``latest``) from the HF folder; verify against transformers."""
    from ..checkpoint import save_checkpoint
    from ..hf import from_hf, read_config

    folder = Path(folder)
    hf_cfg = read_config(folder)
    arch = (hf_cfg.get("architectures") or [hf_cfg.get("model_type", "?")])[0]
    remote = hf_cfg.get("model_type") == "neoformer"
    model = _neoformer_folder_model(folder, hf_cfg) if remote else from_hf(folder, dtype=dtype)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = _tokenizer(folder)
    config = {"model": model.config.to_dict(), "imported_from": {"architecture": arch, "folder": str(folder)}}
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    diff = _verify(model, folder, arch, remote) if verify else None
    root = prepare_out(out, force)
    path = save_checkpoint(root, 0, model, config=config, tokenizer=tokenizer)
    return ImportResult(path, model, diff, arch)


@torch.no_grad()
def _verify(model, folder: Path, arch: str, remote: bool) -> float:
    """neoformer's imported model vs transformers on the original folder (decoders: cached steps)."""
    from .hf_folder import hf_cached_steps, load_hf

    theirs = load_hf(folder, model.config.kind, remote)
    dtype = next(model.parameters()).dtype
    kind = kinds.get(model.config)
    if kind.causal and not kind.encoder_layers:  # decoder-only
        return verify_steps("import", Source(model.eval()), dtype, lambda ids: hf_cached_steps(theirs, ids), arch)[0]
    ids = probe_ids(model.config.vocab_size, 8)
    if not kind.causal:  # encoder
        diff = max_abs_diff([model(ids).float()], [theirs(input_ids=ids).logits])
    else:
        diff = max_abs_diff([model(ids, ids)[0].float()], [theirs(input_ids=ids, decoder_input_ids=ids).logits])
    check_tolerance("import", diff, dtype)
    return diff
