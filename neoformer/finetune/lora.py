"""LoRA (Hu et al. 2021) as a module swap: a chosen linear layer ``W`` becomes ``LoraLinear``,

    y = W x + scaling * B A dropout(x),   A (r, in) ~ Kaiming-uniform, B (out, r) = 0,
    scaling = alpha / r   (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r))

so a fresh adapter leaves the model's outputs unchanged. DoRA (Liu et al. 2024, ``dora=True``) also
learns each output row's magnitude ``m`` (``lora_magnitude_vector``, initialised to the row norms):

    W' = m / ||W + scaling B A||_row * (W + scaling B A),   the norm detached from the graph (DoRA 4.3)

computed as peft does, ``(m/n - 1) * W x + m/n * scaling * B A x`` on top of the base output. The wrapped layer is kept as
``base_layer`` (peft's name) and frozen; it may be anything with ``in_features``,
``out_features`` and ``forward`` (a quantized linear also exposes ``dequantize()``, which
QLoRA's merge uses). The adapter's tensors are named ``<layer>.lora_A.weight`` /
``<layer>.lora_B.weight`` as in peft.

Targets are named by the role of a projection: ``q k v o`` (attention, self and cross), ``gate up
down`` (FFN, MoE experts included) or ``all-linear`` (every linear layer but the output head, as
peft's ``all-linear``). A fused QKV projection (``fused_qkv=True``) gets one LoRA whose B writes
only the output rows of the chosen slices (``q,v`` adapts the Q and V rows of ``qkv``, not K).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..model.weights import mark_like

# target role -> the attribute name of that projection in neoformer's blocks (model/attention.py, model/ffn.py)
TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate", "up": "up",
                  "down": "down"}
ALL_LINEAR = "all-linear"
FUSED_QKV = "qkv"
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoraConfig:
    """What an adapter is: rank, scale, dropout, which layers, and the scaling rule."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS  # roles (TARGET_MODULES) or ("all-linear",)
    rslora: bool = False  # scaling alpha / sqrt(r) (rank-stabilised LoRA)
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output row

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r ({self.r!r}) must be a positive integer")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora alpha ({self.alpha!r}) must be a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout ({self.dropout!r}) must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGET_MODULES and t != ALL_LINEAR]
        if unknown or not self.targets or (ALL_LINEAR in self.targets and len(self.targets) > 1):
            raise ConfigError(f"--targets {','.join(self.targets) or '(empty)'}: use a comma list of "
                              f"{','.join(TARGET_MODULES)} or {ALL_LINEAR}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @classmethod
    def parse(cls, spec: str | None = None, targets: str | None = None, **extra) -> "LoraConfig":
        """From the CLI: ``--lora r=16,alpha=32,dropout=0.05,rslora=true,dora=true`` and ``--targets q,v``."""
        values: dict[str, Any] = dict(extra)
        names = {f.name for f in fields(cls)} - {"targets"}
        for item in filter(None, (spec or "").split(",")):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ConfigError(f"--lora {spec!r}: expected key=value pairs with keys {', '.join(sorted(names))}")
            try:
                values[key] = {"r": int, "alpha": float, "dropout": float}.get(key, _boolean)(value.strip())
            except ValueError:
                raise ConfigError(f"--lora {key}={value!r} is not a valid {key}") from None
        if targets:
            values["targets"] = tuple(t.strip() for t in targets.split(",") if t.strip())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


class LoraFactor(nn.Module):
    """One LoRA matrix (``.weight``). Not an nn.Linear on purpose: weight init and nGPT
    renormalisation (model/weights.py) find matrices by ``isinstance(m, nn.Linear)`` and must
    leave the adapter alone."""

    def __init__(self, out_features: int, in_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _reference_tensor(module: nn.Module) -> torch.Tensor | None:
    return next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)


class LoraLinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` (DoRA: rescaled per row, see the
    module docstring); ``rows`` limits B's output (and DoRA's magnitudes) to those rows of the base
    output (the chosen slices of a fused QKV projection)."""

    def __init__(self, base: nn.Module, config: LoraConfig, rows: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.scaling = config.r, config.scaling
        ref = _reference_tensor(base)
        # a quantized base stores integer codes: the adapter then trains in float32
        dtype = ref.dtype if ref is not None and ref.dtype != torch.float16 else torch.float32
        device = ref.device if ref is not None else None
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_A = LoraFactor(config.r, self.in_features, device, dtype)
        self.lora_B = LoraFactor(self.out_features if rows is None else len(rows), config.r, device, dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's init; B stays zero
        self.register_buffer("lora_rows", None if rows is None else rows.to(device), persistent=False)
        self.lora_magnitude_vector = None  # DoRA: one magnitude per adapted output row
        if config.dora:
            with torch.no_grad():
                norm = self._adapted_norm(self._adapted_base_weight().to(dtype))
            self.lora_magnitude_vector = nn.Parameter(norm)
        mark_like(self, base)

    def _adapted_base_weight(self) -> torch.Tensor:
        """The base weight's rows this adapter writes (all, or the chosen fused-QKV slices)."""
        weight = self.base_weight()
        return weight if self.lora_rows is None else weight.index_select(0, self.lora_rows)

    def _adapted_norm(self, base_rows: torch.Tensor) -> torch.Tensor:
        """||W + scaling B A|| per adapted row (DoRA), in the adapter's dtype."""
        lora_weight = self.lora_B.weight @ self.lora_A.weight
        return torch.linalg.norm(base_rows + self.scaling * lora_weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        adapter_dtype = self.lora_A.weight.dtype
        h = self.lora_dropout(x.to(adapter_dtype))
        delta = self.lora_B(self.lora_A(h)) * self.scaling
        if self.lora_magnitude_vector is not None:
            delta = self._dora_delta(out, h, delta)
        if self.lora_rows is None:
            return out + delta.to(out.dtype)
        return out.index_add(-1, self.lora_rows, delta.to(out.dtype))

    def _dora_delta(self, out: torch.Tensor, h: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output: ``(m/n - 1) W h + m/n * lora`` (peft's formula)."""
        base_rows = self._adapted_base_weight().to(lora.dtype)
        scale = self.lora_magnitude_vector / self._adapted_norm(base_rows).detach()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = out if self.lora_rows is None else out.index_select(-1, self.lora_rows)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base_out = base_out - (bias if self.lora_rows is None else bias.index_select(0, self.lora_rows))
            base_out = base_out.to(lora.dtype)
        else:  # the base term sees the same dropped-out input as the adapter
            base_out = F.linear(h, base_rows)
        return (scale - 1) * base_out + scale * lora

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A as a full (out, in) matrix, in the adapter's dtype."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        if self.lora_rows is None:
            return delta
        full = delta.new_zeros(self.out_features, self.in_features)
        return full.index_add(0, self.lora_rows, delta)

    def base_weight(self) -> torch.Tensor:
        base = self.base_layer
        if hasattr(base, "dequantize"):
            return base.dequantize()
        return base.weight

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scaling * B A (a quantized base is dequantized first)."""
        weight = self.base_weight()
        compute = torch.promote_types(weight.dtype, torch.float32)
        merged_weight = weight.to(compute) + self.delta_weight().to(compute)
        if self.lora_magnitude_vector is not None:  # DoRA: each adapted row rescaled to its magnitude
            rows = self.lora_rows if self.lora_rows is not None else torch.arange(self.out_features,
                                                                                  device=merged_weight.device)
            adapted = merged_weight.index_select(0, rows)
            scale = self.lora_magnitude_vector.to(compute) / torch.linalg.norm(adapted, dim=1)
            merged_weight = merged_weight.index_copy(0, rows, adapted * scale[:, None])
        bias = getattr(self.base_layer, "bias", None)
        dtype = weight.dtype if weight.is_floating_point() else self.lora_A.weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                           dtype=dtype)
        linear.weight.copy_(merged_weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return mark_like(linear, self.base_layer)


def _is_linear(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap: nn.Linear, or a replacement (quantized) with the same contract."""
    if isinstance(module, LoraLinear):
        return False
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "dequantize"))


def _fused_rows(attention: nn.Module, roles: set[str]) -> torch.Tensor | None:
    """Output rows of a fused [q | k | v] projection that the chosen roles adapt (None: all)."""
    q_dim = attention.n_heads * attention.head_dim
    kv_dim = attention.n_kv_heads * attention.head_dim
    spans = {"q": (0, q_dim), "k": (q_dim, q_dim + kv_dim), "v": (q_dim + kv_dim, q_dim + 2 * kv_dim)}
    chosen = [spans[role] for role in "qkv" if role in roles]
    if len(chosen) == 3:
        return None
    return torch.cat([torch.arange(start, end) for start, end in chosen]) if chosen else torch.empty(0, dtype=torch.long)


def find_targets(model: nn.Module, config: LoraConfig) -> Iterator[tuple[str, nn.Module, str, torch.Tensor | None]]:
    """(qualified name, parent, attribute, rows) of every layer ``config.targets`` selects."""
    head = getattr(model, "lm_head", None)
    roles = set(config.targets)
    wanted = {TARGET_MODULES[role] for role in roles if role in TARGET_MODULES}
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, LoraLinear):
            continue
        for attribute, child in list(parent.named_children()):
            name = f"{parent_name}.{attribute}" if parent_name else attribute
            if not _is_linear(child) or child is head:
                continue
            if ALL_LINEAR in roles:
                yield name, parent, attribute, None
            elif attribute == FUSED_QKV and roles & {"q", "k", "v"} and hasattr(parent, "n_kv_heads"):
                yield name, parent, attribute, _fused_rows(parent, roles)
            elif attribute in wanted:
                yield name, parent, attribute, None


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze ``model`` and swap LoRA into the target layers (in place); returns their names."""
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = []
    for name, parent, attribute, rows in find_targets(model, config):
        layer = LoraLinear(getattr(parent, attribute), config, rows)
        setattr(parent, attribute, layer.train(parent.training))  # a new module would be in train mode
        wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"--targets {','.join(config.targets)} matches no linear layer of this model")
    return wrapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<layer>.lora_A.weight": param, ...}`` (and DoRA's ``<layer>.lora_magnitude_vector``):
    the adapter, named inside ``model``."""
    params = {}
    for name, layer in lora_layers(model):
        params[f"{name}.lora_A.weight"] = layer.lora_A.weight
        params[f"{name}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            params[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    return params


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into a plain nn.Linear, in place: the model no longer holds an adapter."""
    for name, layer in list(lora_layers(model)):
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, layer.merged())
    return model


__all__ = ["LoraConfig", "LoraLinear", "LoraFactor", "TARGET_MODULES", "ALL_LINEAR", "DEFAULT_TARGETS", "add_lora",
           "find_targets", "lora_layers", "adapter_parameters", "merge_lora"]
