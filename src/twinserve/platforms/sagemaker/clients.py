"""boto3 clients of one platform object, and AWS errors in twinserve's terms.

A region's clients are made once and kept (a client costs milliseconds and holds a connection
pool); endpoints of one platform may live in different regions, so they are cached per region.
Every AWS call that changes something goes through `aws_step`, which names the step in the
error ("create_endpoint_config failed: …") and strips any secret from the message, since a
botocore parameter error quotes the value it refused.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from twinserve.errors import NotFoundError, ServerError, TwinserveError, ValidationError

if TYPE_CHECKING:
    import boto3

SERVICES = ("sagemaker", "s3", "sts", "secretsmanager", "logs", "application-autoscaling", "cloudwatch")
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{16,}")
REDACTED = "**********"
# AWS error codes the caller can act on (a bad parameter, a permission, a quota): 4xx for us
_CALLER_CODES = re.compile(
    r"ValidationException|ValidationError|AccessDenied.*|UnauthorizedOperation|ResourceLimitExceeded|"
    r"ResourceInUse|LimitExceeded.*|InvalidParameter.*|InvalidClientTokenId|ExpiredToken.*|"
    r"UnrecognizedClient.*|ConflictException|IllegalLocationConstraintException|InvalidBucketName"
)
_NOT_FOUND_CODES = re.compile(
    r"ResourceNotFound.*|NoSuchEntity|NoSuchBucket|NoSuchKey|NotFound|404|ObjectNotFound.*"
)


def configure_hint() -> str:
    return "configure credentials with `aws configure` (or AWS_PROFILE / AWS_ACCESS_KEY_ID)"


@dataclass
class AwsClients:
    """The boto3 session of a platform and its clients, one per (service, region)."""

    session: boto3.Session | None = None
    _clients: dict[tuple[str, str], Any] = field(default_factory=dict)

    def _session(self) -> boto3.Session:
        if self.session is None:
            import boto3

            self.session = boto3.Session()
        return self.session

    def default_region(self) -> str | None:
        """The session's region (AWS_REGION, AWS_DEFAULT_REGION, ~/.aws/config), if any."""
        return self._session().region_name or os.environ.get("AWS_REGION") or None

    def client(self, service: str, region: str) -> Any:
        key = (service, region)
        if key not in self._clients:
            from botocore.config import Config

            config = Config(retries={"mode": "adaptive", "max_attempts": 8}, user_agent_extra="twinserve")
            self._clients[key] = self._session().client(service, region_name=region, config=config)
        return self._clients[key]

    def region(self, name: str) -> Region:
        return Region(self, name)

    def account(self, region: str) -> str:
        """The caller's account id; ValidationError naming `aws configure` without credentials."""
        with aws_step("sts.get_caller_identity (checking AWS credentials)"):
            return str(self.client("sts", region).get_caller_identity()["Account"])


@dataclass(frozen=True)
class Region:
    """The clients of one region (what every step of an endpoint uses)."""

    clients: AwsClients
    name: str

    def __getattr__(self, attr: str) -> Any:
        # region.sagemaker, region.s3, region.logs, region.cloudwatch, region.secretsmanager,
        # region.application_autoscaling
        service = attr.replace("_", "-")
        if service not in SERVICES:
            raise AttributeError(attr)
        return self.clients.client(service, self.name)


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_gone(exc: BaseException) -> bool:
    """The thing an AWS call named does not exist ("already gone" for a delete)."""
    code = error_code(exc)
    if _NOT_FOUND_CODES.fullmatch(code):
        return True
    text = str(exc)
    # SageMaker says "ValidationException: Could not find model/endpoint/endpoint configuration …";
    # Application Auto Scaling "ValidationException: No scalable target/scaling policy found …"
    return code in ("ValidationException", "ValidationError") and (
        "Could not find" in text or "No scalable target" in text or "No scaling policy" in text
    )


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` without the given secrets nor anything shaped like a Hub token."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return HF_TOKEN_PATTERN.sub(REDACTED, text)


@contextlib.contextmanager
def aws_step(step: str, *, secrets: tuple[str, ...] = ()) -> Iterator[None]:
    """Run one AWS step; its failure becomes a twinserve error that names the step.

    NoCredentialsError → ValidationError naming `aws configure`; an AWS error code the caller
    can act on → ValidationError, a missing thing → NotFoundError, anything else → ServerError.
    Secrets are stripped from the message, and then the original is not chained (its text
    would carry them into a traceback).
    """
    try:
        yield
    except TwinserveError:
        raise
    except Exception as exc:
        _translate(step, exc, secrets)


def _translate(step: str, exc: Exception, secrets: tuple[str, ...]) -> NoReturn:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        raise ValidationError(f"{step} failed: no AWS credentials found; {configure_hint()}") from exc
    if isinstance(exc, NoRegionError):
        raise ValidationError(f"{step} failed: no AWS region; give --region or set AWS_REGION") from exc
    if not isinstance(exc, ClientError | BotoCoreError):
        raise exc
    raw = str(exc)
    message = f"{step} failed: {redact(raw, secrets)}"
    cause = None if redact(raw, secrets) != raw else exc
    code = error_code(exc)
    error: TwinserveError
    if isinstance(exc, ClientError) and is_gone(exc):
        error = NotFoundError(message)
    elif isinstance(exc, ClientError) and _CALLER_CODES.fullmatch(code):
        error = ValidationError(message)
        if code.startswith(("InvalidClientTokenId", "ExpiredToken", "UnrecognizedClient")):
            error = ValidationError(f"{message}; {configure_hint()}")
    elif not isinstance(exc, ClientError):  # botocore's own: a parameter refused, a connection lost
        error = ValidationError(message) if "Parameter validation" in raw else ServerError(message)
    else:
        error = ServerError(message)
    raise error from cause


def tolerate_gone(step: str, call: Any, /, **params: Any) -> bool:
    """Run a delete; False (no error) when the thing is already gone."""
    from botocore.exceptions import ClientError

    try:
        with aws_step(step):
            try:
                call(**params)
            except ClientError as exc:
                if is_gone(exc):
                    return False
                raise
    except NotFoundError:
        return False
    return True
