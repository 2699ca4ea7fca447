"""Chat messages → prompt text, through a Jinja chat template.

OpenELM-Instruct ships no template; its instruction tuning used the Zephyr format, with role
markers as plain text and ``</s>`` (EOS) closing each turn. The tokenizer adds BOS itself, so
templates here produce the text after it.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    pass


class ChatTemplate:
    def __init__(self, source: str, origin: str, bos_token: str, eos_token: str):
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token
        environment = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        environment.globals["raise_exception"] = _raise
        try:
            self.template = environment.from_string(source)
        except TemplateError as error:
            raise ChatTemplateError(f"{origin}: not a valid Jinja template ({error})") from error

    @classmethod
    def choose(cls, template_file: str | None, tokenizer) -> ChatTemplate:
        """A template file given by flag, else the tokenizer's own, else Zephyr."""
        tokens = dict(bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        if template_file:
            path = Path(template_file)
            try:
                return cls(path.read_text(), str(path), **tokens)
            except OSError as error:
                raise ChatTemplateError(f"{path}: cannot read the chat template ({error.strerror})") from error
        if getattr(tokenizer, "chat_template", None):
            return cls(tokenizer.chat_template, "the tokenizer's chat_template", **tokens)
        return cls(ZEPHYR_TEMPLATE, "OpenELM-Instruct's Zephyr format", **tokens)

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            text = self.template.render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except TemplateError as error:
            raise ChatTemplateError(f"the chat template ({self.origin}) failed: {error}") from error
        # The tokenizer adds BOS; a template that writes it too would double it.
        return text.removeprefix(self.bos_token)


def _raise(message: str):
    raise TemplateError(message)
