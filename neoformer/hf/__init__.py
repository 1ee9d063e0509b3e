"""Hugging Face interop: load Llama / Mistral / Qwen2 / Mixtral / GPT-2 / BERT checkpoints exactly, export back.

``from_hf`` reads a local model folder (config.json + safetensors, sharded or not, or a
pytorch_model.bin through ``torch.load(weights_only=True)``) without importing transformers,
or takes an in-memory transformers model. ``to_hf`` writes config.json + model.safetensors that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with matching logits.

One converter module per HF family (llama.py, gpt2.py) maps the config and renames tensors;
this file reads and writes checkpoints and checks what can be mapped at all.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..model import build_model
from ..model.transformer import DecoderLM
from . import bert, gpt2, llama, mixtral, qwen2
from .common import HFWeights, fuse_qkv, split_qkv
from .shards import shard_files, write_safetensors

FAMILIES = {arch: family for family in (llama, gpt2, mixtral, qwen2, bert) for arch in family.ARCHITECTURES}
MODEL_TYPES = {**llama.MODEL_TYPES, **gpt2.MODEL_TYPES, **mixtral.MODEL_TYPES, **qwen2.MODEL_TYPES,
               **bert.MODEL_TYPES}
SUPPORTED = ", ".join(FAMILIES)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "tokenizer_meta.json",
                   "generation_config.json")


# ---- reading ------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; from_hf wants a local Hugging Face model folder "
                                "(config.json + model.safetensors) or a transformers model object")
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no config.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({err.msg} at line {err.lineno})") from None


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"weight file {file} (listed in the index) is missing")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, a sharded index, or pytorch_model.bin (same order as HF)."""
    folder = Path(path)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return _load_file(folder / single)
        if (folder / index).is_file():
            tensors: dict[str, torch.Tensor] = {}
            for shard in shard_files(folder, index):
                tensors.update(_load_file(shard))
            return tensors
    raise FileNotFoundError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _architecture(hf_cfg: dict[str, Any]) -> str:
    archs = hf_cfg.get("architectures") or []
    arch = archs[0] if archs else MODEL_TYPES.get(hf_cfg.get("model_type", ""), hf_cfg.get("model_type") or "?")
    if arch not in FAMILIES:
        raise ValueError(f"architecture {arch!r} is not supported by from_hf; supported: {SUPPORTED}")
    return arch


# ---- from_hf ------------------------------------------------------------------------------
def from_hf(path_or_model, dtype: torch.dtype | None = None, **overrides) -> DecoderLM:
    """A neoformer model (eval mode) with the weights of a HF Llama / Mistral / GPT-2 model.

    ``dtype=None`` keeps the checkpoint's floating dtype. ``overrides`` change config fields that
    do not alter the weights, e.g. ``attn_backend="eager"`` or ``fused_qkv=True``.
    """
    in_memory = not isinstance(path_or_model, (str, os.PathLike))
    if not in_memory:
        hf_cfg = read_config(path_or_model)
        arch = _architecture(hf_cfg)
    elif hasattr(path_or_model, "config") and hasattr(path_or_model, "state_dict"):
        arch = type(path_or_model).__name__
        if arch not in FAMILIES:
            raise ValueError(f"architecture {arch!r} is not supported by from_hf; supported: {SUPPORTED}")
        hf_cfg = path_or_model.config.to_dict()
    else:
        raise TypeError(f"from_hf takes a folder path or a transformers model, not {type(path_or_model).__name__}")

    family = FAMILIES[arch]
    fields = family.config_from_hf(hf_cfg, arch)  # config errors before any weight is read
    fields["name"] = f"hf-{hf_cfg.get('model_type') or arch}"
    cfg = ModelConfig.from_dict({**fields, **overrides})
    # an in-memory model's tensors are its live parameters: copied below, never shared
    weights = HFWeights(path_or_model.state_dict() if in_memory else read_weights(path_or_model))
    sd = family.weights_from_hf(weights, cfg)
    weights.check_all_used()
    if cfg.fused_qkv:
        sd = fuse_qkv(sd, cfg)
    if dtype is None:
        dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    return _load_into_model(cfg, sd, dtype, copy=in_memory)


def _load_into_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype, copy: bool) -> DecoderLM:
    model = build_model(cfg, device="meta")
    expected = model.state_dict()
    for name, ref in expected.items():
        if name not in sd:
            raise ValueError(f"conversion produced no tensor for {name!r}")
        if tuple(sd[name].shape) != tuple(ref.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(sd[name].shape)} != model shape {tuple(ref.shape)}; "
                             "does config.json match the weights?")
    converted = {}
    for name in expected:
        src = sd[name].detach()
        t = src.to(device="cpu", dtype=dtype).contiguous()  # a no-op (the same tensor) when nothing changes
        converted[name] = t.clone() if copy and t is src else t
    if cfg.tie_embeddings:
        converted["lm_head.weight"] = converted["embed.tokens.weight"]
    model.load_state_dict(converted, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.tokens.weight
    return model.eval()


# ---- to_hf --------------------------------------------------------------------------------
def stock_export_family(cfg: ModelConfig):
    """The converter module for this config, or a ValueError naming the first unsupported feature."""
    if cfg.kind == "encoder":
        return bert  # its check_exportable says whether the encoder is BERT-shaped
    unsupported = [
        (cfg.kind != "decoder", f"kind={cfg.kind!r}; only decoder-only models and BERT-shaped encoders export"),
        (cfg.embed_norm or cfg.head_bias, "an embedding norm or a biased output layer (embed_norm / head_bias)"),
        (cfg.rmc or cfg.nsb, "the NeoFormer-X memory layer (rmc/nsb)"),
        (cfg.moe_experts > 0 and cfg.position != "rope", "a mixture of experts without rope"),
        (cfg.ngpt, "nGPT (ngpt=True)"),
        (cfg.norm_position != "pre", "post-norm (norm_position='post')"),
        (cfg.position == "alibi", "ALiBi positions (position='alibi')"),
        (cfg.position == "relative", "T5 relative position bias (position='relative')"),
        (cfg.position in ("sinusoidal", "none"), f"position={cfg.position!r}"),
        (cfg.sliding_window_pattern is not None,
         f"a local/global sliding-window pattern (sliding_window_pattern={cfg.sliding_window_pattern!r})"),
        (cfg.embed_scale, "scaled token embeddings (embed_scale=True)"),
        (cfg.qk_norm, "QK-norm (qk_norm=True)"),
        (cfg.logit_softcap is not None, f"logit soft-capping (logit_softcap={cfg.logit_softcap})"),
        (cfg.activation == "relu2", "the ReLU-squared FFN (activation='relu2')"),
    ]
    for bad, feature in unsupported:
        if bad:
            raise ValueError(f"to_hf: {feature} is not supported by any Hugging Face architecture we export to")
    if cfg.moe_experts:
        return mixtral
    return llama if cfg.position == "rope" else gpt2


def to_hf(model, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
          max_shard_size: str | int | None = None) -> Path:
    """Write ``out_dir/config.json`` + ``model.safetensors`` for transformers (Llama, Mistral, Qwen2, Mixtral,
    GPT-2, BERT).

    ``tokenizer_dir``: a folder (or one file) whose tokenizer files are copied next to the weights.
    ``max_shard_size`` (``"2GB"``, bytes): shards plus ``model.safetensors.index.json`` past that size.
    """
    _check_export_folder(Path(out_dir))
    cfg: ModelConfig = model.config
    family = stock_export_family(cfg)
    arch = family.check_exportable(cfg)
    tokenizer_files = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir is not None else []
    sd = split_qkv({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    # clone: safetensors refuses tensors that share storage (tied, or split from a fused qkv)
    tensors = {k: v.to("cpu").clone().contiguous() for k, v in family.weights_to_hf(sd, cfg).items()}
    dtype = next(iter(tensors.values())).dtype
    hf_cfg = {**family.config_to_hf(cfg, arch), "dtype": str(dtype).removeprefix("torch."),
              "torch_dtype": str(dtype).removeprefix("torch.")}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out, max_shard_size)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    _copy_tokenizer(tokenizer_files, out)
    return out


def _check_export_folder(out: Path) -> None:
    """Refuse (one line) an output that is a file or a neoformer checkpoint, which the export would overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder for the exported model")
    if (out / "manifest.json").is_file() or (out / "sharded.json").is_file():
        raise ValueError(f"--out {out} holds a neoformer checkpoint, which the export would overwrite; "
                         "choose another folder")


def _tokenizer_files(src: Path) -> list[Path]:
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        raise FileNotFoundError(f"no tokenizer files in {src} (looked for {', '.join(TOKENIZER_FILES[:5])}, ...)")
    return files


def _copy_tokenizer(files: list[Path], out: Path) -> None:
    """Copy tokenizer files; add a tokenizer_config.json for a bare tokenizer.json so
    ``AutoTokenizer.from_pretrained(out)`` works."""
    for file in files:
        shutil.copy2(file, out / file.name)
    names = [f.name for f in files]
    if "tokenizer.json" in names and "tokenizer_config.json" not in names:
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")


__all__ = ["from_hf", "to_hf", "stock_export_family", "read_config", "read_weights", "SUPPORTED"]
