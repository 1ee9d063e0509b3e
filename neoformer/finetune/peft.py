"""peft's adapter files, both ways, for Llama-shaped decoders (the ones ``neoformer.hf.to_hf`` exports).

peft saves ``adapter_config.json`` + ``adapter_model.safetensors`` with keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]). Ours are ``decoder.blocks.0.attn.q_proj.lora_A.weight``: the same tensors under the
names ``neoformer.hf.llama`` maps for the base weights. DoRA adds ``...lora_magnitude_vector`` ([out])
under the same names (``"use_dora": true``). A fused QKV LoRA exports as separate
q/k/v LoRAs that share A (its B rows split per projection): the same function. Nothing here
imports peft; the files are plain JSON and safetensors.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..chat import chat_template_of
from ..checkpoint import CheckpointError, load_checkpoint
from ..hf.llama import _LAYER as LLAMA_LAYER_NAMES
from ..checkpoint import save_single_checkpoint
from .adapter import AdapterModel, adapter_settings, load_adapter
from .lora import FUSED_QKV, LoraConfig, add_lora, lora_layers

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."
# our module path inside a block -> HF's (attn.q_proj -> self_attn.q_proj, ffn.gate -> mlp.gate_proj)
OURS_TO_HF = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in LLAMA_LAYER_NAMES.items()
              if k.endswith(".weight") and k.startswith(("attn.", "ffn."))}
HF_TO_OURS = {v: k for k, v in OURS_TO_HF.items()}
ROLE_OF_HF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down"}
_OUR_KEY = re.compile(r"^decoder\.blocks\.(\d+)\.(.+)$")
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_[AB]\.weight|lora_magnitude_vector)$")
MAGNITUDE = "lora_magnitude_vector"  # DoRA's per-row magnitudes (peft's key, ours too)


def _check_llama_shaped(config) -> None:
    from ..hf import llama

    if config.kind != "decoder" or config.rmc or config.nsb or config.moe_experts or config.position != "rope":
        raise ValueError("peft files are written for Llama-shaped decoders (the ones neoformer export --format hf "
                         "writes as LlamaForCausalLM); this model is not one")
    llama.check_exportable(config)


def _fused_parts(attention, rows) -> list[tuple[str, int, int]]:
    """(q|k|v, first B row, end B row) of a fused QKV LoRA, in B's row order."""
    q_dim, kv_dim = attention.n_heads * attention.head_dim, attention.n_kv_heads * attention.head_dim
    spans = [("q", 0, q_dim), ("k", q_dim, q_dim + kv_dim), ("v", q_dim + kv_dim, q_dim + 2 * kv_dim)]
    chosen = set(rows.tolist()) if rows is not None else None
    parts, offset = [], 0
    for role, start, end in spans:
        if chosen is None or start in chosen:
            parts.append((role, offset, offset + end - start))
            offset += end - start
    return parts


def _peft_tensors(model: AdapterModel) -> dict[str, torch.Tensor]:
    tensors = {}
    base = model.base_model
    for name, layer in lora_layers(base):
        match = _OUR_KEY.match(name)
        module = match.group(2) if match else None
        if module is not None and module.endswith(f".{FUSED_QKV}"):
            attention = base.get_submodule(name.rpartition(".")[0])
            for role, start, end in _fused_parts(attention, layer.lora_rows):
                prefix = f"{PEFT_PREFIX}{match.group(1)}.self_attn.{role}_proj"
                tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.weight
                tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.weight[start:end]
                if layer.lora_magnitude_vector is not None:
                    tensors[f"{prefix}.{MAGNITUDE}"] = layer.lora_magnitude_vector[start:end]
            continue
        if module not in OURS_TO_HF:
            raise ValueError(f"LoRA layer {name} has no counterpart in a Hugging Face Llama; peft export covers "
                             "attention and FFN projections only")
        prefix = f"{PEFT_PREFIX}{match.group(1)}.{OURS_TO_HF[module]}"
        tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            tensors[f"{prefix}.{MAGNITUDE}"] = layer.lora_magnitude_vector
    return {k: v.detach().to("cpu").float().clone().contiguous() for k, v in tensors.items()}


def export_peft(adapter: str | os.PathLike, out_dir: str | os.PathLike, *, base=None) -> Path:
    """Write peft's ``adapter_config.json`` + ``adapter_model.safetensors`` for a neoformer adapter;
    ``PeftModel.from_pretrained(hf_model, out_dir)`` on the base exported with ``to_hf`` then gives
    our logits."""
    from safetensors.torch import save_file

    model, _, config = load_adapter(adapter, base=base, device="cpu")
    _check_llama_shaped(model.config)
    if config.get("quantize"):
        raise ValueError("a QLoRA adapter was trained on a quantized base; merge it instead of exporting to peft")
    tensors = _peft_tensors(model)
    lora = model.lora
    targets = sorted({key.split(".")[-3] for key in tensors if not key.endswith(MAGNITUDE)})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": targets, "bias": "none", "use_rslora": lora.rslora,
        "use_dora": lora.dora, "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True, "base_model_name_or_path": str(config.get("base", {}).get("path", "")),
    }
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


# ---- import ----------------------------------------------------------------------------------
def _read_peft(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no {PEFT_CONFIG}; is it a peft adapter folder?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / PEFT_CONFIG} is not valid JSON ({err.msg})") from None
    if not (folder / PEFT_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has no {PEFT_WEIGHTS} (a pickled adapter_model.bin is never read; "
                                "save the adapter with safe_serialization=True)")
    unsupported = [(config.get("peft_type") != "LORA", f"peft_type {config.get('peft_type')!r} (only LORA)"),
                   (config.get("rank_pattern"), "rank_pattern"),
                   (config.get("alpha_pattern"), "alpha_pattern"), (config.get("bias", "none") != "none", "LoRA biases"),
                   (config.get("fan_in_fan_out"), "fan_in_fan_out"), (config.get("modules_to_save"), "modules_to_save"),
                   (config.get("layers_to_transform") is not None, "layers_to_transform"),
                   (config.get("lora_bias"), "lora_bias")]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"{folder}: this peft adapter uses {what}, which neoformer does not import")
    return config, load_file(str(folder / PEFT_WEIGHTS))


def _our_state(tensors: dict[str, torch.Tensor], folder: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    state, roles = {}, set()
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None or match.group(2) not in HF_TO_OURS:
            raise ValueError(f"{folder}: tensor {key!r} is not a LoRA of a Llama attention/FFN projection")
        roles.add(ROLE_OF_HF[match.group(2).split(".")[-1]])
        state[f"decoder.blocks.{match.group(1)}.{HF_TO_OURS[match.group(2)]}.{match.group(3)}"] = value
    return state, roles


def import_peft(peft_dir: str | os.PathLike, base: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A neoformer adapter checkpoint at ``out_dir`` from a peft LoRA trained on (the HF export of)
    the neoformer checkpoint ``base``."""
    folder = Path(peft_dir)
    peft_config, tensors = _read_peft(folder)
    model, _, base_config = load_checkpoint(base, device="cpu", kinds=("decoder",), contents=("full",),
                                            command="neoformer finetune import-peft")
    _check_llama_shaped(model.config)
    if model.config.fused_qkv:
        raise ValueError("peft's q/k/v LoRAs have separate A matrices; import onto a base with fused_qkv=False")
    state, roles = _our_state(tensors, folder)
    lora = LoraConfig(r=int(peft_config["r"]), alpha=float(peft_config.get("lora_alpha", 8)),
                      dropout=float(peft_config.get("lora_dropout") or 0.0),
                      targets=tuple(role for role in ("q", "k", "v", "o", "gate", "up", "down") if role in roles),
                      rslora=bool(peft_config.get("use_rslora", False)), dora=bool(peft_config.get("use_dora", False)))
    add_lora(model, lora)
    adapter = AdapterModel(model, lora)
    try:
        adapter.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{folder} does not fit {base}: {err}") from None
    template = chat_template_of(base_config).to_dict()
    return save_single_checkpoint(out_dir, adapter, adapter_settings(base, lora, template), tokenizer=None)


__all__ = ["export_peft", "import_peft", "PEFT_CONFIG", "PEFT_WEIGHTS"]
