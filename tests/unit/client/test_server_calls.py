"""`LLMClient.info`, `tokenize`, `chat_tokenize` and `health` (and their async twins) over real
HTTP: the tiny-model server in a thread, servers that are loading, draining or failed, and a
peer that answers `/info` as an older TGI does. Over SageMaker Runtime they are `NotFoundError`.

The property the RAG prompt trimming relies on: `chat_tokenize(messages).count` is the
`prompt_tokens` that `chat(messages)` reports.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from transformers import AutoTokenizer

from tests.servers import ThreadServer, asgi_in_thread, free_port, serve_config, thread_server, until
from twinserve.client import (
    ChatTokens,
    HttpTransport,
    LLMClient,
    PromptToken,
    Response,
    SageMakerTransport,
    ServerInfo,
)
from twinserve.errors import EngineDeadError, NotFoundError, NotReadyError, ServerError, ValidationError
from twinserve.platforms.local.router.app import create_router_app
from twinserve.platforms.local.router.pool import ReplicaPool, ReplicaSpec, ReplicaStatus
from twinserve.server.app import create_app
from twinserve.server.service import ModelService, ServiceState

FAST: dict[str, Any] = {"backoff_base": 0.001, "backoff_cap": 0.001}  # also caps the server's Retry-After
PROMPT = "the quick brown fox"
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "héllo wörld 日本語 🙂"},
        {"role": "assistant", "content": "to be or not to be"},
        {"role": "user", "content": "once upon a time " * 6},
    ],
]


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ThreadServer]:
    with thread_server(serve_config(model_dir)) as s:
        yield s


@pytest.fixture(params=["tgi", "openai"])
def client(request: pytest.FixtureRequest, server: ThreadServer) -> Iterator[LLMClient]:
    with LLMClient(server.url, api=request.param, max_new_tokens=2) as c:
        yield c


class CountingGets(HttpTransport):
    """The real transport, counting its GETs (attempts of `info` and `health`)."""

    gets = 0

    def get(self, path: str) -> Response:
        self.gets += 1
        return super().get(path)

    async def aget(self, path: str) -> Response:
        self.gets += 1
        return await super().aget(path)


# ------------------------------------------------------------------ the ready server
@pytest.mark.parametrize("messages", CHATS)
def test_chat_tokenize_counts_what_chat_reports(client: LLMClient, messages: list[dict[str, Any]]) -> None:
    measured = client.chat_tokenize(messages)
    assert isinstance(measured, ChatTokens)
    assert measured.count == len(measured.tokens) == client.chat(messages).prompt_tokens
    assert measured.templated_text.endswith("<|im_start|>assistant\n")
    assert all(measured.templated_text[t.start : t.stop] == t.text for t in measured.tokens)
    again = asyncio.run(_aclosing(client, client.achat_tokenize(messages)))
    assert again == measured


async def _aclosing(client: LLMClient, call: Any) -> Any:
    try:
        return await call
    finally:
        await client.aclose()


def test_tokenize_is_the_servers_tokenizer(client: LLMClient, model_dir: Path) -> None:
    tokens = client.tokenize(PROMPT)
    assert all(isinstance(t, PromptToken) for t in tokens)
    assert [t.id for t in tokens] == AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    assert "".join(t.text for t in tokens) == PROMPT and tokens[-1].stop == len(PROMPT)
    assert client.tokenize(PROMPT, truncate=2) == tokens[-2:]
    assert asyncio.run(_aclosing(client, client.atokenize(PROMPT))) == tokens
    with pytest.raises(ValidationError, match="must have less than"):  # /generate's input limit
        client.tokenize("fox " * 400)


def test_info_names_what_is_served(client: LLMClient, server: ThreadServer) -> None:
    info = client.info()
    assert isinstance(info, ServerInfo)
    config = server.service.engine.config
    assert (info.max_input_tokens, info.max_total_tokens) == (
        config.max_input_tokens,
        config.max_total_tokens,
    )
    assert info.model_id == server.service.model_id and info.prompt_template == "tokenizer"
    assert info.registry_name is None and info.registry_version is None  # a folder, not the registry
    assert info.version and info.raw["weights_sha256"]
    assert asyncio.run(_aclosing(client, client.ainfo())) == info
    assert client.health() is True and asyncio.run(_aclosing(client, client.ahealth())) is True


# ------------------------------------------------------ loading, draining, failed
def _without_lifespan(app: Any) -> Any:
    """The app with its lifespan answered but not run: the model never starts loading."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    return asgi


def test_health_raises_what_the_server_reports_and_is_not_retried(model_dir: Path) -> None:
    config = serve_config(model_dir)
    service = ModelService(config)
    with asgi_in_thread(_without_lifespan(create_app(config, service))) as url:
        transport = CountingGets(url)
        client = LLMClient(transport=transport, max_retries=2, **FAST)
        with pytest.raises(NotReadyError, match="the server is loading") as raised:
            client.health()
        assert raised.value.status_code == 503 and transport.gets == 1
        with pytest.raises(NotReadyError, match="loading"):
            asyncio.run(_aclosing(client, client.ahealth()))
        assert transport.gets == 2
        transport.gets = 0
        with pytest.raises(NotReadyError):  # info is retried, as generation is, on a 503
            client.info()
        assert transport.gets == 3
        service.begin_drain()
        with pytest.raises(NotReadyError, match="the server is draining"):
            client.health()


def test_a_failed_server_is_engine_dead(tmp_path: Path) -> None:
    config = serve_config(tmp_path / "no-such-model")
    service = ModelService(config)
    with asgi_in_thread(create_app(config, service)) as url:
        assert until(lambda: service.state is ServiceState.FAILED, 60)
        with (
            LLMClient(url, max_retries=0) as client,
            pytest.raises(EngineDeadError, match="failed") as raised,
        ):
            client.health()
    assert raised.value.status_code == 503
    assert any("request_id" in note for note in raised.value.__notes__)


# ------------------------------------------------------------ through an endpoint router
def test_the_endpoint_router_passes_them_through(server: ThreadServer) -> None:
    pool = ReplicaPool([ReplicaSpec(id="r", url=server.url)])
    with asgi_in_thread(create_router_app(pool)) as url, LLMClient(url) as routed:
        assert until(lambda: pool.snapshot()[0].status is ReplicaStatus.HEALTHY, 30)
        with LLMClient(server.url) as direct:
            assert routed.chat_tokenize(CHATS[1]) == direct.chat_tokenize(CHATS[1])
            assert routed.tokenize(PROMPT) == direct.tokenize(PROMPT)
            assert routed.info() == direct.info()
        assert routed.health() is True


def test_a_router_without_a_healthy_replica_is_not_ready() -> None:
    pool = ReplicaPool([ReplicaSpec(id="r", url=f"http://127.0.0.1:{free_port()}")])  # nothing there
    with (
        asgi_in_thread(create_router_app(pool)) as url,
        LLMClient(url) as client,
        pytest.raises(NotReadyError, match=r"no healthy replica behind the endpoint \(1: ") as raised,
    ):
        client.health()
    assert "replicas" not in raised.value.message  # a sentence, not the router's JSON


# ------------------------------------------------------------ a peer's /info
def _answers_info(body: bytes, status: int = 200) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


TGI_1_INFO = {  # what TGI 1.4 answers: no max_input_tokens yet, none of our provenance
    "model_id": "bigscience/bloom-560m",
    "model_sha": "abc",
    "model_dtype": "torch.float16",
    "model_device_type": "cuda",
    "max_input_length": 1024,
    "max_total_tokens": 2048,
    "max_concurrent_requests": 128,
    "version": "1.4.0",
}


def test_info_is_read_leniently_from_a_peer() -> None:
    with asgi_in_thread(_answers_info(json.dumps(TGI_1_INFO).encode())) as url, LLMClient(url) as client:
        info = client.info()
    assert info == ServerInfo(
        model_id="bigscience/bloom-560m", max_input_tokens=1024, max_total_tokens=2048, version="1.4.0"
    )
    assert info.raw == TGI_1_INFO and info.prompt_template is None


@pytest.mark.parametrize("body", [b"[1, 2]", b"<html>a proxy's page</html>", b'{"max_total_tokens": "lots"}'])
def test_an_info_that_is_not_one_is_a_bad_gateway(body: bytes) -> None:
    with (
        asgi_in_thread(_answers_info(body)) as url,
        LLMClient(url) as client,
        pytest.raises(ServerError, match="malformed info") as raised,
    ):
        client.info()
    assert raised.value.status_code == 502


# ------------------------------------------------------------- SageMaker Runtime
def test_sagemaker_runtime_reaches_none_of_them() -> None:
    session = boto3.session.Session(
        aws_access_key_id="AKIDLOCAL", aws_secret_access_key="x", region_name="eu-west-1"
    )
    # nothing listens there: each call must fail before any request is made
    transport = SageMakerTransport("twin", endpoint_url="http://127.0.0.1:9", session=session)
    with LLMClient(transport=transport, max_retries=3, **FAST) as client:
        for call in (
            client.info,
            client.health,
            lambda: client.tokenize("x"),
            lambda: client.chat_tokenize(CHATS[0]),
        ):
            with pytest.raises(NotFoundError, match="SageMaker Runtime"):
                call()

        async def both() -> None:
            with pytest.raises(NotFoundError, match="/info"):
                await client.ainfo()
            with pytest.raises(NotFoundError, match="/chat_tokenize"):
                await client.achat_tokenize(CHATS[0])
            with pytest.raises(NotFoundError, match="/chat_tokenize"):
                async with transport.astream("/chat_tokenize", {"messages": CHATS[0]}):
                    pass

        asyncio.run(both())
