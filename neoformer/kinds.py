"""Model kinds: everything that differs between a decoder, an encoder and an encoder-decoder.

torchtitan's ``TrainSpec`` idea. Each kind registers, in one :class:`ModelKind`, its model class,
default objective, batch builders (train and eval), sample printer, cache layout, the methods
that run a forward outside ``__call__``, and the structural facts the config check and the
planner need. Every other module asks the registry (``kinds.get(cfg.kind).causal``) instead of
comparing the kind as a string, so adding a kind means one ``register(...)`` plus its model class
(docs/architecture.md, "Adding a model kind"; tests/test_kinds.py adds a toy kind that way).

Code is named as ``"module:attribute"`` strings and imported on first use (:meth:`ModelKind.load`),
so ``import neoformer.kinds`` imports neither torch nor the train/generate packages, and nothing
cycles. A registration may also hold the object itself (a test's toy model class).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .config import ConfigError


class UnknownKindError(ConfigError):
    """A model kind that nobody registered."""


@dataclass(frozen=True)
class CacheLayout:
    """Which layers keep state while generating (the planner's KV-cache figure and ``generate``)."""

    self_attention: str | None  # attribute of the model's BlockStack whose layers keep a K/V cache; None: no cache
    cross_attention: bool = False  # those layers also attend to an encoder output (K/V computed once per source)

    @property
    def generates(self) -> bool:
        return self.self_attention is not None


@dataclass(frozen=True)
class ModelKind:
    """One model kind. Callables are ``"module:attribute"`` strings (or the objects themselves):

    * ``model_class(cfg)`` -> the nn.Module (``build_model``, the planner's meta-device tree)
    * ``objective(model, batch) -> (loss, stats)`` (neoformer.train.objectives)
    * ``train_data(run, tokenizer_spec) -> TaskData``: tokenizer plus train/val batch sources
    * ``eval_batches(run, tokenizer, split) -> () -> batches`` (`neoformer eval`)
    * ``sample_printer(model, task, run)``: what `neoformer train` prints at the end
    """

    name: str
    model_class: Any
    objective: Any
    train_data: Any
    eval_batches: Any
    sample_printer: Any
    cache: CacheLayout
    # training-forward methods called without ``__call__``: DDP/FSDP route them through their hooks
    forward_methods: tuple[str, ...] = ()
    compiled_decode: bool = False  # generate(compile=True) compiles its one-token decode step
    causal: bool = True  # attention looks only backwards (the model's main stack)
    encoder_layers: bool = False  # has a separate encoder stack of ``n_encoder_layers``
    memory_layer: bool = False  # takes the NeoFormer-X memory layer (rmc / nsb)
    description: str = ""

    def load(self, field: str) -> Any:
        """The object a field names, imported on first use."""
        ref = getattr(self, field)
        if not isinstance(ref, str):
            return ref
        module, _, attribute = ref.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def build(self, cfg) -> Any:
        """The model of this kind for ``cfg`` (on the current default device)."""
        return self.load("model_class")(cfg)


_REGISTRY: dict[str, ModelKind] = {}


def register(kind: ModelKind, *, replace: bool = False) -> ModelKind:
    """Add a kind (``replace=True`` to redefine one); returns it."""
    if kind.name in _REGISTRY and not replace:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names(*, generating: bool = False) -> tuple[str, ...]:
    """Registered kind names (``generating=True``: only kinds that can generate, for `neoformer generate`)."""
    return tuple(name for name, kind in _REGISTRY.items() if kind.cache.generates or not generating)


def get(which: Any) -> ModelKind:
    """The kind of a name, a ModelConfig, a run config or a model (anything with ``.kind``,
    ``.model.kind`` or ``.config.kind``). Unknown -> one :class:`UnknownKindError` line."""
    name = which
    for path in (("config", "kind"), ("model", "kind"), ("kind",)):
        obj = which
        for attribute in path:
            obj = getattr(obj, attribute, None)
        if isinstance(obj, str):
            name = obj
            break
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownKindError(f"kind ({name!r}) must be one of: {', '.join(_REGISTRY)} (the registered model kinds)")
    return _REGISTRY[name]


_BATCHES, _SAMPLING, _OBJECTIVES = "neoformer.train.batches", "neoformer.train.sampling", "neoformer.train.objectives"

register(ModelKind(
    name="decoder", description="decoder-only causal LM (GPT, Llama, NeoFormer-X)",
    model_class="neoformer.model.transformer:DecoderLM", objective=f"{_OBJECTIVES}:causal_lm",
    train_data=f"{_BATCHES}:causal_lm_data", eval_batches=f"{_BATCHES}:causal_lm_eval_batches",
    sample_printer=f"{_SAMPLING}:print_continuations", cache=CacheLayout("decoder"),
    forward_methods=("loss",),  # DecoderLM.loss runs forward_hidden directly
    compiled_decode=True, memory_layer=True))
register(ModelKind(
    name="encoder", description="bidirectional encoder with a masked-LM head (BERT, NeoBERT)",
    model_class="neoformer.model.transformer:EncoderMLM", objective=f"{_OBJECTIVES}:masked_lm",
    train_data=f"{_BATCHES}:masked_lm_data", eval_batches=f"{_BATCHES}:masked_lm_eval_batches",
    sample_printer=f"{_SAMPLING}:print_mlm_accuracy", cache=CacheLayout(None), causal=False))
register(ModelKind(
    name="encoder_decoder", description="encoder-decoder seq2seq Transformer (Vaswani et al. 2017)",
    model_class="neoformer.model.transformer:EncoderDecoderLM", objective=f"{_OBJECTIVES}:seq2seq",
    train_data=f"{_BATCHES}:seq2seq_data", eval_batches=f"{_BATCHES}:seq2seq_eval_batches",
    sample_printer=f"{_SAMPLING}:print_translations", cache=CacheLayout("decoder", cross_attention=True),
    encoder_layers=True))

__all__ = ["ModelKind", "CacheLayout", "UnknownKindError", "register", "unregister", "names", "get"]
