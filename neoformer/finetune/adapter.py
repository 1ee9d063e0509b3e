"""Adapter checkpoints: only the LoRA tensors plus a verified reference to the base checkpoint.

fit() saves ``unwrap(model).state_dict()``; :class:`AdapterModel` is the view it trains, whose
state dict is the adapter alone, so every checkpoint of a LoRA run (and its resume) holds a few
MB instead of the whole model. Its ``config.json`` says::

    "contents": "adapter",
    "base": {"path": "/abs/runs/teacher/checkpoints/step-001000", "weights_sha256": "<sha256>"},
    "lora": {"r": 16, "alpha": 32.0, "dropout": 0.05, "targets": [...], "rslora": false},
    "quantize": null | "nf4" | "int8",   # QLoRA: the base is quantized again when loaded,
    "quantize_group_size": null | 64,    #   with this group size (nf4)
    "quantize_skip": ["embed"],          #   and these layers left float (absent: ["lm_head", "embed"])
    "chat_template": {...}               # the template the adapter was trained with

The base reference is the one path that leaves a checkpoint folder (docs/checkpoints.md): the
base is loaded only through ``load_checkpoint`` (which verifies its manifest) and refused when the
sha256 of its ``model.safetensors`` is not the recorded one; ``base=`` / ``--base PATH`` points
to a copy elsewhere (same hash required).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    MANIFEST, WEIGHTS, CheckpointError, load_checkpoint, load_weights, read_config, resolve_checkpoint,
    save_single_checkpoint,
)
from ..safepath import inside
from .lora import LoraConfig, adapter_parameters, add_lora, lora_layers, merge_lora

ADAPTER = "adapter"


class AdapterModel(nn.Module):
    """The model fit() trains in a LoRA run: the base (with LoRA layers swapped in) whose
    ``state_dict`` / ``load_state_dict`` hold only the adapter. Attributes it lacks (``config``,
    ``loss``, ``after_optimizer_step``, ...) are the base model's, as with peft's PeftModel."""

    def __init__(self, base_model: nn.Module, lora: LoraConfig):
        super().__init__()
        self.base_model = base_model
        self.lora = lora

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_model"], name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return adapter_parameters(self.base_model)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        out = {} if destination is None else destination
        for name, param in self.adapter_parameters().items():
            out[prefix + name] = param if keep_vars else param.detach()
        return out

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        params = self.adapter_parameters()
        missing = [k for k in params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in params]
        if strict and (missing or unexpected):
            raise RuntimeError(f"adapter does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in params:
                    params[name].copy_(value)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- the base reference -------------------------------------------------------------------
def base_reference(base_path: str | os.PathLike) -> dict[str, str]:
    """``{"path", "weights_sha256"}`` of a full checkpoint, from its manifest."""
    path = resolve_checkpoint(base_path)
    return {"path": str(path.resolve()), "weights_sha256": _weights_sha256(path)}


def _weights_sha256(path: Path) -> str:
    try:
        manifest = json.loads(inside(path, MANIFEST, what="manifest", error=CheckpointError).read_text())
        return manifest["files"][WEIGHTS]["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}; an adapter's base must be a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path / MANIFEST} does not record the sha256 of {WEIGHTS}") from None


def load_base(reference: Any, *, base: str | os.PathLike | None = None, device=None, dtype=None,
              where: str = "the adapter"):
    """(model, tokenizer, config) of an adapter's base, refused unless its weights hash matches."""
    if not isinstance(reference, dict) or not isinstance(reference.get("weights_sha256"), str) or (
            base is None and not isinstance(reference.get("path"), str)):
        raise CheckpointError(f"{where} has no valid base reference ({{path, weights_sha256}}); pass --base PATH")
    path = resolve_checkpoint(base if base is not None else reference["path"])
    found = _weights_sha256(path)
    if found != reference["weights_sha256"]:
        raise CheckpointError(f"base checkpoint {path} has weights sha256 {found[:12]}..., but {where} was trained "
                              f"on {reference['weights_sha256'][:12]}...; refused. Pass the right base with --base PATH")
    # load_checkpoint verifies every file of the base against that manifest
    return load_checkpoint(path, device=device, dtype=dtype, contents=("full",), command=f"{where}'s base")


def adapter_settings(base_path, lora: LoraConfig, chat_template: dict | None,
                     quantization: dict | None = None) -> dict:
    """The ``config.json`` entries (fit's ``run_config``) that make a checkpoint an adapter;
    ``quantization`` is :func:`.qlora.quantization_settings` of a QLoRA base."""
    return {"contents": ADAPTER, "base": base_reference(base_path), "lora": lora.to_dict(),
            "quantize": quantization["scheme"] if quantization else None,
            "quantize_group_size": quantization.get("group_size") if quantization else None,
            "quantize_skip": quantization.get("skip") if quantization else None,
            "chat_template": chat_template}


def attach_adapter(model: nn.Module, config: dict, where: str = "the adapter") -> AdapterModel:
    """Quantize the base when the adapter was trained on a quantized one, then add its LoRA layers."""
    try:
        lora = LoraConfig.from_dict(config["lora"])
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{where} has no valid 'lora' settings in its config.json") from None
    if config.get("quantize"):
        from .qlora import SKIP_HEAD_AND_EMBEDDING, quantize_base

        skip = config.get("quantize_skip") or SKIP_HEAD_AND_EMBEDDING  # older adapters kept the head float
        if not isinstance(skip, (list, tuple)) or not all(isinstance(word, str) for word in skip):
            raise CheckpointError(f"{where} has an invalid 'quantize_skip' (a list of layer-name words)")
        model = quantize_base(model, config["quantize"], config.get("quantize_group_size"), skip)
    add_lora(model, lora)
    return AdapterModel(model, lora)


def load_adapter(path, *, base=None, device=None, dtype=None) -> tuple[AdapterModel, Any, dict]:
    """(AdapterModel, tokenizer, config.json of the adapter) of an adapter checkpoint."""
    path = resolve_checkpoint(path)
    config = read_config(path)
    if config.get("contents") != ADAPTER:
        raise CheckpointError(f"{path} is not an adapter checkpoint (contents {config.get('contents', 'full')!r})")
    model, tokenizer, _ = load_base(config.get("base"), base=base, device=device, dtype=dtype, where=f"adapter {path}")
    wrapped = attach_adapter(model, config, where=f"adapter {path}")
    load_weights(wrapped, path)  # verifies the adapter's own manifest; names and shapes must fit
    return wrapped.eval(), tokenizer, config


def load_adapter_checkpoint(path, config: dict, *, device=None, dtype=None, base=None):
    """The ``contents: adapter`` loader of ``neoformer.checkpoint.load_checkpoint`` (generate, eval,
    serve, export): the base with the adapter folded in, a plain model every command handles. A
    QLoRA adapter stays unmerged on its quantized base (merging would dequantize it)."""
    model, tokenizer, _ = load_adapter(path, base=base, device=device, dtype=dtype)
    if config.get("quantize"):
        return model.base_model, tokenizer
    return merge_lora(model.base_model), tokenizer


# ---- merge ----------------------------------------------------------------------------------
def merge_adapter(path, out_dir, *, base=None) -> Path:
    """Fold an adapter into its base and save a normal ``full`` checkpoint at ``out_dir`` (fp32
    arithmetic; the base's dtype is kept). It carries the adapter's chat template. A QLoRA adapter
    folds into its dequantized base: an fp32 model equal to quantized base + adapter, up to the
    quantized kernels' rounding (docs/finetune.md)."""
    model, tokenizer, config = load_adapter(path, base=base, device="cpu")
    merged = merge_lora(model.base_model)
    if config.get("quantize"):  # QLoRA: the layers the adapter left alone are dequantized too
        from .qlora import dequantize_base

        merged = dequantize_base(merged)
    settings = {"model": merged.config.to_dict(), "chat_template": config.get("chat_template"),
                "merged_from": {"adapter": str(resolve_checkpoint(path).resolve()), "base": config.get("base")}}
    return save_single_checkpoint(out_dir, merged, settings, tokenizer, step=int(config.get("step", 0)))


__all__ = ["AdapterModel", "adapter_settings", "attach_adapter", "base_reference", "load_adapter",
           "load_adapter_checkpoint", "load_base", "merge_adapter", "trainable_share",
           "lora_layers"]
