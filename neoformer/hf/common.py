"""Helpers shared by the per-architecture converters: strict tensor lookup and Q/K/V fusing."""
from __future__ import annotations

import re

import torch

from ..config import ModelConfig

# buffers some checkpoints carry that are recomputed, never learned
IGNORED = re.compile(r"(rotary_emb\.(original_)?inv_freq|\.attn\.(masked_)?bias)$")


class HFWeights:
    """A Hugging Face state dict read strictly: every tensor must be taken exactly once."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str = ""):
        self.tensors = {k: v for k, v in tensors.items() if not IGNORED.search(k)}
        self.prefix = prefix
        self.taken: set[str] = set()

    def take(self, name: str, full: bool = False) -> torch.Tensor:
        key = name if full else self.prefix + name
        if key not in self.tensors:
            raise ValueError(f"checkpoint has no tensor {key!r}; is it complete and of the architecture "
                             "in config.json?")
        self.taken.add(key)
        return self.tensors[key]

    def check_all_used(self) -> None:
        left = sorted(set(self.tensors) - self.taken)
        if left:
            more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
            raise ValueError(f"checkpoint has tensors this converter does not use: {', '.join(left[:3])}{more}")


def take_lm_head(sd: dict[str, torch.Tensor], w: HFWeights, cfg: ModelConfig) -> None:
    """The output head: the embedding itself when tied (a stored copy is consumed and dropped), else HF's lm_head."""
    if cfg.tie_embeddings:
        if "lm_head.weight" in w.tensors:
            w.take("lm_head.weight", full=True)
        sd["lm_head.weight"] = sd["embed.tokens.weight"]
    else:
        sd["lm_head.weight"] = w.take("lm_head.weight", full=True)


def fuse_qkv(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Separate attn.{q,k,v}_proj -> attn.qkv (for models built with fused_qkv=True)."""
    out = dict(sd)
    for i in range(cfg.n_layers):
        p = f"decoder.blocks.{i}.attn."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{p}{n}_proj.{kind}", None) for n in "qkv"]
            if parts[0] is not None:
                out[f"{p}qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def split_qkv(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """attn.qkv -> separate attn.{q,k,v}_proj (the layout every exporter reads)."""
    q_dim, kv_dim = cfg.n_heads * cfg.resolved_head_dim, cfg.resolved_n_kv_heads * cfg.resolved_head_dim
    out = dict(sd)
    for i in range(cfg.n_layers):
        p = f"decoder.blocks.{i}.attn."
        for kind in ("weight", "bias"):
            fused = out.pop(f"{p}qkv.{kind}", None)
            if fused is not None:
                for n, part in zip("qkv", fused.split([q_dim, kv_dim, kv_dim], dim=0)):
                    out[f"{p}{n}_proj.{kind}"] = part
    return out
