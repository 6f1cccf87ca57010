"""The local SageMaker Runtime gateway, called by the real boto3 `sagemaker-runtime` client.

Replicas are real servers of the tiny random model (in threads); the endpoints that point at
them are records in a real state store, as `LocalPlatform` writes them. botocore parses every
answer itself (its rest-json errors, its event-stream decoder), so what passes here is what
boto3 users get. The last test runs the whole chain: a `LocalPlatform` endpoint (replica and
router processes) behind the gateway daemon.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import httpx
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.eventstream import EventStream, EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError
from botocore.parsers import EventStreamJSONParser

from tests.servers import ThreadServer, asgi_in_thread, process_gone, serve_config, thread_server
from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus, ReplicaRecord, ReplicaState
from twinserve.deploy.state import StateStore
from twinserve.platforms.local.gateway import ensure_gateway, gateway_url, stop_gateway
from twinserve.platforms.local.gateway.app import create_gateway_app
from twinserve.platforms.local.gateway.eventstream import MAX_PART, exception_event, payload_parts
from twinserve.platforms.local.gateway.sigv4 import SignatureError, SignedRequest, verify
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.server.process import free_port

KEY = "gateway-test-key"
K = 6
TGI = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": K, "ignore_eos": True}}
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": K, "ignore_eos": True}


# ---------------------------------------------------------------- fixtures
def _put(
    store: StateStore,
    name: str,
    url: str | None,
    *,
    status: EndpointStatus = EndpointStatus.IN_SERVICE,
    replica_url: str | None = None,
    **config: Any,
) -> None:
    cfg = EndpointConfig.model_validate({"name": name, "variants": [{"model": "tiny"}], **config})
    store.put_endpoint(Endpoint.new(cfg).model_copy(update={"status": status, "url": url}))
    if replica_url is not None:
        port = int(replica_url.rsplit(":", 1)[1])
        record = ReplicaRecord(
            id=f"{name}-primary-1", endpoint=name, variant="primary", port=port, url=replica_url
        )
        store.put_replica(record.model_copy(update={"state": ReplicaState.HEALTHY}))


async def _breaks_mid_stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A container that starts an SSE answer and dies: the connection drops mid-body."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'data: {"token": 1}\n\n', "more_body": True})
    raise RuntimeError("container died")


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path) -> Iterator[tuple[ThreadServer, ThreadServer]]:
    """An open replica and one that wants KEY as its Bearer token."""
    with (
        thread_server(serve_config(tiny_model_dir)) as open_,
        thread_server(serve_config(tiny_model_dir, api_key=KEY)) as keyed,
    ):
        yield open_, keyed


@pytest.fixture(scope="module")
def gateway(
    servers: tuple[ThreadServer, ThreadServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    open_, keyed = servers
    store = StateStore(tmp_path_factory.mktemp("gateway") / "endpoints" / "state.db")
    _put(store, "twin", open_.url, replica_url=open_.url)
    _put(store, "locked", keyed.url, api_key=KEY)
    _put(store, "small", open_.url, payload_limit=1000)
    _put(store, "creating", None, status=EndpointStatus.CREATING)
    _put(store, "failed", None, status=EndpointStatus.FAILED)
    _put(store, "down", f"http://127.0.0.1:{free_port()}")
    _put(store, "remote", "http://127.0.0.1:9", platform={"type": "sagemaker"})
    with asgi_in_thread(_breaks_mid_stream) as broken:
        _put(store, "broken", broken)
        with asgi_in_thread(create_gateway_app(store)) as url:
            yield url


def _runtime(url: str, secret: str = "any-secret", **config: Any) -> Any:
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="eu-west-1",
        aws_access_key_id="AKIDLOCAL",
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}, **config),
    )


@pytest.fixture(scope="module")
def runtime(gateway: str) -> Any:
    return _runtime(gateway)


def _invoke(runtime: Any, name: str, body: dict[str, Any], **kwargs: Any) -> Any:
    out = runtime.invoke_endpoint(
        EndpointName=name, Body=json.dumps(body), ContentType="application/json", **kwargs
    )
    return out, json.loads(out["Body"].read())


def _stream_events(runtime: Any, name: str, body: dict[str, Any]) -> tuple[Any, list[bytes]]:
    out = runtime.invoke_endpoint_with_response_stream(
        EndpointName=name, Body=json.dumps(body), ContentType="application/json"
    )
    return out, [event["PayloadPart"]["Bytes"] for event in out["Body"]]


def _sse_data(parts: list[bytes]) -> list[str]:
    text = b"".join(parts).decode()
    return [line.removeprefix("data:").strip() for line in text.splitlines() if line.startswith("data:")]


# ------------------------------------------------------------ invocations
def test_ping(gateway: str) -> None:
    assert httpx.get(f"{gateway}/ping").status_code == 200


def test_invoke_endpoint_with_tgi_and_chat_bodies(runtime: Any, servers: tuple[ThreadServer, ...]) -> None:
    out, answer = _invoke(runtime, "twin", TGI, Accept="application/json")
    direct = httpx.post(f"{servers[0].url}/invocations", json=TGI, timeout=60).json()
    assert isinstance(answer, list) and answer == direct  # TGI's one-element list, prompt included
    assert answer[0]["generated_text"].startswith(TGI["inputs"])
    assert out["ContentType"] == "application/json"
    assert out["InvokedProductionVariant"] == "primary"
    headers = out["ResponseMetadata"]["HTTPHeaders"]
    assert out["ResponseMetadata"]["RequestId"] == headers["x-request-id"]

    _, chat = _invoke(runtime, "twin", CHAT)
    assert chat["object"] == "chat.completion"
    assert chat["usage"]["completion_tokens"] == K
    assert chat["choices"][0]["message"]["role"] == "assistant"


def test_stream_is_payload_parts_of_the_sse_answer(runtime: Any) -> None:
    body = {**TGI, "parameters": {**TGI["parameters"], "return_full_text": False}}
    _, unary = _invoke(runtime, "twin", body)
    out, parts = _stream_events(runtime, "twin", body)  # no "stream" in the body: the gateway adds it
    assert out["ContentType"].startswith("text/event-stream")
    assert out["InvokedProductionVariant"] == "primary"
    events = [json.loads(e) for e in _sse_data(parts)]
    assert len(parts) > 1  # sent as they came, not as one buffered blob
    assert "".join(e["token"]["text"] for e in events) == unary[0]["generated_text"]
    assert events[-1]["generated_text"] == unary[0]["generated_text"]

    _, chat_parts = _stream_events(runtime, "twin", CHAT)
    chat_events = _sse_data(chat_parts)
    assert chat_events[-1] == "[DONE]"
    text = "".join(
        c["delta"].get("content") or "" for e in chat_events[:-1] for c in json.loads(e)["choices"]
    )
    _, chat = _invoke(runtime, "twin", CHAT)
    assert text == chat["choices"][0]["message"]["content"]


def test_container_errors_are_model_errors(runtime: Any) -> None:
    bad = {"inputs": "x", "parameters": {"top_p": 7}}
    with pytest.raises(runtime.exceptions.ModelError) as caught:
        _invoke(runtime, "twin", bad)
    response = caught.value.response
    assert response["OriginalStatusCode"] == 422
    assert json.loads(response["OriginalMessage"])["error_type"] == "validation"
    assert response["Error"]["Message"].startswith("Received client error (422) from primary with message")
    assert response["LogStreamArn"].endswith("/aws/sagemaker/Endpoints/twin")
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    # before the stream starts, the same error, on the streaming call too
    with pytest.raises(runtime.exceptions.ModelError) as streamed:
        _stream_events(runtime, "twin", bad)
    assert streamed.value.response["OriginalStatusCode"] == 422


def test_a_stream_that_breaks_ends_with_a_model_stream_error(runtime: Any) -> None:
    out = runtime.invoke_endpoint_with_response_stream(EndpointName="broken", Body=b"{}")
    events = iter(out["Body"])
    assert next(events)["PayloadPart"]["Bytes"] == b'data: {"token": 1}\n\n'
    with pytest.raises(EventStreamError) as caught:
        next(events)
    assert caught.value.response["Error"]["Code"] == "ModelStreamError"
    assert "StreamBroken" in caught.value.response["Error"]["Message"]


def test_endpoints_that_cannot_be_invoked(runtime: Any) -> None:
    for name in ("nope", "remote"):  # no such endpoint, or not a local one
        with pytest.raises(runtime.exceptions.ValidationError) as caught:
            _invoke(runtime, name, TGI)
        assert (
            caught.value.response["Error"]["Message"] == f"Endpoint {name} of account 000000000000 not found."
        )
    with pytest.raises(runtime.exceptions.ServiceUnavailable):
        _invoke(runtime, "creating", TGI)
    with pytest.raises(runtime.exceptions.ValidationError, match="Failed"):
        _invoke(runtime, "failed", TGI)
    with pytest.raises(runtime.exceptions.ServiceUnavailable, match="does not answer"):
        _invoke(runtime, "down", TGI)
    with pytest.raises(runtime.exceptions.ValidationError, match="not an asynchronous endpoint"):
        runtime.invoke_endpoint_async(EndpointName="twin", InputLocation="s3://bucket/input.json")


def test_payload_limit_is_the_endpoints(runtime: Any) -> None:
    big = {"inputs": "x" * 2000}
    with pytest.raises(runtime.exceptions.ValidationError) as caught:
        _invoke(runtime, "small", big)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert "1000 bytes" in caught.value.response["Error"]["Message"]


def test_target_variant(runtime: Any) -> None:
    out, answer = _invoke(runtime, "twin", TGI, TargetVariant="primary")
    assert out["InvokedProductionVariant"] == "primary" and answer[0]["generated_text"]
    with pytest.raises(runtime.exceptions.ValidationError, match="Variant blue"):
        _invoke(runtime, "twin", TGI, TargetVariant="blue")


def test_api_keyed_endpoint_needs_the_key_as_secret(gateway: str) -> None:
    _, answer = _invoke(_runtime(gateway, secret=KEY), "locked", TGI)  # the replica checked the Bearer too
    assert answer[0]["generated_text"]
    _, parts = _stream_events(_runtime(gateway, secret=KEY), "locked", TGI)
    assert json.loads(_sse_data(parts)[-1])["generated_text"]
    with pytest.raises(ClientError) as wrong:
        _invoke(_runtime(gateway, secret="not-the-key"), "locked", TGI)
    assert wrong.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert wrong.value.response["Error"]["Code"] == "InvalidSignatureException"
    with pytest.raises(ClientError) as unsigned:
        _invoke(_runtime(gateway, signature_version=UNSIGNED), "locked", TGI)
    assert unsigned.value.response["Error"]["Code"] == "MissingAuthenticationTokenException"
    # an open endpoint takes any credentials, or none
    assert _invoke(_runtime(gateway, signature_version=UNSIGNED), "twin", TGI)[1][0]["generated_text"]


# ------------------------------------------------------------ signatures
def _signed(secret: str, body: bytes = b'{"inputs": "hi"}', when: datetime | None = None) -> SignedRequest:
    request = AWSRequest(
        method="POST",
        url="http://127.0.0.1:8085/endpoints/twin/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    signer = SigV4Auth(Credentials("AKID", secret), "sagemaker", "us-east-1")
    if when is None:
        signer.add_auth(request)
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("botocore.auth.get_current_datetime", lambda: when.replace(tzinfo=None))
            signer.add_auth(request)
    headers = [(k.lower(), v) for k, v in request.headers.items()] + [("host", "127.0.0.1:8085")]
    return SignedRequest("POST", "/endpoints/twin/invocations", "", headers, body)


def test_sigv4_verification() -> None:
    verify(_signed(KEY), KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify(_signed("other"), KEY)
    tampered = _signed(KEY)
    with pytest.raises(SignatureError, match="does not match"):
        verify(SignedRequest(tampered.method, tampered.path, "", tampered.headers, b'{"inputs": "bye"}'), KEY)
    old = _signed(KEY, when=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(SignatureError, match="expired"):
        verify(old, KEY)
    verify(old, KEY, now=datetime.now(UTC) - timedelta(hours=1))
    unsigned_body = SignedRequest(
        "POST", tampered.path, "", [*tampered.headers, ("x-amz-content-sha256", "UNSIGNED-PAYLOAD")], b"{}"
    )
    with pytest.raises(SignatureError, match="does not match the body"):
        verify(unsigned_body, KEY)
    with pytest.raises(SignatureError) as missing:
        verify(SignedRequest("POST", "/", "", [("host", "h")], b""), KEY)
    assert missing.value.code == "MissingAuthenticationTokenException"


# ------------------------------------------------------------ event stream
def test_eventstream_encoding_is_what_botocore_decodes() -> None:
    payloads = [b"", b"data: x\n\n", "é日本🙂".encode(), bytes(range(256)) * 5, b"z" * (MAX_PART + 10)]
    stream = b"".join(part for p in payloads for part in payload_parts(p))
    buffer = EventStreamBuffer()
    cuts = [*range(0, 4096, 7), *range(4096, len(stream), 65536), len(stream)]
    for start, end in zip(cuts, cuts[1:], strict=False):  # in odd cuts, as off a socket
        buffer.add_data(stream[start:end])
    messages = list(buffer)
    assert b"".join(m.payload for m in messages) == b"".join(payloads)
    assert len(messages) == len(payloads)  # none for b"", two for the big one
    assert list(payload_parts(b"")) == []
    assert {m.headers[":event-type"] for m in messages} == {"PayloadPart"}
    assert {m.headers[":message-type"] for m in messages} == {"event"}
    assert {m.headers[":content-type"] for m in messages} == {"application/octet-stream"}


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self) -> Iterator[bytes]:
        yield self.data

    def close(self) -> None:
        pass


def test_exception_events_raise_in_botocore() -> None:
    model = botocore.session.get_session().get_service_model("sagemaker-runtime")
    shape = model.operation_model("InvokeEndpointWithResponseStream").output_shape.members["Body"]
    data = next(payload_parts(b"hello")) + exception_event("ModelStreamError", "broken", "StreamBroken")
    events = iter(EventStream(_Raw(data), shape, EventStreamJSONParser(), "InvokeEndpointWithResponseStream"))
    assert next(events) == {"PayloadPart": {"Bytes": b"hello"}}
    with pytest.raises(EventStreamError) as caught:
        next(events)
    assert caught.value.response["Error"] == {"Code": "ModelStreamError", "Message": "broken"}


# ------------------------------------------------------------ the daemon
def test_daemon_gateway_in_front_of_a_real_endpoint(
    manager: LocalPlatform, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EndpointConfig.model_validate(
        {
            "name": "twin",
            "api_key": KEY,
            "startup_timeout_s": 240,
            "drain_timeout_s": 2,
            "variants": [{"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "threads": 1}],
        }
    )
    port = free_port()
    monkeypatch.setenv("TWINSERVE_GATEWAY_PORT", str(port))
    assert gateway_url(manager.home) is None
    manager.create(config, controller=False)  # the first local endpoint starts the gateway
    url = gateway_url(manager.home)
    assert url == f"http://127.0.0.1:{port}"
    try:
        assert ensure_gateway(manager.store, manager.home) == url == gateway_url(manager.home)
        pid = json.loads((manager.home / "endpoints" / "gateway.json").read_text())["pid"]
        runtime = _runtime(url, secret=KEY)
        out, answer = _invoke(runtime, "twin", TGI)
        assert out["InvokedProductionVariant"] == "primary" and answer[0]["generated_text"]
        _, parts = _stream_events(runtime, "twin", TGI)
        assert json.loads(_sse_data(parts)[-1])["generated_text"] == answer[0]["generated_text"]
        with pytest.raises(ClientError, match="InvalidSignatureException"):
            _invoke(_runtime(url, secret="wrong"), "twin", TGI)
    finally:
        manager.delete("twin")  # the last local endpoint: its gateway stops with it
    assert process_gone(pid)
    assert gateway_url(manager.home) is None and not stop_gateway(manager.home)
