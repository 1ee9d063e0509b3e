"""Chat templates: how a conversation becomes one text, shared by fine-tuning, serving and export.

A template is a Jinja string in Hugging Face's form (``messages``, ``add_generation_prompt``), so
an exported folder can put it in ``tokenizer_config.json`` unchanged. It is stored in a
checkpoint's ``config.json`` under ``"chat_template"``; a checkpoint without one (a base model)
uses :data:`DEFAULT_TEMPLATE` (ChatML markers written as plain text, which any byte-level
tokenizer encodes). Templates come from checkpoints, i.e. from strangers: they run in Jinja's
immutable sandbox, which cannot touch files or Python internals.

    template = chat_template_of(config)                  # config.json as a dict
    text = template.render(messages, add_generation_prompt=True)
    text, spans = template.assistant_spans(messages)     # character spans of assistant replies
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_STOP = ("<|im_end|>",)


class ChatError(ValueError):
    """A conversation or template that cannot be rendered; one line."""


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        return ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(source)
    except TemplateError as err:
        raise ChatError(f"chat template does not parse: {err}") from None


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` with known roles, or one ChatError line."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where} must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatError(f"{where}[{i}] must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise ChatError(f"{where}[{i}] has role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the strings that end an assistant turn (stop strings when serving)."""

    template: str = DEFAULT_TEMPLATE
    stop: tuple[str, ...] = field(default=DEFAULT_STOP)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return _compiled(self.template).render(messages=check_messages(messages),
                                                   add_generation_prompt=add_generation_prompt)
        except TemplateError as err:
            raise ChatError(f"chat template failed to render: {err}") from None

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendered text and the (start, end) character span of every assistant reply,
        its end marker included (so a model learns to stop). Works for any template whose
        rendering of a conversation prefix is a prefix of the whole (true of ChatML, Llama, ...)."""
        messages = check_messages(messages)
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True)) if i else 0
            end = len(self.render(messages[: i + 1]))
            if text[:end] != self.render(messages[: i + 1]) or start > end:
                raise ChatError("chat template is not prefix-stable (a conversation's start renders differently "
                                "alone); per-turn loss masks need one that is")
            spans.append((start, end))
        return text, spans

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, data: Any) -> "ChatTemplate":
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(template=data)
        if not isinstance(data, dict) or not isinstance(data.get("template", DEFAULT_TEMPLATE), str):
            raise ChatError("chat_template must be a Jinja string or {template: str, stop: [str, ...]}")
        stop = data.get("stop", DEFAULT_STOP)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ChatError("chat_template.stop must be a list of strings")
        return cls(template=data.get("template", DEFAULT_TEMPLATE), stop=tuple(stop))


def chat_template_of(config: dict) -> ChatTemplate:
    """The chat template a checkpoint's config.json holds, or the default for a base model."""
    return ChatTemplate.from_dict(config.get("chat_template"))


__all__ = ["ChatTemplate", "ChatError", "DEFAULT_TEMPLATE", "DEFAULT_STOP", "ROLES", "chat_template_of",
           "check_messages"]
