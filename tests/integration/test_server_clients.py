"""Real clients against a real `twinserve serve` process on the default model.

The `openai` SDK, `huggingface_hub.InferenceClient` and the SageMaker body of the LLM Twin
book must work unmodified; so must the book's TGI deployment environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import process_server
from twinserve.server.process import ServerProcess

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# TGI routes take the prompt as the client formats it (the book formats it too); SmolLM2 was
# tuned on ChatML, and answers a bare question with EOS
CHATML = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
BOOK_BODY = {
    "inputs": CHATML,
    "parameters": {
        "max_new_tokens": 150,
        "top_p": 0.9,
        "temperature": 0.01,
        "return_full_text": False,
        "repetition_penalty": 1.1,
    },
}


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with process_server(["--model", str(default_model_path), "--api-key", "test-key"], log) as running:
        yield running


def test_openai_sdk_chat_and_stream(server: ServerProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="test-key", max_retries=0)
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=30, temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=30, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5)
    assert completion.choices[0].text


def test_openai_sdk_sees_typed_errors(server: ServerProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="m", messages=QUESTION, max_tokens=3)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="test-key", max_retries=0)
    # too long a prompt: the error the SDK (and LiteLLM's context-window fallbacks) recognise
    long_chat = [{"role": "user", "content": "Paris " * 1500}]
    with pytest.raises(openai.BadRequestError, match="maximum context length") as caught:
        client.chat.completions.create(model="m", messages=long_chat, max_tokens=3)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError, match="use_beam_search") as caught:
        client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=3, extra_body={"use_beam_search": True}
        )
    assert caught.value.param == "use_beam_search"
    # explicit nulls, as SDK users write them, are fine
    answer = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=3, n=None, logprobs=None)
    assert answer.choices[0].message.content is not None


def test_openai_sdk_gets_several_choices(server: ServerProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="test-key", max_retries=0)
    chat = client.chat.completions.create(
        model="m", messages=QUESTION, max_tokens=8, n=2, temperature=0.8, seed=7
    )
    assert [c.index for c in chat.choices] == [0, 1]
    # LangChain's OpenAI.generate sends a list of prompts in one request
    batch = client.completions.create(
        model="m", prompt=["The capital of France is", "Two plus two is"], max_tokens=4
    )
    assert [c.index for c in batch.choices] == [0, 1] and all(c.text for c in batch.choices)


def test_huggingface_inference_client_text_generation(server: ServerProcess) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server.url, token="test-key")
    # the client posts to TGI's compat route, where return_full_text defaults to true as in TGI
    out = client.text_generation(CHATML, max_new_tokens=20, details=True)
    assert out.generated_text.startswith(CHATML) and out.details.finish_reason in ("length", "eos_token")
    assert out.details.generated_tokens == len(out.details.tokens)
    new_text = client.text_generation(CHATML, max_new_tokens=20, return_full_text=False)
    assert out.generated_text == CHATML + new_text and "Paris" in new_text
    events = list(client.text_generation(CHATML, max_new_tokens=20, stream=True, details=True))
    assert events[-1].generated_text == CHATML + "".join(e.token.text for e in events)
    assert events[-1].details.generated_tokens == len(events)
    assert events[-1].generated_text == out.generated_text


def test_sagemaker_invocations_with_the_book_body(server: ServerProcess) -> None:
    r = httpx.post(
        f"{server.url}/invocations", json=BOOK_BODY, headers={"authorization": "Bearer test-key"}, timeout=120
    )
    assert r.status_code == 200, r.text
    answer = r.json()[0]["generated_text"]
    assert "Paris" in answer and not answer.startswith(BOOK_BODY["inputs"])
    assert httpx.get(f"{server.url}/ping").status_code == 200


def test_the_book_tgi_environment_starts_the_server(default_model_path: Path, tmp_path: Path) -> None:
    # the LLM Twin deployment config, with the model id pointing at the local default model
    env = {
        "HF_MODEL_ID": str(default_model_path),
        "SM_NUM_GPUS": "1",
        "MAX_INPUT_LENGTH": "2048",
        "MAX_TOTAL_TOKENS": "4096",
        "MAX_BATCH_TOTAL_TOKENS": "4096",
        "HF_MODEL_QUANTIZE": "bitsandbytes",
    }
    with process_server([], tmp_path / "serve.log", env=env) as server:
        info = httpx.get(f"{server.url}/info").json()
        assert info["quantize"] == "bitsandbytes"
        assert (info["max_input_tokens"], info["max_total_tokens"], info["max_batch_total_tokens"]) == (
            2048,
            4096,
            4096,
        )
        body = {**BOOK_BODY, "parameters": {**BOOK_BODY["parameters"], "max_new_tokens": 20}}
        r = httpx.post(f"{server.url}/invocations", json=body, timeout=120)
        assert r.status_code == 200 and r.json()[0]["generated_text"]
