"""One choice of a response: tokens in, text (with stop strings cut) and OpenAI logprobs out.

Streaming and non-streaming share this, so the streamed pieces always add up to the final text:
while streaming, text grows by decoding only the new tokens (with the few before them as context,
vLLM's incremental detokenization), an incomplete UTF-8 character is held back, and so are the
last characters that might be the start of a stop string; the end re-decodes everything once.
"""
from __future__ import annotations

from ..generate.stops import cut_at_stop, held_back
from .scheduler import Event


class Choice:
    def __init__(self, index: int, tokenizer, stops: tuple[str, ...], eos: set[int], ignore_eos: bool):
        self.index, self.tokenizer, self.stops = index, tokenizer, stops
        self.hidden = set() if ignore_eos else eos  # EOS ends the text; it is not part of it
        self.hold = held_back(stops)
        self.tokens: list[int] = []
        self.logprobs: list[tuple] = []  # (token id, logprob, top [(id, logprob)])
        self.prompt_logprobs: list | None = None
        self.shown = ""
        self.finish: str | None = None
        self.visible: list[int] = []  # tokens that are text (EOS is not)
        self.decoded, self.context_at, self.read_at = "", 0, 0  # text of visible[:read_at]

    def _text(self) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([t for t in self.tokens if t not in self.hidden])

    def push(self, event: Event) -> str:
        """Take one event; return the text that may be shown now (streaming delta)."""
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.token is not None:
            self.tokens.append(event.token)
            if event.token not in self.hidden:
                self.visible.append(event.token)
            if event.logprob is not None:
                self.logprobs.append((event.token, *event.logprob))
        if event.finish is not None:
            self.finish = event.finish
            return self._delta(cut_at_stop(self._text(), self.stops))
        text = self._grow()
        cut = cut_at_stop(text, self.stops)
        return self._delta(cut if cut != text else text[:len(text) - self.hold] if self.hold else text)

    def _grow(self) -> str:
        """Text of the visible tokens, decoding only those since the last complete piece: the
        tokens before them are decoded too and subtracted, so a leading space or a multi-byte
        character split across tokens comes out as in a full decode."""
        if self.tokenizer is None:
            return ""
        context = self.tokenizer.decode(self.visible[self.context_at:self.read_at])
        text = self.tokenizer.decode(self.visible[self.context_at:])
        if len(text) > len(context) and text.startswith(context) and not text.endswith("\ufffd"):
            self.decoded += text[len(context):]
            self.context_at, self.read_at = self.read_at, len(self.visible)
        return self.decoded

    def _delta(self, text: str) -> str:
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta

    @property
    def text(self) -> str:
        return cut_at_stop(self._text(), self.stops)

    @property
    def finish_reason(self) -> str:
        return self.finish if self.finish in ("stop", "length") else "stop"

    # ---- OpenAI logprobs shapes ---------------------------------------------------------------
    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)

    def completion_logprobs(self, prompt: list[int] | None, start: int = 0, offset: int = 0) -> dict:
        """/v1/completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset
        (with echo, the prompt's tokens first; its first token has no log-probability)."""
        entries = []
        if prompt is not None:
            lps = self.prompt_logprobs or [None] * len(prompt)
            entries = [(t, *(lp if lp is not None else (None, None))) for t, lp in zip(prompt, lps)]
        entries += self.logprobs[start:]
        tokens, values, tops, offsets = [], [], [], []
        for token, logprob, top in entries:
            piece = self._piece(token)
            tokens.append(piece)
            values.append(logprob)
            tops.append(None if top is None else {self._piece(t): lp for t, lp in top} or {piece: logprob})
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, start: int = 0) -> dict:
        content = []
        for token, logprob, top in self.logprobs[start:]:
            piece = self._piece(token)
            content.append({"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                            "top_logprobs": [{"token": self._piece(t), "logprob": lp,
                                              "bytes": list(self._piece(t).encode())} for t, lp in top]})
        return {"content": content}
