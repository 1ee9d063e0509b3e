"""Embeddings and fill-mask: the code behind /v1/embeddings, `neoformer embed` and `neoformer fill-mask`.

Pooling: ``mean`` (over real tokens), ``cls`` (the first token, BERT style) or ``last`` (the last
real token, the usual choice for a causal decoder whose last position has read everything).
Encoders default to mean, decoders to last; ``normalize`` scales vectors to unit length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kinds import get as model_kind

POOLINGS = ("mean", "cls", "last")


def default_pooling(model) -> str:
    return "mean" if not model_kind(model).causal or model_kind(model).encoder_layers else "last"


def _hidden(model, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded ids -> (B, T, D) final hidden states of the model's main stack."""
    kind = model_kind(model)
    if not kind.cache.generates or kind.cache.cross_attention:  # encoders; encoder-decoders embed with the encoder
        return model.encode(ids, keep.long())
    return model.forward_hidden(ids, attention_mask=keep.long(), use_cache=False).hidden


@torch.inference_mode()
def embed(model, prompts: list[list[int]], pooling: str | None = None, normalize: bool = True,
          batch_size: int = 16) -> list[list[float]]:
    """One vector per token list."""
    pooling = pooling or default_pooling(model)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling ({pooling!r}) must be one of: {', '.join(POOLINGS)}")
    if model_kind(model).causal and not model_kind(model).encoder_layers and pooling == "cls":
        raise ValueError("cls pooling needs a bidirectional encoder; a causal decoder's first token has read "
                         "only itself (use last or mean)")
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start:start + batch_size]
        T = max(len(p) for p in group)
        ids = torch.zeros(len(group), T, dtype=torch.long, device=device)
        keep = torch.zeros(len(group), T, dtype=torch.bool, device=device)
        for row, p in enumerate(group):
            ids[row, :len(p)] = torch.tensor(p, device=device)
            keep[row, :len(p)] = True
        hidden = _hidden(model, ids, keep).float()
        if pooling == "mean":
            vectors = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        elif pooling == "cls":
            vectors = hidden[:, 0]
        else:
            vectors = hidden[torch.arange(len(group), device=device), keep.sum(1) - 1]
        if normalize:
            vectors = F.normalize(vectors, dim=-1)
        out.extend(vectors.tolist())
    return out


def encode_with_mask(tokenizer, text: str, mask: str = "<mask>") -> list[int]:
    """Token ids of text where every literal ``mask`` string becomes the tokenizer's mask id
    (works for every tokenizer, whether or not it parses the mask string itself)."""
    if getattr(tokenizer, "mask_id", None) is None:
        raise ValueError("this tokenizer has no mask token; fill-mask needs a model trained with masked-LM")
    if mask not in text:
        raise ValueError(f"the text has no {mask}; write it where the model should fill in a word")
    ids: list[int] = []
    for i, piece in enumerate(text.split(mask)):
        if i:
            ids.append(tokenizer.mask_id)
        if piece:
            ids.extend(tokenizer.encode(piece))
    return ids


@torch.inference_mode()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[dict]]:
    """For every mask in text, the top_k fillers: [{"token", "id", "score"(probability), "sequence"}]."""
    if model_kind(model).causal:
        raise ValueError("fill-mask needs a bidirectional encoder (masked-LM) checkpoint")
    ids = encode_with_mask(tokenizer, text)
    if len(ids) > model.config.max_seq_len:
        raise ValueError(f"the text is {len(ids)} tokens; the model takes at most {model.config.max_seq_len}")
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0].float()
    results = []
    for pos in [i for i, t in enumerate(ids) if t == tokenizer.mask_id]:
        probs = logits[pos].softmax(-1)
        values, top = probs.topk(min(top_k, probs.numel()))
        fillers = []
        for value, tok in zip(values.tolist(), top.tolist()):
            filled = list(ids)
            filled[pos] = tok
            fillers.append({"token": tokenizer.decode([tok]), "id": tok, "score": value,
                            "sequence": tokenizer.decode(filled)})
        results.append(fillers)
    return results
