"""Chat templates: exact rendering, assistant spans, sandboxing, one-line errors."""
from __future__ import annotations

import pytest

from neoformer.chat import DEFAULT_TEMPLATE, ChatError, ChatTemplate, chat_template_of

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_default_template_renders_chatml_exactly():
    text = ChatTemplate().render(CONVERSATION[:2], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_assistant_spans_cover_exactly_the_replies_and_their_end_marker():
    text, spans = ChatTemplate().assistant_spans(CONVERSATION)
    assert [text[a:b] for a, b in spans] == ["4<|im_end|>\n", "6<|im_end|>\n"]
    assert text == ChatTemplate().render(CONVERSATION)


def test_a_custom_template_and_stop_round_trip_through_the_config():
    llama = ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %}"
             "{{ m.content }}</s>{% endif %}{% endfor %}")
    config = {"chat_template": ChatTemplate(llama, ("</s>",)).to_dict()}
    template = chat_template_of(config)
    text, spans = template.assistant_spans(CONVERSATION[1:3])
    assert text == "[INST] 2+2? [/INST]4</s>" and [text[a:b] for a, b in spans] == ["4</s>"]
    assert template.stop == ("</s>",)
    assert chat_template_of({}).template == DEFAULT_TEMPLATE


def test_templates_run_sandboxed():
    hostile = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatError, match="failed to render"):
        hostile.render(CONVERSATION)


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user"}], "string 'content'"),
    ("hello", "non-empty list"),
])
def test_bad_conversations_are_one_line(messages, message):
    with pytest.raises(ChatError, match=message):
        ChatTemplate().render(messages)


def test_bad_template_config_is_one_line():
    with pytest.raises(ChatError, match="does not parse"):
        ChatTemplate("{% for %}").render(CONVERSATION)
    with pytest.raises(ChatError, match="stop must be a list"):
        ChatTemplate.from_dict({"template": DEFAULT_TEMPLATE, "stop": 5})
