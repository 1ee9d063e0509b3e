"""Run configuration: what to train (model), how (train), on what (data, tokenizer).

A run config is YAML (``configs/*.yaml``) with four sections plus an optional preset::

    preset: neoformer-x-125m        # model preset; ``model:`` fields override it
    model: {n_layers: 6}
    train: {lr: 3.0e-4, max_steps: 2000, batch_size: 16, seq_len: 256}
    data: {source: stdlib}
    tokenizer: {kind: bpe, vocab_size: 8192}

Command-line overrides use dotted names: ``--model.n_layers 6 --train.lr 3e-4``. Every field is
validated when the config is built, with one line that names the field. Configs are immutable:
change one with ``dataclasses.replace`` (or its ``.replace``). Every field: docs/config.md.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig, check_field_names, coerce_value, did_you_mean, require_finite
from ..presets import PRESETS, get_preset, run_defaults

OPTIMIZERS = ("adamw", "lion", "muon")  # muon: Muon for the blocks' matrices + AdamW for the rest
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
SAMPLERS = ("shuffle", "random")
SEQ2SEQ_TASKS = ("next_line", "reverse")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Steps are optimizer steps; one step sees ``batch_size * grad_accum`` sequences."""

    # optimizer (Loshchilov & Hutter 2019 AdamW; Chen et al. 2023 Lion)
    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr: float | None = None  # cosine floor; None = lr / 10
    warmup_steps: int | None = None  # None = min(100, max_steps // 10)
    weight_decay: float = 0.1  # on matrices only; norms, biases and gains are never decayed
    beta1: float = 0.9
    beta2: float = 0.95  # Lion: 0.99 is the paper's choice
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # length of the run: the first limit reached stops it
    max_steps: int = 1000
    time_budget: float | None = None  # seconds of training; the cosine then follows wall time too
    budget_across_resumes: bool = False  # False: a resumed run gets the whole time_budget again
    max_tokens: int | None = None  # training tokens (seed 000's --max_tokens)
    # batches
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int | None = None  # None = model max_seq_len (capped at 1024)
    grad_accum: int = 1  # micro-batches per optimizer step
    sampler: str = "shuffle"  # shuffle = epochs over windows; random = nanoGPT random offsets
    # numerics and speed
    precision: str = "auto"  # auto = bf16 (fp16 + GradScaler without bf16) on CUDA; CPU: bf16 if native, else fp32
    compile: bool = False  # torch.compile the objective (20-30 s cold start on CPU)
    gradient_checkpointing: bool = False
    device: str = "auto"
    threads: int | str | None = None  # torch intra-op threads; None = torch's; "auto" = tune on CPU (see fit)
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on GPU too)
    seed: int = 0
    # NeoFormer-X recursive memory: M += rmc_lr * mean(delta) after each optimizer step
    rmc_lr: float = 0.01
    # evaluation, logging, checkpoints
    eval_every: int = 200  # steps; 0 = only at the end
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 500  # steps; 0 = only at the end (and on interrupt)
    keep_last: int = 3
    progress: bool = True  # tqdm bar (stderr)
    samples: int = 0  # text samples generated at the end of `neoformer train`
    sample_tokens: int = 120
    plot: bool = True  # loss-curve PNG at the end (needs matplotlib)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(*names: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            for name in names:
                value = getattr(self, name)
                if value is None and allow_none:
                    continue
                low = 0 if allow_zero else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    kind = "a non-negative" if allow_zero else "a positive"
                    raise ConfigError(f"train.{name} ({value!r}) must be {kind} integer")

        def choice(name: str, allowed) -> None:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} ({getattr(self, name)!r}) must be one of: {', '.join(allowed)}")

        require_finite(self, ("lr", "min_lr", "eps", "beta1", "beta2", "weight_decay", "grad_clip", "rmc_lr",
                              "time_budget"), "train.")
        choice("optimizer", OPTIMIZERS)
        choice("precision", PRECISIONS)
        choice("device", DEVICES)
        choice("sampler", SAMPLERS)
        positive("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every", "keep_last")
        positive("seq_len", "max_tokens", allow_none=True)
        if self.threads != "auto":
            positive("threads", allow_none=True)
        positive("warmup_steps", allow_none=True, allow_zero=True)
        positive("eval_every", "save_every", "samples", "sample_tokens", allow_zero=True)
        for name in ("lr", "eps"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} ({getattr(self, name)!r}) must be a positive number")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must be in [0, lr={self.lr}]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} ({getattr(self, name)}) must be in [0, 1)")
        for name in ("weight_decay", "grad_clip", "rmc_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} ({getattr(self, name)}) must be >= 0")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ConfigError(f"train.time_budget ({self.time_budget}) must be a positive number of seconds")

    @property
    def warmup(self) -> int:
        return min(100, self.max_steps // 10) if self.warmup_steps is None else self.warmup_steps

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**_checked_fields(cls, data, "train"))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        check_field_names(TrainConfig, changes, "train")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from. ``source``: ``stdlib`` (embedded offline corpus), a file,
    directory or glob (text, .jsonl, .parquet), ``hf:NAME``, or a seq2seq pair file (.tsv / .jsonl)."""

    source: str = "stdlib"
    val_fraction: float = 0.02
    text_field: str = "text"
    cache_dir: str | None = None
    mask_prob: float = 0.15  # MLM (kind=encoder)
    seq2seq_task: str = "next_line"  # synthetic pairs from plain text: next_line | reverse
    max_pairs: int = 200_000  # seq2seq: pairs kept from a corpus

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction ({self.val_fraction}) must be in [0, 1)")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"data.mask_prob ({self.mask_prob}) must be in (0, 1)")
        if self.seq2seq_task not in SEQ2SEQ_TASKS:
            raise ConfigError(f"data.seq2seq_task ({self.seq2seq_task!r}) must be one of: {', '.join(SEQ2SEQ_TASKS)}")
        if self.max_pairs < 1:
            raise ConfigError(f"data.max_pairs ({self.max_pairs}) must be positive")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        return cls(**_checked_fields(cls, data, "data"))


@dataclass(frozen=True)
class TokenizerConfig:
    """``kind``: bpe | char | sentencepiece (trained on the train split), or a saved tokenizer /
    tokenizer.json / .model / .tiktoken path, or cl100k_base / gpt2 (from a local cache).
    ``vocab_size`` None = the model's vocab_size."""

    kind: str = "bpe"
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.vocab_size is not None and (
                isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 2):
            raise ConfigError(f"tokenizer.vocab_size ({self.vocab_size!r}) must be an integer >= 2")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        return cls(**_checked_fields(cls, data, "tokenizer"))


def _checked_fields(cls, data: dict[str, Any], section: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{section} section must be a mapping, got {type(data).__name__}")
    check_field_names(cls, data, section)
    types = {f.name: str(f.type) for f in fields(cls)}
    out = {}
    for key, value in data.items():
        numeric = "float" in types[key] or "int" in types[key]
        out[key] = coerce_value(value) if numeric else value  # YAML reads 3e-4 as a string
    return out


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "tokenizer": TokenizerConfig}


@dataclass(frozen=True)
class RunConfig:
    """Everything a `neoformer train` run needs; saved in every checkpoint's config.json."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.train.seq_len is not None and self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len ({self.train.seq_len}) is longer than the model's max_seq_len "
                              f"({self.model.max_seq_len}); lower --seq or raise --model.max_seq_len")

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model.to_dict(), "train": self.train.to_dict(),
                "data": dataclasses.asdict(self.data), "tokenizer": dataclasses.asdict(self.tokenizer)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: dict[str, Any] | None = None) -> "RunConfig":
        """Build from a YAML-like mapping plus ``{"train.lr": 1e-3, ...}`` overrides (validated once)."""
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
        for key in data:
            if key != "preset" and key not in SECTIONS:
                raise ConfigError(f"unknown config section {key!r}{did_you_mean(key, ['preset', *SECTIONS])}")
            if key != "preset" and data[key] is not None and not isinstance(data[key], dict):
                raise ConfigError(f"config section {key!r} must be a mapping of field: value, "
                                  f"not {type(data[key]).__name__} ({data[key]!r:.40})")
        for dotted, value in (overrides or {}).items():
            section, _, name = dotted.partition(".")
            if section == "preset" and not name:
                data["preset"] = value
                continue
            if section not in SECTIONS or not name:
                raise ConfigError(f"override {dotted!r} must look like model.X, train.X, data.X or tokenizer.X")
            data.setdefault(section, {})
            if data[section] is None:
                data[section] = {}
            data[section][name] = value
        preset = data.get("preset")
        model_fields = dict(data.get("model") or {})
        if preset:
            base = get_preset(preset).to_dict()
            base.update(model_fields)
            model_fields = base
            defaults = run_defaults(preset)  # shown by `neoformer info PRESET` and the train header
            train_fields = {**defaults.get("train", {}), **(data.get("train") or {})}
            tok_fields = {**defaults.get("tokenizer", {}), **(data.get("tokenizer") or {})}
        else:
            train_fields, tok_fields = dict(data.get("train") or {}), dict(data.get("tokenizer") or {})
        return cls(model=ModelConfig.from_dict(model_fields), train=TrainConfig.from_dict(train_fields),
                   data=DataConfig.from_dict(dict(data.get("data") or {})),
                   tokenizer=TokenizerConfig.from_dict(tok_fields), preset=preset)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or min(self.model.max_seq_len, 1024)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; a run config is YAML") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with sections preset/model/train/data/tokenizer")
    return data


def load_run_config(path: str | Path | None = None, preset: str | None = None,
                    overrides: dict[str, Any] | None = None) -> RunConfig:
    """A run config from a YAML file and/or a preset name, plus dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    if preset is not None:
        data["preset"] = preset
    if not data.get("preset") and not data.get("model"):
        raise ConfigError("pass --preset NAME or --config FILE (a YAML with a preset or a model section)")
    return RunConfig.from_dict(data, overrides)


# ---- command-line overrides: every field of every section as a hidden --SECTION.FIELD option -------
_OVERRIDE_DEST = "override:"


def add_override_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--model.n_layers VALUE``, ``--train.lr VALUE``, ... (hidden from --help) to ``parser``."""
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            parser.add_argument(f"--{section}.{f.name}", dest=f"{_OVERRIDE_DEST}{section}.{f.name}",
                                default=argparse.SUPPRESS, metavar="VALUE", help=argparse.SUPPRESS)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--SECTION.FIELD`` values given to a parser built with :func:`add_override_flags`, typed."""
    return {key[len(_OVERRIDE_DEST):]: coerce_value(value) for key, value in vars(args).items()
            if key.startswith(_OVERRIDE_DEST)}


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["--train.lr", "3e-4", "--model.rmc=false"]`` -> ``{"train.lr": 0.0003, "model.rmc": False}``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    add_override_flags(parser)
    try:
        args, unknown = parser.parse_known_args(tokens)
    except argparse.ArgumentError as err:
        raise ConfigError(f"override {err.argument_name}: {err.message}") from None
    if unknown:
        raise ConfigError(f"unrecognised argument {unknown[0]!r}; overrides look like --train.lr 3e-4 "
                          "(a field of model, train, data or tokenizer)")
    return overrides_from_args(args)


def dump_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["TrainConfig", "DataConfig", "TokenizerConfig", "RunConfig", "SECTIONS", "load_run_config",
           "add_override_flags", "overrides_from_args", "parse_overrides", "load_yaml", "dump_yaml", "PRESETS"]
