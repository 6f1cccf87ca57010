"""`LLMClient.submit_async` and `AsyncInvocation`, over both transports.

HTTP: a real async endpoint in threads (router → job service with its worker → tiny-model
replica; `tests.async_stack`). SageMaker: the same endpoint through the local gateway with the
real boto3 client (inline `Body`, results read from the `file://` locations), and on moto for
what only AWS does (the body uploaded to an S3 prefix, status from the output/failure objects).
With greedy decoding and `ignore_eos`, an async answer must equal the synchronous one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from moto import mock_aws

from tests.async_stack import AsyncStack, async_stack
from tests.servers import ThreadServer, asgi_in_thread, serve_config, thread_server
from twinserve.client import AsyncInvocation, AsyncState, LLMClient, SageMakerTransport
from twinserve.deploy.state import StateStore
from twinserve.errors import NotFoundError, RequestTimeoutError, ValidationError
from twinserve.platforms.local.gateway.app import create_gateway_app
from twinserve.platforms.local.router.app import create_router_app
from twinserve.platforms.local.router.pool import ReplicaPool, ReplicaSpec
from twinserve.server.process import free_port

K = 5
PARAMS = {"max_new_tokens": K, "ignore_eos": True}
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "hello there"}]
TOO_LONG = "word " * 400  # over the replica's max_input_tokens: it answers 422 when the job runs


@dataclass
class Setup:
    replica: ThreadServer
    twin: AsyncStack
    zero: AsyncStack  # no healthy replica: jobs stay queued
    ttl: AsyncStack  # the same, for the expiry test alone
    realtime: str  # a router without a job service
    gateway: str


@pytest.fixture(scope="module")
def setup(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    home = tmp_path_factory.mktemp("async-client")
    store = StateStore(home / "endpoints" / "state.db")
    nowhere = f"http://127.0.0.1:{free_port()}"
    with (
        thread_server(serve_config(model_dir)) as replica,
        async_stack(store, home, "twin", replica.url) as twin,
        async_stack(store, home, "zero", nowhere) as zero,
        async_stack(store, home, "ttl", nowhere) as ttl,
        asgi_in_thread(create_router_app(ReplicaPool([ReplicaSpec(id="r", url=replica.url)]))) as realtime,
        asgi_in_thread(create_gateway_app(store)) as gateway,
    ):
        yield Setup(replica, twin, zero, ttl, realtime, gateway)


@pytest.fixture(params=["tgi", "openai"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _same(got: Any, want: Any) -> None:
    assert got.text == want.text and got.text
    assert (got.finish_reason, got.generated_tokens) == (want.finish_reason, want.generated_tokens)


# ---------------------------------------------------------------- HTTP transport
def test_prompt_and_messages_answer_as_the_sync_calls(setup: Setup, api: str) -> None:
    with (
        LLMClient(setup.twin.url, api=api, **PARAMS) as llm,  # type: ignore[arg-type]
        LLMClient(setup.replica.url, api=api, **PARAMS) as direct,  # type: ignore[arg-type]
    ):
        generated = llm.submit_async(PROMPT)
        chatted = llm.submit_async(messages=MESSAGES)
        assert isinstance(generated, AsyncInvocation) and generated.output_location
        assert generated.output_location.endswith(f"/{generated.inference_id}.out")
        result = generated.result(timeout=120, poll_interval=0.05)
        _same(result, direct.generate(PROMPT))
        assert result.request_id == generated.inference_id  # the worker's x-request-id
        _same(chatted.result(timeout=120, poll_interval=0.05), direct.chat(MESSAGES))
        status = generated.status()
        assert status.status is AsyncState.SUCCEEDED and status.attempts == 1
        assert status.created_at and status.finished_at and status.finished_at >= status.created_at


def test_a_body_or_an_input_location_is_read_by_its_answers_shape(setup: Setup) -> None:
    tgi_body = {"inputs": PROMPT, "parameters": PARAMS}  # /invocations: the prompt is in the text
    inputs = setup.twin.settings.input_roots[0]
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "chat.json").write_text(json.dumps({"messages": MESSAGES, "max_tokens": K, "ignore_eos": True}))
    with LLMClient(setup.twin.url) as llm, LLMClient(setup.replica.url, **PARAMS) as direct:
        got = llm.submit_async(body=tgi_body).result(timeout=120, poll_interval=0.05)
        assert got.text == PROMPT + direct.generate(PROMPT).text
        located = llm.submit_async(input_location=(inputs / "chat.json").as_uri())
        _same(located.result(timeout=120, poll_interval=0.05), direct.chat(MESSAGES))


def test_a_given_inference_id_is_one_job(setup: Setup) -> None:
    with LLMClient(setup.zero.url, **PARAMS) as llm:
        first = llm.submit_async(PROMPT, inference_id="client-once", request_ttl_s=600)
        again = llm.submit_async(PROMPT, inference_id="client-once")
    assert first == again and first.inference_id == "client-once"
    job = setup.zero.queue.get("client-once")
    assert job.ttl_s == 600 and json.loads(job.body or b"")["parameters"]["return_full_text"] is False


def test_status_while_queued_and_a_result_that_times_out(setup: Setup) -> None:
    with LLMClient(setup.zero.url, **PARAMS) as llm:
        job = llm.submit_async(messages=MESSAGES)
        status = job.status()
        assert (status.status, status.attempts, status.started_at) == (AsyncState.QUEUED, 0, None)
        assert not status.status.is_final
        with pytest.raises(TimeoutError, match=job.inference_id):
            job.result(timeout=0.2, poll_interval=0.05)


def test_a_failed_job_raises_its_error(setup: Setup) -> None:
    with LLMClient(setup.twin.url, **PARAMS) as llm:
        job = llm.submit_async(TOO_LONG)
        with pytest.raises(ValidationError) as caught:
            job.result(timeout=120, poll_interval=0.05)
    assert f"inference_id: {job.inference_id}" in caught.value.__notes__
    assert job.status().status is AsyncState.FAILED


def test_an_expired_job_raises_a_timeout_error(setup: Setup) -> None:
    with LLMClient(setup.ttl.url, **PARAMS) as llm:
        job = llm.submit_async(PROMPT, request_ttl_s=1)
        # the next lease after its TTL expires it (as the worker's would, once a replica runs)
        setup.ttl.queue.lease(
            "ttl", "test", visibility_timeout_s=5, now=datetime.now(UTC) + timedelta(seconds=5)
        )
        with pytest.raises(RequestTimeoutError, match="expired"):
            job.result(timeout=60, poll_interval=0.05)
        assert job.status().status is AsyncState.EXPIRED


def test_submit_refusals(setup: Setup) -> None:
    with LLMClient(setup.twin.url, **PARAMS) as llm:
        with pytest.raises(ValueError, match="exactly one"):
            llm.submit_async()
        with pytest.raises(ValueError, match="exactly one"):
            llm.submit_async(PROMPT, messages=MESSAGES)
        with pytest.raises(ValueError, match="the parameters are in the body"):
            llm.submit_async(body={"inputs": "x"}, temperature=0.5)
        with pytest.raises(ValidationError, match="needs `inputs`"):  # the job service's check
            llm.submit_async(body={"text": "x"})
        with pytest.raises(ValidationError, match="inference"):
            llm.submit_async(PROMPT, inference_id="not/an id")
    with LLMClient(setup.realtime) as llm, pytest.raises(NotFoundError, match="real-time only"):
        llm.submit_async(PROMPT)


def test_the_async_api(setup: Setup) -> None:
    async def main() -> tuple[Any, Any]:
        async with LLMClient(setup.twin.url, api="openai", **PARAMS) as llm:
            jobs = await asyncio.gather(llm.asubmit_async(PROMPT), llm.asubmit_async(messages=MESSAGES))
            assert (await jobs[0].astatus()).inference_id == jobs[0].inference_id
            results = await asyncio.gather(*(j.aresult(timeout=120, poll_interval=0.05) for j in jobs))
            return results[0], results[1]

    completion, chat = asyncio.run(main())
    with LLMClient(setup.replica.url, api="openai", **PARAMS) as direct:
        _same(completion, direct.generate(PROMPT))
        _same(chat, direct.chat(MESSAGES))


# ---------------------------------------------------------------- SageMaker, local gateway
def _session() -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id="AKIDLOCAL", aws_secret_access_key="any-secret", region_name="eu-west-1"
    )


def test_sagemaker_transport_through_the_local_gateway(setup: Setup, api: str) -> None:
    transport = SageMakerTransport("twin", endpoint_url=setup.gateway, session=_session())
    with (
        LLMClient(transport=transport, api=api, **PARAMS) as llm,  # type: ignore[arg-type]
        LLMClient(setup.replica.url, api=api, **PARAMS) as direct,  # type: ignore[arg-type]
    ):
        job = llm.submit_async(messages=MESSAGES, inference_id=f"sm-local-{api}")
        generated = llm.submit_async(PROMPT)
        assert job.inference_id == f"sm-local-{api}" and (job.output_location or "").startswith("file://")
        _same(job.result(timeout=120, poll_interval=0.05), direct.chat(MESSAGES))
        _same(generated.result(timeout=120, poll_interval=0.05), direct.generate(PROMPT))
        status = job.status()  # from the objects alone: no attempts, no created_at
        assert status.status is AsyncState.SUCCEEDED and status.finished_at and status.attempts is None
        with pytest.raises(ValidationError):
            llm.submit_async(TOO_LONG).result(timeout=120, poll_interval=0.05)
    with (
        LLMClient(
            transport=SageMakerTransport("nope", endpoint_url=setup.gateway, session=_session())
        ) as llm,
        pytest.raises(NotFoundError),
    ):
        llm.submit_async(PROMPT)


# ---------------------------------------------------------------- SageMaker, moto
MOTO_RESULTS = "http://motoapi.amazonaws.com/moto-api/static/sagemaker/async-endpoint-results"


def _moto_results(*results: dict[str, Any]) -> None:
    """What moto's InvokeEndpointAsync writes to S3 next, in order (it runs no model)."""
    reply = requests.post(MOTO_RESULTS, json={"region": "eu-west-1", "results": list(results)}, timeout=10)
    assert reply.status_code == 201


@pytest.fixture
def aws() -> Iterator[Any]:
    with mock_aws():
        s3 = _session().client("s3")
        s3.create_bucket(Bucket="inputs", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        yield s3


def test_sagemaker_transport_on_moto(aws: Any) -> None:
    answer = [
        {"generated_text": " jumps over", "details": {"finish_reason": "length", "generated_tokens": 2}}
    ]
    _moto_results(
        {"data": json.dumps(answer)},
        {
            "is_failure": True,
            "data": json.dumps({"error": "Input validation error", "error_type": "validation"}),
        },
        {"data": json.dumps(answer)},
    )
    transport = SageMakerTransport(
        "twin", session=_session(), async_input_location="s3://inputs/async/", s3_client=aws
    )
    with LLMClient(transport=transport, max_new_tokens=2) as llm:
        job = llm.submit_async(PROMPT, inference_id="moto-1", invocation_timeout_s=60)
        result = job.result(timeout=30, poll_interval=0.05)
        assert (result.text, result.generated_tokens) == (" jumps over", 2)
        # the body went to the prefix first: InvokeEndpointAsync named it by InputLocation
        (uploaded,) = aws.list_objects_v2(Bucket="inputs", Prefix="async/")["Contents"]
        assert uploaded["Key"].startswith("async/moto-1-")
        body = json.loads(aws.get_object(Bucket="inputs", Key=uploaded["Key"])["Body"].read())
        assert body == {
            "inputs": PROMPT,
            "parameters": {"details": True, "max_new_tokens": 2, "return_full_text": False},
        }

        failed = llm.submit_async(messages=MESSAGES)
        assert failed.status().status is AsyncState.FAILED
        with pytest.raises(ValidationError, match="Input validation error"):
            failed.result(timeout=30)

        pending = llm.submit_async(PROMPT)  # until its object is in S3 (here: deleted again), pending
        bucket, key = (pending.output_location or "").removeprefix("s3://").split("/", 1)
        aws.delete_object(Bucket=bucket, Key=key)
        assert pending.status().status is AsyncState.PENDING
        with pytest.raises(TimeoutError, match=pending.inference_id):
            pending.result(timeout=0.2, poll_interval=0.05)


def test_sagemaker_transport_needs_an_s3_prefix() -> None:
    with pytest.raises(ValidationError, match="s3://"):
        SageMakerTransport("twin", session=_session(), async_input_location="/tmp/inputs")
