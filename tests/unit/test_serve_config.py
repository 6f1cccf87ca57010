"""`ServeConfig` reads TGI's and SageMaker's environment names, like TGI does, and our own
(`TWINSERVE_*`), down to the engine they configure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.factories import SMALL_LIMITS
from twinserve.config import ServeConfig
from twinserve.engine.factory import build_engine
from twinserve.engine.request import GenerateRequest, SamplingParams

TGI_ENV = [
    "HF_MODEL_ID",
    "MODEL_ID",
    "HF_MODEL_REVISION",
    "MAX_INPUT_LENGTH",
    "MAX_INPUT_TOKENS",
    "MAX_TOTAL_TOKENS",
    "MAX_BATCH_PREFILL_TOKENS",
    "MAX_BATCH_TOTAL_TOKENS",
    "MAX_CONCURRENT_REQUESTS",
    "HF_MODEL_QUANTIZE",
    "QUANTIZE",
    "SM_NUM_GPUS",
    "NUM_SHARD",
    "PORT",
    "API_KEY",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name in TGI_ENV or name.startswith(("SM_", "TWINSERVE_")) and name != "TWINSERVE_HOME":
            monkeypatch.delenv(name)


def test_the_llm_twin_sagemaker_config_maps_onto_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    # the deployment config of the LLM Twin book, as SageMaker passes it to the TGI container
    env = {
        "HF_MODEL_ID": "mlabonne/TwinLlama-3.1-8B-DPO",
        "SM_NUM_GPUS": "1",
        "MAX_INPUT_LENGTH": "2048",
        "MAX_TOTAL_TOKENS": "4096",
        "MAX_BATCH_TOTAL_TOKENS": "4096",
        "HF_MODEL_QUANTIZE": "bitsandbytes",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = ServeConfig()
    assert config.model == "mlabonne/TwinLlama-3.1-8B-DPO" and config.num_shard == 1
    engine = config.engine_config("/models/x")
    assert (engine.max_input_tokens, engine.max_total_tokens, engine.max_batch_total_tokens) == (
        2048,
        4096,
        4096,
    )
    assert engine.quantize == "bitsandbytes" and engine.max_batch_prefill_tokens >= 2048
    # inside SageMaker (SM_* set): port 8080 on all interfaces
    assert config.resolved_port() == 8080 and config.resolved_host() == "0.0.0.0"


def test_outside_sagemaker_defaults_stay_local() -> None:
    config = ServeConfig()
    assert config.resolved_port() == 3000 and config.resolved_host() == "127.0.0.1"
    assert config.model == "default"


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"MODEL_ID": "org/m"}, "model", "org/m"),
        ({"HF_MODEL_REVISION": "abc123"}, "revision", "abc123"),
        ({"MAX_INPUT_TOKENS": "300"}, "max_input_tokens", 300),
        ({"MAX_BATCH_PREFILL_TOKENS": "5000"}, "max_batch_prefill_tokens", 5000),
        ({"MAX_CONCURRENT_REQUESTS": "7"}, "max_concurrent_requests", 7),
        ({"QUANTIZE": "bitsandbytes-nf4"}, "quantize", "bitsandbytes-nf4"),
        ({"QUANTIZE": ""}, "quantize", None),
        ({"NUM_SHARD": "2"}, "num_shard", 2),
        ({"PORT": "9000"}, "port", 9000),
        ({"TWINSERVE_MAX_TOTAL_TOKENS": "999"}, "max_total_tokens", 999),
    ],
)
def test_each_env_name(monkeypatch: pytest.MonkeyPatch, env: dict, field: str, value: object) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert getattr(ServeConfig(), field) == value


def test_flags_win_over_env_and_our_names_over_tgi_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "4096")
    monkeypatch.setenv("TWINSERVE_MAX_TOTAL_TOKENS", "3000")
    assert ServeConfig().max_total_tokens == 3000
    assert ServeConfig(max_total_tokens=1500).max_total_tokens == 1500


def test_api_key_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", "hunter2")
    config = ServeConfig()
    assert config.api_key is not None and config.api_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.model_dump())


def test_the_api_key_is_stripped_and_a_blank_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", "  hunter2\n")
    key = ServeConfig().api_key
    assert key is not None and key.get_secret_value() == "hunter2"
    for blank in ("", "   "):
        monkeypatch.setenv("API_KEY", blank)
        with pytest.raises(ValidationError, match="set but empty") as caught:
            ServeConfig()
        assert "hunter2" not in str(caught.value)


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_MODEL_QUANTIZE", "awq")
    with pytest.raises(ValidationError):
        ServeConfig()
    monkeypatch.delenv("HF_MODEL_QUANTIZE")
    with pytest.raises(ValueError, match="max_input_tokens must be < max_total_tokens"):
        ServeConfig(max_input_tokens=4096, max_total_tokens=4096).engine_config("/m")


@pytest.mark.parametrize(("value", "shared"), [(None, True), ("0", False)])
def test_twinserve_share_prompt_prefix_reaches_the_runner(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, value: str | None, shared: bool
) -> None:
    """TWINSERVE_SHARE_PROMPT_PREFIX=0 (the escape hatch should sharing misbehave on a model) turns
    the runner's shared-prefix pass off; unset, a group with a common system prompt shares it."""
    if value is not None:
        monkeypatch.setenv("TWINSERVE_SHARE_PROMPT_PREFIX", value)
    config = ServeConfig(**SMALL_LIMITS).engine_config(str(tiny_model_dir))
    assert config.share_prompt_prefix is shared
    engine = build_engine(config, warmup=False)
    runner = engine.runner
    real = runner._prefill_prefix  # type: ignore[attr-defined]
    prefixes: list[int] = []

    def spy(rows: list[Any], prefix: int) -> None:
        prefixes.append(prefix)
        real(rows, prefix)

    runner._prefill_prefix = spy  # type: ignore[attr-defined]
    system = list(range(30, 70))  # 40 tokens every prompt starts with
    for i, suffix in enumerate([[101, 102], [103], [104, 105, 106]]):
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        engine.add_request(
            GenerateRequest(prompt_token_ids=system + suffix, params=params, request_id=f"r{i}")
        )
    finished = set()
    while engine.has_work():
        finished |= {e.request_id for e in engine.step() if e.finished}
    assert finished == {"r0", "r1", "r2"}
    assert prefixes == ([len(system)] if shared else [])
