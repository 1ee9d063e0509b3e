"""quantize_model: swap the model's nn.Linear modules for QuantizedLinear ones (in place)."""
from __future__ import annotations

from torch import nn

from ..config import ConfigError
from ..model.weights import mark_like
from .modules import GROUPED, SCHEMES, QuantizedLinear

DEFAULT_SKIP = ("lm_head", "embed")
QUANTIZATION_ATTR = "quantization"  # the settings, kept on the model for save_quantized


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A module is left in float when any ``skip`` word occurs in its qualified name."""
    return any(word and word in name for word in skip)


def _targets(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules to quantize. A head tied to the token embedding keeps sharing it
    (embeddings are not quantized), whatever ``skip`` says."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and not skipped(name, skip) and id(m.weight) not in embedding_weights]


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
    if not targets:
        raise ConfigError(f"no nn.Linear left to quantize (skip: {', '.join(skip) or 'nothing'})")
    for name, m in targets:
        if scheme in GROUPED and m.in_features % group_size:
            raise ConfigError(f"group size {group_size} does not divide the input width {m.in_features} of {name}; "
                              "pick a divisor (e.g. 32 or 64) or --skip that module")
    return targets


DEFAULT_GROUP = 64


def quantize_model(model: nn.Module, scheme: str = "int8", group_size: int | None = None,
                   skip: tuple[str, ...] | list[str] = DEFAULT_SKIP) -> nn.Module:
    """Replace every nn.Linear (except names containing a ``skip`` word and a tied head) with a
    frozen :class:`QuantizedLinear`; residual-projection marks are carried over. Returns ``model``.
    ``group_size`` applies to nf4/int4 (default 64); int8 is per output row and refuses one."""
    skip = tuple(skip)
    if scheme in GROUPED and group_size is None:
        group_size = DEFAULT_GROUP
    targets = check_request(model, scheme, group_size, skip)
    modules = dict(model.named_modules())
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, mark_like(QuantizedLinear.from_linear(linear, scheme, group_size), linear))
    setattr(model, QUANTIZATION_ATTR, {"scheme": scheme, "group_size": group_size, "skip": list(skip),
                                       "modules": [name for name, _ in targets]})
    return model


def quantization_of(model: nn.Module) -> dict | None:
    """The settings :func:`quantize_model` recorded on ``model``, or None for a float model."""
    return getattr(model, QUANTIZATION_ATTR, None)


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
