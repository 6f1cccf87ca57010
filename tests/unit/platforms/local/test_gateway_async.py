"""InvokeEndpointAsync through the local gateway, called by the real boto3 `sagemaker-runtime` client.

The chain is the real one, in threads (and, in the last test, as the processes the local
platform starts): gateway → the endpoint's router → its job service
(`twinserve.jobs.async_front` with an `AsyncWorker`, over the endpoint's SQLite queue and
results folder) → the router again → a tiny-model replica. botocore parses every answer itself
(the 202's InferenceId and location headers, its modeled errors), so what passes here is what
boto3 users get.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.async_stack import AsyncStack, async_stack, put_endpoint
from tests.servers import ThreadServer, asgi_in_thread, serve_config, thread_server, until
from twinserve.deploy.spec import EndpointConfig
from twinserve.deploy.state import StateStore
from twinserve.platforms.local.gateway import gateway_url
from twinserve.platforms.local.gateway.app import create_gateway_app
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.server.process import free_port

KEY = "gateway-async-key"
K = 6
TGI = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": K, "ignore_eos": True}}
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": K, "ignore_eos": True}


@dataclass
class Setup:
    gateway: str
    replica: ThreadServer
    twin: AsyncStack  # serves
    zero: AsyncStack  # no healthy replica: its jobs stay queued
    locked: AsyncStack  # api_key


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    home = tmp_path_factory.mktemp("gateway-async")
    store = StateStore(home / "endpoints" / "state.db")
    nowhere = f"http://127.0.0.1:{free_port()}"
    with (
        thread_server(serve_config(tiny_model_dir)) as replica,
        thread_server(serve_config(tiny_model_dir, api_key=KEY)) as keyed,
        async_stack(store, home, "twin", replica.url) as twin,
        async_stack(store, home, "zero", nowhere) as zero,
        async_stack(store, home, "locked", keyed.url, api_key=KEY) as locked,
    ):
        put_endpoint(store, "realtime", replica.url, replica.url)
        put_endpoint(store, "down", f"http://127.0.0.1:{free_port()}", None, **{"async": {}})
        with asgi_in_thread(create_gateway_app(store)) as gateway:
            yield Setup(gateway, replica, twin, zero, locked)


def _runtime(url: str, secret: str = "any-secret") -> Any:
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="eu-west-1",
        aws_access_key_id="AKIDLOCAL",
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def runtime(setup: Setup) -> Any:
    return _runtime(setup.gateway)


def _path(location: str) -> Path:
    parsed = urlparse(location)
    assert parsed.scheme == "file", location
    return Path(unquote(parsed.path))


def _stored(location: str, timeout: float = 120.0) -> Any:
    """The object at a file:// location, once the worker has written it."""
    path = _path(location)
    assert until(path.exists, timeout), f"nothing at {location}"
    return json.loads(path.read_bytes())


def _submit(runtime: Any, name: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    if body is not None:
        kwargs["Body"] = json.dumps(body)
    return runtime.invoke_endpoint_async(EndpointName=name, ContentType="application/json", **kwargs)


# ------------------------------------------------------------ accepted
def test_inline_body_is_queued_run_and_stored(runtime: Any, setup: Setup) -> None:
    out = _submit(runtime, "twin", TGI, InferenceId="gw-inline-1", Accept="application/json")
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert out["InferenceId"] == "gw-inline-1"
    assert out["OutputLocation"].endswith("/gw-inline-1.out")
    assert out["FailureLocation"].endswith("/gw-inline-1.error")
    answer = _stored(out["OutputLocation"])
    direct = httpx.post(f"{setup.replica.url}/invocations", json=TGI, timeout=60).json()
    assert answer == direct  # what InvokeEndpoint would have answered: TGI's one-element list
    job = httpx.get(f"{setup.twin.url}/async-invocations/gw-inline-1").json()
    assert job["status"] == "succeeded" and job["output_location"] == out["OutputLocation"]
    assert not _path(out["FailureLocation"]).exists()


def test_input_location_and_a_generated_inference_id(runtime: Any, setup: Setup) -> None:
    inputs = setup.twin.settings.input_roots[0]  # HOME/endpoints/twin/inputs
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "chat.json").write_text(json.dumps(CHAT))
    out = runtime.invoke_endpoint_async(EndpointName="twin", InputLocation=(inputs / "chat.json").as_uri())
    assert out["InferenceId"]  # the job service's own id
    answer = _stored(out["OutputLocation"])
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == K


def test_the_same_inference_id_is_one_job(runtime: Any, setup: Setup) -> None:
    first = _submit(runtime, "zero", TGI, InferenceId="gw-twice")
    second = _submit(runtime, "zero", TGI, InferenceId="gw-twice")
    assert first["InferenceId"] == second["InferenceId"] == "gw-twice"
    assert first["OutputLocation"] == second["OutputLocation"]
    assert [j.inference_id for j in setup.zero.queue.list("zero")].count("gw-twice") == 1


def test_sagemaker_headers_reach_the_job(runtime: Any, setup: Setup) -> None:
    _submit(
        runtime,
        "zero",  # nothing runs it: the job stays as it was queued
        TGI,
        InferenceId="gw-headers",
        Accept="application/json",
        RequestTTLSeconds=120,
        InvocationTimeoutSeconds=30,
        CustomAttributes="trace=1",
    )
    job = setup.zero.queue.get("gw-headers")
    assert (job.status, job.ttl_s, job.invocation_timeout_s) == ("queued", 120, 30)
    assert (job.content_type, job.accept, json.loads(job.body or b"")) == (
        "application/json",
        "application/json",
        TGI,
    )


def test_a_failing_job_leaves_its_error_body(runtime: Any, setup: Setup) -> None:
    too_long = {"inputs": "word " * 400, "parameters": {"max_new_tokens": 2}}  # the replica says 422
    out = _submit(runtime, "twin", too_long, InferenceId="gw-fails")
    error = _stored(out["FailureLocation"])
    assert error["error_type"] == "validation"
    assert httpx.get(f"{setup.twin.url}/async-invocations/gw-fails").json()["status"] == "failed"


def test_api_keyed_endpoint(setup: Setup) -> None:
    out = _submit(_runtime(setup.gateway, secret=KEY), "locked", TGI, InferenceId="gw-locked")
    assert _stored(out["OutputLocation"])[0]["generated_text"]  # the worker's Bearer reached the replica
    with pytest.raises(ClientError) as wrong:
        _submit(_runtime(setup.gateway, secret="not-the-key"), "locked", TGI)
    assert wrong.value.response["Error"]["Code"] == "InvalidSignatureException"


# ------------------------------------------------------------ refused
def test_refusals_are_sagemaker_errors(runtime: Any) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("realtime", {"Body": json.dumps(TGI)}, "is not an asynchronous endpoint"),
        ("nope", {"Body": json.dumps(TGI)}, "Endpoint nope of account 000000000000 not found."),
        ("twin", {}, "exactly one of InputLocation and Body"),
        (
            "twin",
            {"Body": json.dumps(TGI), "InputLocation": "s3://b/k"},
            "exactly one of InputLocation and Body",
        ),
        ("twin", {"Body": json.dumps(TGI), "RequestTTLSeconds": 99999}, "RequestTTLSeconds must be"),
        (
            "twin",
            {"Body": json.dumps(TGI), "S3OutputPathExtension": "x"},
            "S3OutputPathExtension is not supported",
        ),
        ("twin", {"Body": json.dumps({"text": "no inputs"})}, "needs `inputs`"),  # the job service's check
        ("twin", {"Body": json.dumps({**TGI, "stream": True})}, "`stream` is not supported"),
        ("twin", {"InputLocation": "file:///etc/passwd"}, "outside the folders"),
    ]
    for name, kwargs, message in cases:
        with pytest.raises(runtime.exceptions.ValidationError) as caught:
            runtime.invoke_endpoint_async(EndpointName=name, ContentType="application/json", **kwargs)
        assert message in caught.value.response["Error"]["Message"], (name, kwargs)
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_body_over_sagemakers_inline_limit(runtime: Any) -> None:
    big = {"inputs": "x" * 130_000}
    with pytest.raises(runtime.exceptions.ValidationError) as caught:
        _submit(runtime, "twin", big)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert "128000 bytes" in caught.value.response["Error"]["Message"]


def test_a_router_that_does_not_answer_is_service_unavailable(runtime: Any) -> None:
    with pytest.raises(runtime.exceptions.ServiceUnavailable, match="does not answer"):
        _submit(runtime, "down", TGI)


# ------------------------------------------------------------ the daemons
def test_daemon_gateway_in_front_of_a_real_async_endpoint(
    manager: LocalPlatform, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processes `twinserve endpoint create --async` starts: replica, router, job service, gateway."""
    config = EndpointConfig.model_validate(
        {
            "name": "twin",
            "api_key": KEY,
            "startup_timeout_s": 240,
            "drain_timeout_s": 2,
            "variants": [{"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "threads": 1}],
            "async": {},
        }
    )
    monkeypatch.setenv("TWINSERVE_GATEWAY_PORT", str(free_port()))
    manager.create(config, controller=False)
    try:
        url = gateway_url(manager.home)
        assert url is not None
        out = _submit(_runtime(url, secret=KEY), "twin", TGI, InferenceId="gw-daemon")
        assert _stored(out["OutputLocation"])[0]["generated_text"]
    finally:
        manager.delete("twin")
