"""Chat prompts: render messages with the model's own chat template."""

from __future__ import annotations

from typing import Any

from twinserve.engine.request import GenerateRequest, SamplingParams
from twinserve.errors import ValidationError


def render_chat(tokenizer: Any, messages: list[dict[str, str]], chat_template: str | None = None) -> str:
    """The prompt text the model was trained to continue, ending with the assistant turn.

    `chat_template` (a model card's) replaces the tokenizer's own when given.
    """
    if not chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValidationError("this model has no chat template; send a plain prompt instead")
    try:
        rendered = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
        return str(rendered)
    except Exception as exc:  # jinja errors: bad roles, template raise_exception(...)
        raise ValidationError(f"cannot apply the chat template: {exc}") from exc


def chat_request(
    tokenizer: Any, messages: list[dict[str, str]], params: SamplingParams, **kwargs: Any
) -> GenerateRequest:
    """A request whose prompt is the rendered chat (special tokens come from the template)."""
    return GenerateRequest(
        prompt=render_chat(tokenizer, messages), params=params, add_special_tokens=False, **kwargs
    )
