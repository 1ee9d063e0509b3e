"""quantize_model: swap the model's nn.Linear modules for QuantizedLinear ones (in place)."""
from __future__ import annotations

from torch import nn

from ..config import ConfigError
from ..model.weights import mark_like
from .embedding import QuantizedEmbedding
from .modules import GROUPED, SCHEMES, QuantizedLinear

DEFAULT_SKIP = ("lm_head", "embed")
QUANTIZATION_ATTR = "quantization"  # the settings, kept on the model for save_quantized


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A module is left in float when any ``skip`` word occurs in its qualified name."""
    return any(word and word in name for word in skip)


def _targets(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules to quantize on their own. A head tied to the token embedding follows the
    embedding (see :func:`tied_heads`), whatever ``skip`` says."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and not skipped(name, skip) and id(m.weight) not in embedding_weights]


def embedding_targets(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Embedding]]:
    """The token embeddings (nn.Embedding with one row per vocabulary entry) to quantize: those whose
    name no ``skip`` word matches (the default skip word ``embed`` keeps them float)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Embedding and m.num_embeddings == vocab and not skipped(name, skip)]


def tied_heads(model: nn.Module, embedding: nn.Embedding) -> list[str]:
    """Names of the nn.Linear modules sharing ``embedding``'s weight (a tied LM head)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m.weight is embedding.weight]


def check_request(model: nn.Module, scheme: str, group_size: int | None, skip: tuple[str, ...]) -> list:
    """The modules to quantize, or one ConfigError line saying why the request cannot be done."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    if quantization_of(model) is not None:
        raise ConfigError(f"the model is already quantized ({quantization_of(model)['scheme']}); "
                          "quantize the float checkpoint it came from")
    if scheme not in GROUPED and group_size is not None:
        raise ConfigError(f"{scheme} scales each output row; a group size applies to {' and '.join(GROUPED)} only")
    if scheme in GROUPED and (group_size is None or group_size < 2 or group_size % 2):
        raise ConfigError(f"group size ({group_size}) must be an even integer >= 2 (64 or 128 are usual)")
    targets = _targets(model, skip)
    embeddings = embedding_targets(model, skip)
    if not targets and not embeddings:
        raise ConfigError(f"no nn.Linear left to quantize (skip: {', '.join(skip) or 'nothing'})")
    widths = [(name, m.in_features) for name, m in targets] + [(name, m.embedding_dim) for name, m in embeddings]
    for name, width in widths:
        if scheme in GROUPED and width % group_size:
            raise ConfigError(f"group size {group_size} does not divide the input width {width} of {name}; "
                              "pick a divisor (e.g. 32 or 64) or --skip that module")
    return targets


DEFAULT_GROUP = 64


def quantize_model(model: nn.Module, scheme: str = "int8", group_size: int | None = None,
                   skip: tuple[str, ...] | list[str] = DEFAULT_SKIP) -> nn.Module:
    """Replace every nn.Linear (except names containing a ``skip`` word and a tied head) with a
    frozen :class:`QuantizedLinear`, and, unless ``skip`` has a word of their name (``embed`` does),
    the token embeddings with a :class:`QuantizedEmbedding` (a head tied to one then shares its
    packed tensors). Residual-projection marks are carried over. Returns ``model``.
    ``group_size`` applies to nf4/int4 (default 64); int8 is per output row and refuses one."""
    skip = tuple(skip)
    if scheme in GROUPED and group_size is None:
        group_size = DEFAULT_GROUP
    targets = check_request(model, scheme, group_size, skip)
    embeddings, tied = embedding_targets(model, skip), {}
    for name, embedding in embeddings:
        quantized = QuantizedEmbedding.from_embedding(embedding, scheme, group_size)
        for head in tied_heads(model, embedding):
            replace_module(model, head, tied_head(quantized, model.get_submodule(head)))
            tied[head] = name
        replace_module(model, name, quantized)
    for name, linear in targets:
        replace_module(model, name, mark_like(QuantizedLinear.from_linear(linear, scheme, group_size), linear))
    settings = {"scheme": scheme, "group_size": group_size, "skip": list(skip), "modules": [name for name, _ in targets]}
    if embeddings:  # only then: a checkpoint without quantized embeddings reads as before
        settings.update(embeddings=[name for name, _ in embeddings], tied=tied)
    setattr(model, QUANTIZATION_ATTR, settings)
    return model


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def tied_head(embedding: QuantizedEmbedding, head: nn.Linear) -> QuantizedLinear:
    """A QuantizedLinear over the same stored tensors as ``embedding`` (so the checkpoint stores them once)."""
    quantized = QuantizedLinear(embedding.scheme, embedding.embedding_dim, embedding.num_embeddings, embedding.stored(),
                                embedding.group_size)
    quantized.shares_storage = True
    return mark_like(quantized, head)


def quantization_of(model: nn.Module) -> dict | None:
    """The settings :func:`quantize_model` recorded on ``model``, or None for a float model."""
    return getattr(model, QUANTIZATION_ATTR, None)


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantized_embeddings(model: nn.Module) -> dict[str, QuantizedEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
