"""Fixtures of the SageMaker platform tests: moto, a tiny registered model, call recorders.

moto plays AWS (SageMaker, S3, STS, Secrets Manager, CloudWatch, Logs, Application Auto
Scaling) in-process; what it lacks or does not check is handled on the real botocore client:
`Calls` records the exact parameters of each call (`before-parameter-build`), `Calls.answer`
short-circuits an operation with a reply or an error (`before-call`, as botocore's Stubber
does), and `Calls.patch_reply` edits moto's reply (`after-call`), e.g. to report Failed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from twinserve.deploy.spec import EndpointConfig
from twinserve.deploy.state import StateStore
from twinserve.platforms.sagemaker.platform import SageMakerPlatform
from twinserve.registry.store import ModelRegistry

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerExecution"
MODEL = "models:/tiny-llm@champion"
HF_SECRET_TOKEN = "hf_SeCrEtT0kenNeverPrinted0123456789abcd"
HUB_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    """`tiny-llm` v1 (alias champion) and v2 (other weights) in a registry of their own."""
    from tests.factories import tiny_llama_dir

    root = tmp_path_factory.mktemp("sm-registry")
    registry = ModelRegistry(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"))
    v1 = registry.import_model("tiny-llm", tiny_llama_dir(root / "m1", seed=0))
    registry.import_model("tiny-llm", tiny_llama_dir(root / "m2", seed=1))
    registry.set_alias("tiny-llm", "champion", v1.version)
    return registry


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tiny_registry: ModelRegistry, tmp_path: Path) -> Iterator[None]:
    """Fake credentials, us-east-1, moto on, the tiny registry, an offline Hub cache."""
    import huggingface_hub.constants as hf_constants

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "TWINSERVE_REGISTRY_URI": tiny_registry.location.uri,
        "TWINSERVE_REGISTRY_ARTIFACTS": tiny_registry.location.artifact_location or "",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("SAGEMAKER_ROLE_ARN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    # the Hub is out of reach: hub models resolve from a cache the test fills
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with mock_aws():
        yield


@pytest.fixture
def session(aws: None) -> boto3.Session:
    return boto3.Session(region_name=REGION)


@pytest.fixture
def platform(session: boto3.Session, tmp_path: Path) -> SageMakerPlatform:
    return SageMakerPlatform(StateStore(tmp_path / "state.db"), session=session, poll_interval_s=0)


class Calls:
    """Every AWS call a session's clients make, with its exact parameters, in order.

    A client copies the session's event handlers when it is made: handlers added later go
    to the session (for clients still to come) and to each client the platform already has.
    """

    def __init__(self, session: boto3.Session, platform: SageMakerPlatform) -> None:
        self.session, self.platform = session, platform
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._answers: dict[str, Callable[[dict[str, Any]], Any] | None] = {}
        self._register("before-parameter-build", self._record)

    def _register(self, event: str, handler: Callable[..., Any]) -> None:
        self.session.events.register(event, handler)
        for client in self.platform.clients._clients.values():
            client.meta.events.register(event, handler)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.calls.append((model.name, json.loads(json.dumps(params, default=str))))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def params(self, operation: str) -> list[dict[str, Any]]:
        return [p for name, p in self.calls if name == operation]

    def mutating(self) -> list[str]:
        """Operations that create, change or delete something on AWS."""
        verbs = ("Create", "Put", "Register", "Update", "Delete", "Deregister", "Upload")
        return [n for n in self.names() if n.startswith(verbs)]

    def answer(self, operation: str, reply: Callable[[dict[str, Any]], Any] | None) -> None:
        """Answer `operation` with `reply(kwargs)`: a dict (the parsed reply), an exception to
        raise, or None to let moto answer; a later answer for the operation replaces this one."""
        first = operation not in self._answers
        self._answers[operation] = reply

        def handler(**_: Any) -> Any:
            current = self._answers.get(operation)
            if current is None:
                return None
            result = current(self.params(operation)[-1])  # the call's own kwargs, recorded just before
            if isinstance(result, BaseException):
                raise result
            return None if result is None else (_Http(200), result)

        if first:
            self._register(f"before-call.*.{operation}", handler)

    def patch_reply(self, operation: str, change: Callable[[dict[str, Any]], None]) -> None:
        def handler(parsed: dict[str, Any], **_: Any) -> None:
            change(parsed)

        self._register(f"after-call.*.{operation}", handler)


class _Http:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.headers: dict[str, str] = {}
        self.content = b""


def client_error(code: str, message: str, operation: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


@pytest.fixture
def calls(session: boto3.Session, platform: SageMakerPlatform) -> Calls:
    return Calls(session, platform)


def sm_config(
    name: str = "twin",
    model: str = MODEL,
    *,
    replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    variants: list[dict[str, Any]] | None = None,
    asynchronous: dict[str, Any] | None = None,
    **settings: Any,
) -> EndpointConfig:
    """A SageMaker endpoint config; `asynchronous` is its `async:` block (None: real-time)."""
    sagemaker = {"role_arn": ROLE, "instance_type": "ml.g4dn.xlarge", **settings}
    data = {
        "name": name,
        "variants": variants or [{"model": model, "replicas": replicas}],
        "autoscaling": autoscaling,
        "platform": {"type": "sagemaker", "sagemaker": {k: v for k, v in sagemaker.items() if v is not None}},
    }
    if asynchronous is not None:
        data["async"] = {k: v for k, v in asynchronous.items() if v is not None}
    return EndpointConfig.model_validate(data)


def hub_model(tmp_path: Path, repo: str = "acme/big-llm", *, config: dict[str, Any] | None = None) -> str:
    """A Hub reference whose config.json sits in the (offline) Hub cache; Llama-3.1-70B's shape by default."""
    shape = config or {
        "hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
        "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    }  # fmt: skip
    snapshot = tmp_path / "hf-cache" / f"models--{repo.replace('/', '--')}" / "snapshots" / HUB_SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps(shape))
    return f"hf://{repo}@{HUB_SHA}"


SMALL_HUB_CONFIG = {
    "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
    "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192,
}  # fmt: skip


def emulate_update_endpoint(calls: Calls, *, roll_back: str | None = None) -> None:
    """moto has no UpdateEndpoint: play SageMaker's outcome on moto's endpoint.

    The update either lands (the endpoint runs the new config's variants) or, with
    `roll_back`, SageMaker rolls it back: the old config stays, with `roll_back` as FailureReason.
    """
    from moto.sagemaker.models import sagemaker_backends

    def reply(params: dict[str, Any]) -> dict[str, Any]:
        backend = sagemaker_backends[ACCOUNT][REGION]
        endpoint = backend.endpoints[params["EndpointName"]]
        if roll_back is None:
            config = backend.endpoint_configs[params["EndpointConfigName"]]
            endpoint.endpoint_config_name = params["EndpointConfigName"]
            endpoint.production_variants = endpoint._process_production_variants(config.production_variants)
            endpoint.failure_reason = None
        else:
            endpoint.failure_reason = roll_back
        return {"EndpointArn": endpoint.arn}

    calls.answer("UpdateEndpoint", reply)


def aws_inventory(session: boto3.Session) -> dict[str, list[str]]:
    """What exists on (moto's) AWS that an endpoint could own."""
    sm = session.client("sagemaker")
    aas = session.client("application-autoscaling")
    cw = session.client("cloudwatch")
    return {
        "models": [m["ModelName"] for m in sm.list_models()["Models"]],
        "endpoint_configs": [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]],
        "endpoints": [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]],
        "scalable_targets": [
            t["ResourceId"]
            for t in aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
        ],
        "scaling_policies": [
            p["PolicyName"]
            for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
        ],
        "alarms": [a["AlarmName"] for a in cw.describe_alarms()["MetricAlarms"]],
    }


NOTHING: dict[str, list[str]] = {
    "models": [], "endpoint_configs": [], "endpoints": [], "scalable_targets": [], "scaling_policies": [],
    "alarms": [],
}  # fmt: skip
