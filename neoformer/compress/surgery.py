"""Weight surgery on state dicts: each reduction maps the teacher's tensors to the student's shapes,
then an ordinary model is built from the student's config and loads them (strictly, so a tensor
left behind or of the wrong shape is an error, not a silent re-initialisation)."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ModelConfig

BLOCK_KEY = re.compile(r"^decoder\.blocks\.(\d+)\.(.+)$")
# linears that read the residual stream (weight columns = d_model) and ones that write it (rows = d_model)
READS_RESIDUAL = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "ffn.gate", "ffn.up")
WRITES_RESIDUAL = ("attn.o_proj", "ffn.down")


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 copy of the weights (tied tensors appear under each name, as in state_dict)."""
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def rebuild(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """An ordinary model of ``cfg`` holding ``state``; buffers (RoPE tables) come from the new model."""
    from ..model import build_model

    torch.manual_seed(0)  # nothing is left at its random init, but keep construction deterministic
    model = build_model(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _is_buffer(model, k)]
    if missing:
        raise RuntimeError(f"compress: no weights for {missing[:4]}")
    merged = {k: (state[k] if k in state else own[k]) for k in own}
    model.load_state_dict(merged, strict=True)
    return model.eval()


def _is_buffer(model: nn.Module, key: str) -> bool:
    return key in dict(model.named_buffers())


def block_items(state: dict[str, torch.Tensor]):
    """(layer, name inside the block, key, tensor) of every block tensor."""
    for key, tensor in state.items():
        match = BLOCK_KEY.match(key)
        if match:
            yield int(match.group(1)), match.group(2), key, tensor


def config_with(cfg: ModelConfig, **changes) -> ModelConfig:
    """``cfg.replace`` that also pins head_dim and ffn_hidden, which default to multiples of d_model."""
    pinned = {"head_dim": cfg.resolved_head_dim, "ffn_hidden": cfg.resolved_ffn_hidden}
    pinned.update(changes)
    new = cfg.replace(**pinned)
    if new.head_dim is not None and new.d_model // new.n_heads == new.head_dim and new.d_model % new.n_heads == 0:
        new = new.replace(head_dim=None)  # the default already gives it: keep the config plain
    return new


__all__ = ["state_of", "rebuild", "block_items", "config_with", "READS_RESIDUAL", "WRITES_RESIDUAL"]
