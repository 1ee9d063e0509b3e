"""OpenAI request bodies -> checked internal requests, and OpenAI's error shape.

Bodies are parsed by hand, field by field, so every malformed value (wrong type, out of range,
a bool where a number goes, huge numbers) becomes one 4xx :class:`APIError` naming the field,
in OpenAI's ``{"error": {"message", "type", "param", "code"}}`` form. Unknown fields are ignored
(clients send ``user`` and friends), as OpenAI-compatible servers do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .scheduler import Sampling

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20
MAX_STOPS = 16


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(f"{param}: {message}", param=param)


# ---- field readers ----------------------------------------------------------------------------
def _number(body: dict, name: str, lo: float, hi: float, default=None, *, open_lo: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a number, not {type(value).__name__ if not isinstance(value, float) else value}")
    if value < lo or value > hi or (open_lo and value == lo):
        raise bad(name, f"{value} is out of range ({'(' if open_lo else '['}{lo}, {hi}])")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise bad(name, f"{value} is out of range [{lo}, {hi}]")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, not {type(value).__name__}")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
        raise bad("stop", f"must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings")
    return tuple(stop)


def _unsupported(body: dict) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0):
            raise bad(name, "is not supported; use repetition_penalty")
    if body.get("logit_bias") not in (None, {}):
        raise bad("logit_bias", "is not supported")
    if body.get("suffix") not in (None, ""):
        raise bad("suffix", "is not supported")
    if body.get("tools") or body.get("functions"):
        raise bad("tools", "tool calls are not supported")


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    if not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    return _flag(options, "include_usage")


def sampling_of(body: dict, *, max_tokens: int | None, logprobs: int | None, stop: tuple[str, ...],
                prompt_logprobs: bool = False) -> Sampling:
    """The shared sampling fields (OpenAI's and vLLM's extensions)."""
    top_k = _integer(body, "top_k", -1, 1 << 30)
    return Sampling(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0), top_p=_number(
            body, "top_p", 0.0, 1.0, open_lo=True), top_k=None if top_k in (None, -1, 0) else top_k,
        min_p=_number(body, "min_p", 0.0, 1.0), repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0,
                                                                             open_lo=True),
        seed=_integer(body, "seed", -(1 << 63), (1 << 63) - 1), stop=stop,
        min_tokens=_integer(body, "min_tokens", 0, 1 << 20, 0), ignore_eos=_flag(body, "ignore_eos"),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)


@dataclass
class GenerationRequest:
    """A checked /v1/completions or /v1/chat/completions request."""

    prompts: list[list[int]]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    max_tokens: int | None  # None: the server's default, within the room left by the prompt
    chat: bool = False


def _token_list(value: Any, param: str, vocab: int) -> list[int] | None:
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not all(0 <= t < vocab for t in value):
            raise bad(param, f"token ids must be in [0, {vocab})")
        return value
    return None


def prompts_of(value: Any, param: str, tokenizer, vocab: int) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists -> token id lists."""
    if isinstance(value, str):
        value = [value]
    single = _token_list(value, param, vocab)
    if single is not None:
        return [single]
    if not isinstance(value, list) or not value:
        raise bad(param, "must be a string, a list of strings, a list of token ids or a list of token id lists")
    prompts = []
    for item in value:
        if isinstance(item, str):
            if tokenizer is None:
                raise bad(param, "this checkpoint has no tokenizer; send token ids")
            prompts.append(tokenizer.encode(item))
            continue
        ids = _token_list(item, param, vocab)
        if ids is None:
            raise bad(param, "must be a string, a list of strings, a list of token ids or a list of token id lists")
        prompts.append(ids)
    if any(not p for p in prompts):
        raise bad(param, "a prompt encodes to zero tokens; send some text")
    return prompts


def completion_request(body: dict, tokenizer, vocab: int) -> GenerationRequest:
    _unsupported(body)
    if "prompt" not in body:
        raise bad("prompt", "is required")
    prompts = prompts_of(body["prompt"], "prompt", tokenizer, vocab)
    if len(prompts) > 64:
        raise bad("prompt", "at most 64 prompts per request")
    n = _integer(body, "n", 1, MAX_N, 1)
    best_of = _integer(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != n:
        raise bad("best_of", "must equal n (best-of ranking is not supported)")
    stream = _flag(body, "stream")
    echo = _flag(body, "echo")
    logprobs = _integer(body, "logprobs", 0, MAX_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", 0, 1 << 30)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens", "must be >= 1 (0 only with echo)")
    if echo and stream:
        raise bad("echo", "is not supported with stream: true")
    sampling = sampling_of(body, max_tokens=max_tokens, logprobs=logprobs, stop=_stops(body),
                           prompt_logprobs=echo and logprobs is not None)
    return GenerationRequest(prompts, sampling, n, stream, _stream_options(body, stream), echo, max_tokens)


def chat_request(body: dict, tokenizer, vocab: int, template) -> GenerationRequest:
    from ..chat import ChatError

    _unsupported(body)
    if tokenizer is None:
        raise APIError("this checkpoint has no tokenizer; chat needs one", param="messages")
    if "messages" not in body:
        raise bad("messages", "is required")
    try:
        text = template.render(body["messages"], add_generation_prompt=_flag(body, "add_generation_prompt", True))
    except ChatError as err:
        raise bad("messages", str(err)) from None
    ids = tokenizer.encode(text)
    if not ids:
        raise bad("messages", "the conversation encodes to zero tokens")
    n = _integer(body, "n", 1, MAX_N, 1)
    stream = _flag(body, "stream")
    top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    want = _flag(body, "logprobs")
    if top is not None and not want:
        raise bad("top_logprobs", "needs logprobs: true")
    max_tokens = _integer(body, "max_completion_tokens", 1, 1 << 30)
    max_tokens = _integer(body, "max_tokens", 1, 1 << 30, max_tokens)
    stops = tuple(dict.fromkeys(template.stop + _stops(body)))
    sampling = sampling_of(body, max_tokens=max_tokens, logprobs=(top or 0) if want else None, stop=stops)
    return GenerationRequest([ids], sampling, n, stream, _stream_options(body, stream), False, max_tokens, chat=True)


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad("model", "must be a string")
    if model != served:
        raise APIError(f"The model `{model[:100]}` does not exist; this server serves `{served}`", status=404,
                       param="model", code="model_not_found")
