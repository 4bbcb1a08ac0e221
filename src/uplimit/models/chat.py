"""Chat templates: messages -> prompt text, the way the model was trained to read it.

Models ship their template as Jinja source (GGUF metadata `tokenizer.chat_template`,
Hugging Face `tokenizer_config.json`). Rendering it, rather than hard-coding ChatML,
keeps any compatible model pair usable. Both sides render and tokenize on the outer side
and send token ids down, so the inner side never re-tokenizes text (FACTS.md: 1 in 10
responses did not re-tokenize to the same ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

from jinja2.sandbox import ImmutableSandboxedEnvironment

from uplimit.errors import InvalidRequest


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


# Used when a model file carries no template (e.g. the tiny test models).
CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    source: str

    def render(self, messages: Sequence[Message]) -> str:
        if not messages:
            raise InvalidRequest("a chat needs at least one message")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.source)
        return template.render(messages=list(messages), add_generation_prompt=True)
