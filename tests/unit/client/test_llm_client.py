"""LLMClient against the real server: generate and chat, sync and async, whole and streamed.

The tiny random model with `ignore_eos` generates exactly `max_new_tokens` tokens, and
greedy decoding makes a streamed answer equal to the unary one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ThreadServer, serve_config, thread_server
from twinserve.client import FinishReason, GenerationResult, LLMClient, StreamChunk

K = 5
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ThreadServer]:
    with thread_server(serve_config(model_dir)) as s:
        yield s


@pytest.fixture(params=["tgi", "openai"])
def client(request: pytest.FixtureRequest, server: ThreadServer) -> Iterator[LLMClient]:
    with LLMClient(server.url, api=request.param, max_new_tokens=K, ignore_eos=True) as c:
        yield c


def _check_result(result: GenerationResult) -> None:
    assert result.generated_tokens == K
    assert result.finish_reason is FinishReason.LENGTH
    assert result.prompt_tokens is not None and result.prompt_tokens > 0
    assert result.request_id


def _check_stream(chunks: list[StreamChunk], expected: GenerationResult) -> None:
    assert chunks, "no chunks"
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert "".join(c.text for c in chunks) == last.generated_text == expected.text
    assert last.generated_tokens == K
    assert last.finish_reason is FinishReason.LENGTH
    assert last.prompt_tokens == expected.prompt_tokens
    assert last.request_id and last.request_id != expected.request_id
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_generate_and_stream(client: LLMClient) -> None:
    result = client.generate(PROMPT)
    _check_result(result)
    _check_stream(list(client.generate_stream(PROMPT)), result)


def test_chat_and_stream(client: LLMClient) -> None:
    result = client.chat(MESSAGES)
    _check_result(result)
    _check_stream(list(client.chat_stream(MESSAGES)), result)


def test_async_twins_match_sync(client: LLMClient) -> None:
    expected_gen, expected_chat = client.generate(PROMPT), client.chat(MESSAGES)

    async def main() -> tuple[GenerationResult, list[StreamChunk], GenerationResult, list[StreamChunk]]:
        try:
            gen, chat = await asyncio.gather(client.agenerate(PROMPT), client.achat(MESSAGES))
            gen_chunks = [c async for c in client.agenerate_stream(PROMPT)]
            chat_chunks = [c async for c in client.achat_stream(MESSAGES)]
            return gen, gen_chunks, chat, chat_chunks
        finally:
            await client.aclose()

    gen, gen_chunks, chat, chat_chunks = asyncio.run(main())
    assert gen.text == expected_gen.text
    assert chat.text == expected_chat.text
    _check_result(gen)
    _check_result(chat)
    _check_stream(gen_chunks, expected_gen)
    _check_stream(chat_chunks, expected_chat)


def test_per_call_params_override_defaults(client: LLMClient) -> None:
    assert client.generate(PROMPT, max_new_tokens=2).generated_tokens == 2
    # None means "not given": the client's default applies
    assert client.generate(PROMPT, max_new_tokens=None).generated_tokens == K


def test_tgi_stream_carries_token_ids_and_logprobs(server: ThreadServer) -> None:
    with LLMClient(server.url, api="tgi") as c:
        chunks = list(c.generate_stream(PROMPT, max_new_tokens=K, ignore_eos=True))
        result = c.generate(PROMPT, max_new_tokens=K, ignore_eos=True)
    assert len(chunks) == K
    assert all(c.token_id is not None and c.logprob is not None for c in chunks)
    assert [c.token_id for c in chunks] == [t.id for t in result.tokens]


def test_openai_top_n_tokens_become_logprobs(server: ThreadServer) -> None:
    with LLMClient(server.url, api="openai") as c:
        result = c.chat(MESSAGES, max_new_tokens=3, ignore_eos=True, top_n_tokens=2)
        chunks = list(c.generate_stream(PROMPT, max_new_tokens=3, ignore_eos=True, top_n_tokens=2))
    assert len(result.tokens) == 3
    assert all(t.logprob is not None for t in result.tokens)
    assert all(c.logprob is not None for c in chunks)


def test_seeded_sampling_is_reproducible_on_both_apis(server: ThreadServer) -> None:
    texts = set()
    for api in ("tgi", "openai"):
        with LLMClient(server.url, api=api, max_new_tokens=K, ignore_eos=True) as c:
            texts.add(c.generate(PROMPT, do_sample=True, temperature=0.9, seed=7).text)
            texts.add(c.generate(PROMPT, do_sample=True, temperature=0.9, seed=7).text)
    assert len(texts) == 1


def _stop_across_a_token_boundary(pieces: list[str]) -> tuple[str, int]:
    """A stop string cut from the text the tokens `pieces` make, starting in one token and ending
    in the next, whose first occurrence is where it was cut; and that start. One that starts
    after the first character is preferred (the OpenAI answer, cut before it, is then not empty);
    a prefix of the text always qualifies, so any text of two non-empty tokens has one."""
    text = "".join(pieces)
    boundaries = [b for b in itertools.accumulate(len(p) for p in pieces) if 0 < b < len(text)]
    candidates = [(start, b) for b in boundaries for start in range(b - 1, -1, -1)]
    for start, b in sorted(candidates, key=lambda c: c[0] == 0):  # stable: prefixes last
        stop = text[start : b + 1]
        if text.find(stop) == start:
            return stop, start
    raise AssertionError(f"the greedy answer has no token boundary inside its text: {pieces!r}")


@pytest.mark.parametrize("api", ["tgi", "openai"])
def test_stop_sequence_reported(server: ThreadServer, api: str) -> None:
    with LLMClient(server.url, api=api, max_new_tokens=K, ignore_eos=True) as c:
        pieces = [ch.text for ch in c.generate_stream(PROMPT)]  # greedy: the same answer each time
        text = "".join(pieces)
        stop, start = _stop_across_a_token_boundary(pieces)
        result = c.generate(PROMPT, stop=stop)
        chunks = list(c.generate_stream(PROMPT, stop=[stop]))
    # each protocol's semantics: TGI keeps the stop string in the text, OpenAI/vLLM cut it
    reason = FinishReason.STOP_SEQUENCE if api == "tgi" else FinishReason.STOP
    assert result.finish_reason is reason
    assert result.text == (text[: start + len(stop)] if api == "tgi" else text[:start])
    assert "".join(ch.text for ch in chunks) == result.text
    assert chunks[-1].finish_reason is reason


def test_repr_and_context_managers(server: ThreadServer) -> None:
    client = LLMClient(server.url, api="openai", model="m")
    assert repr(client) == f"LLMClient('{server.url}', api='openai', model='m')"
    with client:
        client.generate(PROMPT, max_new_tokens=1)
    client.close()  # idempotent


def test_constructor_rejects_ambiguous_setups(server: ThreadServer) -> None:
    from twinserve.client import HttpTransport

    with pytest.raises(ValueError):
        LLMClient()
    with pytest.raises(ValueError):
        LLMClient(server.url, transport=HttpTransport(server.url))
    with pytest.raises(ValueError):
        LLMClient(transport=HttpTransport(server.url), api_key="k")
    with pytest.raises(ValueError):
        LLMClient(transport=HttpTransport(server.url), timeout=5)
    with pytest.raises(ValueError):
        LLMClient(server.url, api="grpc")
