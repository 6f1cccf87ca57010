"""Model cards: validation like the engine's, built-in templates, YAML/JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from twinserve.errors import ValidationError
from twinserve.registry.card import PROMPT_TEMPLATES, GenerationDefaults, ModelCard, load_card, parse_card

MESSAGES = [
    {"role": "system", "content": "You are a writer."},
    {"role": "user", "content": "Write about RAG."},
]


def _render(template: str, messages: list[dict[str, str]]) -> str:
    env = jinja2.Environment()
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, eos_token="</s>", bos_token="<s>"
    )


def test_defaults_are_empty() -> None:
    card = ModelCard()
    assert card.chat_template() is None
    assert card.generation_defaults.model_dump(exclude_none=True) == {}
    assert card.summary() == "template=tokenizer"


def test_builtin_templates_render() -> None:
    alpaca = _render(PROMPT_TEMPLATES["alpaca"], MESSAGES)
    assert alpaca == "You are a writer.\n\n### Instruction:\nWrite about RAG.\n\n### Response:\n"
    no_system = _render(PROMPT_TEMPLATES["alpaca"], MESSAGES[1:])
    assert no_system.startswith("Below is an instruction") and no_system.endswith("### Response:\n")
    chatml = _render(PROMPT_TEMPLATES["chatml"], MESSAGES)
    assert chatml.endswith("<|im_start|>user\nWrite about RAG.<|im_end|>\n<|im_start|>assistant\n")
    llama3 = _render(PROMPT_TEMPLATES["llama3"], MESSAGES)
    assert llama3.startswith("<s><|start_header_id|>system") and llama3.endswith(
        "assistant<|end_header_id|>\n\n"
    )


def test_template_by_name_or_jinja() -> None:
    assert ModelCard(prompt_template="alpaca").chat_template() == PROMPT_TEMPLATES["alpaca"]
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    card = ModelCard(prompt_template=custom)
    assert card.chat_template() == custom and card.template_label() == "custom"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"prompt_template": "vicuna"}, "unknown template name 'vicuna'"),
        ({"prompt_template": "{% for m in messages %}"}, "not valid Jinja"),
        ({"generation_defaults": {"temperature": 0}}, "generation_defaults.temperature"),
        ({"generation_defaults": {"top_p": 1.0}}, "generation_defaults.top_p"),
        ({"generation_defaults": {"top_k": 0}}, "generation_defaults.top_k"),
        ({"generation_defaults": {"max_new_tokens": 0}}, "generation_defaults.max_new_tokens"),
        ({"generation_defaults": {"repetition_penalty": -1}}, "generation_defaults.repetition_penalty"),
        ({"generation_defaults": {"stop": ["a", "b", "c", "d", "e"]}}, "at most 4 stop sequences"),
        ({"generation_defaults": {"stop": [""]}}, "must not be empty"),
        ({"max_input_tokens": 512, "max_total_tokens": 512}, "max_input_tokens must be < max_total_tokens"),
        ({"quantization": "gptq"}, "quantization"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_cards(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_card(data, "card.yaml")
    assert fragment in info.value.message and "card.yaml" in info.value.message


def test_load_yaml_and_json(tmp_path: Path) -> None:
    yaml_card = tmp_path / "card.yaml"
    yaml_card.write_text(
        "base_model: meta-llama/Llama-3.1-8B\n"
        "dataset: mlabonne/llmtwin\n"
        "prompt_template: alpaca\n"
        "generation_defaults:\n  temperature: 0.7\n  top_p: 0.9\n  stop: ['###']\n"
        "max_input_tokens: 1024\nmax_total_tokens: 2048\n"
        "license: llama3.1\ntags:\n  team: twin\n"
    )
    card = load_card(yaml_card)
    assert card.generation_defaults == GenerationDefaults(temperature=0.7, top_p=0.9, stop=["###"])
    assert card.summary() == "base=meta-llama/Llama-3.1-8B, template=alpaca, license=llama3.1"
    json_card = tmp_path / "card.json"
    json_card.write_text(card.model_dump_json())
    assert load_card(json_card) == card
    (tmp_path / "empty.yml").write_text("")
    assert load_card(tmp_path / "empty.yml") == ModelCard()


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("bad.yaml", "a: [unclosed", "cannot parse"),
        ("bad.json", "{nope", "cannot parse"),
        ("list.json", json.dumps([1, 2]), "must be a mapping"),
    ],
)
def test_unreadable_card_files(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValidationError) as info:
        load_card(path)
    assert fragment in info.value.message
    with pytest.raises(ValidationError, match="cannot read"):
        load_card(tmp_path / "missing.yaml")
