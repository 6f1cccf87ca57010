"""The model card: what a version is, and how it must be prompted and served.

A card travels with every registry version (see `store.py` for where it lives in MLflow).
The prompt template matters most: a model fine-tuned on Alpaca-formatted prompts and served
with another format answers worse, so the card records the template the model was trained
with and the server renders chats with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from twinserve.config import Quantize
from twinserve.errors import ValidationError

CARD_FILENAME = "twinserve-card.json"
MAX_STOP_SEQUENCES = 4  # the engine's limit (SamplingParams.stop)

ALPACA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% set rest = messages[1:] %}{% else %}"
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'user' %}\n\n### Instruction:\n{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}\n\n### Response:\n{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}\n\n### Response:\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Named templates a card may select by name instead of spelling out the Jinja.
PROMPT_TEMPLATES: dict[str, str] = {
    "alpaca": ALPACA_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
}


class GenerationDefaults(BaseModel):
    """Sampling defaults the server applies when a request leaves a parameter unset.

    Ranges are the engine's (`SamplingParams`), so a card can never make a request invalid.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (>= 1).")
    temperature: float | None = Field(None, gt=0, description="Softmax temperature (> 0).")
    top_p: float | None = Field(None, gt=0, lt=1, description="Nucleus sampling mass (0 < p < 1).")
    top_k: int | None = Field(None, ge=1, description="Keep the k most likely tokens (>= 1).")
    repetition_penalty: float | None = Field(
        None, gt=0, description="Divide logits of seen tokens (> 0, 1 = off)."
    )
    stop: list[str] | None = Field(
        None, description=f"Stop sequences (at most {MAX_STOP_SEQUENCES}, none empty)."
    )

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(v)}")
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty")
        return v


class ModelCard(BaseModel):
    """Lineage and serving instructions of one registry version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str | None = Field(None, description="What was fine-tuned (e.g. meta-llama/Llama-3.1-8B).")
    dataset: str | None = Field(None, description="Training data reference (a Hub id, a path, a URI).")
    training_run: str | None = Field(None, description="Training run reference (an MLflow run id, a URL).")
    prompt_template: str | None = Field(
        None,
        description=(
            "Chat template the model was trained with: a built-in name "
            f"({', '.join(sorted(PROMPT_TEMPLATES))}) or a Jinja chat template over `messages`. "
            "None = the tokenizer's own chat template."
        ),
    )
    generation_defaults: GenerationDefaults = Field(
        default_factory=GenerationDefaults, description="Applied when a request leaves a parameter unset."
    )
    max_input_tokens: int | None = Field(None, ge=1, description="Recommended longest prompt, in tokens.")
    max_total_tokens: int | None = Field(None, ge=2, description="Recommended prompt + new tokens.")
    quantization: Quantize | None = Field(None, description="Recommended serving quantization (TGI names).")
    license: str | None = Field(None, description="License identifier (e.g. apache-2.0, llama3.1).")
    tags: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")

    @field_validator("prompt_template")
    @classmethod
    def _valid_template(cls, v: str | None) -> str | None:
        if v is None or v in PROMPT_TEMPLATES:
            return v
        if "{" not in v:  # a one-word value was meant as a name, not as a template
            raise ValueError(f"unknown template name {v!r}; built-ins: {', '.join(sorted(PROMPT_TEMPLATES))}")
        import jinja2

        try:
            jinja2.Environment().parse(v)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(
                f"prompt_template is not valid Jinja (line {exc.lineno}): {exc.message}"
            ) from exc
        return v

    @model_validator(mode="after")
    def _limits_consistent(self) -> ModelCard:
        if (
            self.max_input_tokens is not None
            and self.max_total_tokens is not None
            and self.max_input_tokens >= self.max_total_tokens
        ):
            raise ValueError("max_input_tokens must be < max_total_tokens")
        return self

    def chat_template(self) -> str | None:
        """The Jinja chat template to render chats with; None = use the tokenizer's own."""
        if self.prompt_template is None:
            return None
        return PROMPT_TEMPLATES.get(self.prompt_template, self.prompt_template)

    def summary(self) -> str:
        """One line for tables: lineage and template at a glance."""
        parts = [f"base={self.base_model}" if self.base_model else None]
        parts.append(f"template={self.template_label()}")
        parts.append(f"license={self.license}" if self.license else None)
        return ", ".join(p for p in parts if p)

    def template_label(self) -> str:
        """`tokenizer` (its own template), a built-in's name, or `custom`."""
        if self.prompt_template is None:
            return "tokenizer"
        return self.prompt_template if self.prompt_template in PROMPT_TEMPLATES else "custom"


def parse_card(data: Any, source: str = "card") -> ModelCard:
    """Validate card data (a dict); ValidationError naming every bad field."""
    try:
        return ModelCard.model_validate(data)
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'card'}: {err['msg']}" for err in exc.errors()
        )
        raise ValidationError(f"invalid model card {source}: {problems}") from exc


def load_card(path: Path) -> ModelCard:
    """Read a card from a YAML (.yaml/.yml) or JSON file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError(f"cannot read model card {path}: {exc.strerror or exc}") from exc
    import yaml

    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValidationError(f"cannot parse model card {path}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValidationError(f"model card {path} must be a mapping of fields, got {type(data).__name__}")
    return parse_card(data, str(path))
