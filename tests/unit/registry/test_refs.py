"""Model references parse into typed values; malformed ones are a ValidationError."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinserve.errors import ValidationError
from twinserve.registry.refs import (
    AliasRef,
    DefaultRef,
    HubRef,
    LocalRef,
    VersionRef,
    check_alias,
    parse_model_spec,
    parse_ref,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("default", DefaultRef()),
        ("models:/llm-twin/3", VersionRef("llm-twin", 3)),
        ("models:/llm-twin/latest", VersionRef("llm-twin", None)),
        ("models:/llm-twin@champion", AliasRef("llm-twin", "champion")),
        ("hf://org/name", HubRef("org/name", None)),
        ("hf://org/name@abc123", HubRef("org/name", "abc123")),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", HubRef("HuggingFaceTB/SmolLM2-135M-Instruct", None)),
        ("org/name@v1.0", HubRef("org/name", "v1.0")),
        ("/no/such/folder", LocalRef(Path("/no/such/folder"))),
        ("./relative", LocalRef(Path("./relative"))),
    ],
)
def test_forms(text: str, expected: object) -> None:
    assert parse_ref(text) == expected


def test_an_existing_path_wins_over_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_ref("org/name") == LocalRef(Path("org/name"))


def test_revision_argument_overrides_the_reference() -> None:
    assert parse_ref("hf://org/name@main", revision="abc") == HubRef("org/name", "abc")


def test_round_trip_through_str() -> None:
    for text in ("models:/llm-twin/3", "models:/llm-twin@champion", "hf://org/name@abc", "default"):
        assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("models:/llm-twin", "expected models:/<name>/<version>"),
        ("models:/", "expected models:/<name>/<version>"),
        ("models:/llm-twin/abc", "version must be a number"),
        ("models:/llm-twin/Production", "stages"),
        ("models:/llm-twin/0", "version must be a number"),
        ("models:/llm-twin@", "expected models:/<name>/<version>"),
        ("models:/llm-twin@latest", "reserved"),
        ("models:/llm-twin@v2", "reserved"),
        ("models:/a/b/c", "expected models:/<name>/<version>"),
        ("hf://org", "bad Hub reference"),
        ("hf://org/name/extra", "bad Hub reference"),
        ("hf://org/name@", "bad Hub reference"),
        ("  ", "empty"),
    ],
)
def test_malformed(text: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_ref(text)
    assert fragment in info.value.message


def test_cli_model_spec() -> None:
    assert parse_model_spec("llm-twin") == ("llm-twin", None)
    assert parse_model_spec("llm-twin/2") == ("llm-twin", VersionRef("llm-twin", 2))
    assert parse_model_spec("models:/llm-twin@champion") == ("llm-twin", AliasRef("llm-twin", "champion"))


def test_alias_rules() -> None:
    assert check_alias("champion") == "champion"
    for bad in ("with space", "latest", "V3", ""):
        with pytest.raises(ValidationError):
            check_alias(bad)
