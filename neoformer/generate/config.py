"""Every generation option in one validated, immutable dataclass (HF ``generate`` names and semantics).

Seed-API aliases: ``max_new`` = ``max_new_tokens``, ``temp`` = ``temperature``.
Decoding mode: greedy unless a sampling option is given (``temperature > 0``, ``top_k``,
``top_p``, ``min_p``) or ``do_sample=True``; ``temperature=0`` always means greedy.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from ..config import did_you_mean

ALIASES = {"max_new": "max_new_tokens", "temp": "temperature", "max_tokens": "max_new_tokens",
           "eos_id": "eos_token_id", "beams": "num_beams", "stop_strings": "stop",
           "max_seq_len": "context_window"}  # max_seq_len: this option's name before 2027-01
TRIM_MODES = ("slice", "refill")


@dataclass(frozen=True)
class GenerationConfig:
    """Immutable: derive a changed copy with ``dataclasses.replace`` (or ``build(generation_config=cfg, ...)``)."""

    max_new_tokens: int = 64
    do_sample: bool | None = None  # None: sample iff a sampling option is set
    temperature: float | None = None
    top_k: int | None = None  # keep the k most likely tokens (Fan et al. 2018)
    top_p: float | None = None  # nucleus sampling (Holtzman et al. 2020)
    min_p: float | None = None  # keep tokens with p >= min_p * p_max (Nguyen et al. 2024)
    repetition_penalty: float | None = None  # CTRL (Keskar et al. 2019), HF semantics
    no_repeat_ngram_size: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (needs a tokenizer); a str or list is stored as a tuple
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never" (HF)
    num_return_sequences: int = 1
    num_draft_tokens: int = 4  # speculative decoding: tokens the draft proposes per round
    prompt_lookup_num_tokens: int | None = None  # speculative decoding without a draft model: propose this many
    max_matching_ngram_size: int = 2  # tokens that followed the latest earlier match of the last n-gram (n <= this)
    trim_keep: int | None = None  # context trimming: tokens kept when the window is full (default half)
    trim: str = "slice"  # slice: k[:, :, -keep:] (seed) | refill: re-prefill the kept window
    context_window: int | None = None  # tokens the cache holds before trimming (default: the model's max_seq_len)
    decoder_start_token_id: int | None = None  # encoder-decoder: first target token
    compile: bool = False  # torch.compile the one-token decode step

    @classmethod
    def build(cls, generation_config: "GenerationConfig | None" = None, **options) -> "GenerationConfig":
        """A config from keyword options (aliases accepted), on top of ``generation_config`` if given
        (which is left unchanged: the result is a new object)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for name, value in options.items():
            target = ALIASES.get(name, name)
            if name == "max_seq_len":
                warnings.warn("generation option max_seq_len is now context_window (the trimming window, "
                              "not the model's max_seq_len)", DeprecationWarning, stacklevel=3)
            if target not in known:
                raise ValueError(f"unknown generation option {name!r}{did_you_mean(name, [*known, *ALIASES])}")
            if target in values and values[target] != value:
                raise ValueError(f"{name!r} and {target!r} both given; pass only one")
            values[target] = value
        if generation_config is None:
            return cls(**values)
        if not isinstance(generation_config, GenerationConfig):
            raise ValueError(f"generation_config must be a GenerationConfig, not {type(generation_config).__name__}")
        return dataclasses.replace(generation_config, **values)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))  # frozen: normalise once, while being built
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    @property
    def sampling(self) -> bool:
        if self.temperature == 0:
            return False
        if self.do_sample is not None:
            return self.do_sample
        return any(v is not None for v in (self.temperature, self.top_k, self.top_p, self.min_p))

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad(f"max_new_tokens ({self.max_new_tokens!r}) must be an integer >= 0")
        if self.temperature is not None and not self.temperature >= 0:
            bad(f"temperature ({self.temperature}) must be >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad(f"top_k ({self.top_k!r}) must be an integer >= 0 (0 = off)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad(f"top_p ({self.top_p}) must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad(f"min_p ({self.min_p}) must be in [0, 1]")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            bad(f"repetition_penalty ({self.repetition_penalty}) must be > 0 (1 = off)")
        if self.no_repeat_ngram_size is not None and (
                not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0):
            bad(f"no_repeat_ngram_size ({self.no_repeat_ngram_size!r}) must be an integer >= 0 (0 = off)")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            bad(f"num_beams ({self.num_beams!r}) must be an integer >= 1")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            bad(f"num_return_sequences ({self.num_return_sequences!r}) must be an integer >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            bad(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        if self.early_stopping not in (True, False, "never"):
            bad(f"early_stopping ({self.early_stopping!r}) must be True, False or 'never'")
        if not isinstance(self.num_draft_tokens, int) or self.num_draft_tokens < 1:
            bad(f"num_draft_tokens ({self.num_draft_tokens!r}) must be an integer >= 1")
        if self.prompt_lookup_num_tokens is not None and (
                not isinstance(self.prompt_lookup_num_tokens, int) or self.prompt_lookup_num_tokens < 1):
            bad(f"prompt_lookup_num_tokens ({self.prompt_lookup_num_tokens!r}) must be an integer >= 1")
        if not isinstance(self.max_matching_ngram_size, int) or self.max_matching_ngram_size < 1:
            bad(f"max_matching_ngram_size ({self.max_matching_ngram_size!r}) must be an integer >= 1")
        if self.prompt_lookup_num_tokens and self.num_beams > 1:
            bad("prompt_lookup_num_tokens (speculative decoding) does not combine with beam search (num_beams > 1)")
        if self.trim not in TRIM_MODES:
            bad(f"trim ({self.trim!r}) must be one of: {', '.join(TRIM_MODES)}")
        if self.trim_keep is not None and (not isinstance(self.trim_keep, int) or self.trim_keep < 1):
            bad(f"trim_keep ({self.trim_keep!r}) must be an integer >= 1")
        if self.context_window is not None and (not isinstance(self.context_window, int) or self.context_window < 2):
            bad(f"context_window ({self.context_window!r}) must be an integer >= 2")
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if self.num_beams > 1 and self.stop:
            bad("stop strings are not supported with beam search (num_beams > 1); use eos_token_id")
