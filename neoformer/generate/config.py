"""Every generation option in one validated dataclass (HF ``generate`` names and semantics).

Seed-API aliases: ``max_new`` = ``max_new_tokens``, ``temp`` = ``temperature``.
Decoding mode: greedy unless a sampling option is given (``temperature > 0``, ``top_k``,
``top_p``, ``min_p``) or ``do_sample=True``; ``temperature=0`` always means greedy.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

ALIASES = {"max_new": "max_new_tokens", "temp": "temperature", "max_tokens": "max_new_tokens",
           "eos_id": "eos_token_id", "beams": "num_beams", "stop_strings": "stop"}
TRIM_MODES = ("slice", "refill")


@dataclass
class GenerationConfig:
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
    stop: list[str] = field(default_factory=list)  # stop strings (needs a tokenizer)
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never" (HF)
    num_return_sequences: int = 1
    num_draft_tokens: int = 4  # speculative decoding: tokens the draft proposes per round
    trim_keep: int | None = None  # context trimming: tokens kept when the window is full (default half)
    trim: str = "slice"  # slice: k[:, :, -keep:] (seed) | refill: re-prefill the kept window
    max_seq_len: int | None = None  # window for trimming (default: the model's max_seq_len)
    decoder_start_token_id: int | None = None  # encoder-decoder: first target token
    compile: bool = False  # torch.compile the one-token decode step

    @classmethod
    def build(cls, **options) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for name, value in options.items():
            target = ALIASES.get(name, name)
            if target not in known:
                close = difflib.get_close_matches(name, list(known) + list(ALIASES), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown generation option {name!r}{hint}")
            if target in values and values[target] != value:
                raise ValueError(f"{name!r} and {target!r} both given; pass only one")
            values[target] = value
        cfg = cls(**values)
        cfg.validate()
        return cfg

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
        if self.trim not in TRIM_MODES:
            bad(f"trim ({self.trim!r}) must be one of: {', '.join(TRIM_MODES)}")
        if self.trim_keep is not None and (not isinstance(self.trim_keep, int) or self.trim_keep < 1):
            bad(f"trim_keep ({self.trim_keep!r}) must be an integer >= 1")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            bad(f"max_seq_len ({self.max_seq_len!r}) must be an integer >= 2")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if self.num_beams > 1 and self.stop:
            bad("stop strings are not supported with beam search (num_beams > 1); use eos_token_id")
