"""Names of what the platform creates, checked as SageMaker checks them, before any AWS call.

SageMaker names (endpoints, endpoint configs, models, variants) are at most 63 characters of
`^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$`, unique per account and region. Ours derive from the
endpoint name, the config generation and the variant, so every generation gets new ones
(blue/green needs the old model and config alive while the new ones start); a name that
would be too long keeps its start and ends in a short hash of the whole, so it stays unique
and stable.
"""

from __future__ import annotations

import hashlib
import re

from twinserve.errors import ValidationError

MAX_NAME = 63
_SAGEMAKER_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_ECR_IMAGE = re.compile(
    r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[a-z0-9][a-z0-9._/-]*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})?$"
)
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_SECRET_ARN = re.compile(r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[\w/+=.@-]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_name(name: str, what: str) -> str:
    if not _SAGEMAKER_NAME.fullmatch(name):
        raise ValidationError(
            f"{what} {name!r} is not a valid SageMaker name (≤ {MAX_NAME} letters, digits and '-', "
            "starting and ending with a letter or digit)"
        )
    return name


def fit(name: str) -> str:
    """`name` if it fits 63 characters, else its first 54 and an 8-hex hash of the whole."""
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"


def model_name(endpoint: str, generation: int, variant: str) -> str:
    return check_name(fit(f"{endpoint}-g{generation}-{variant}"), "model name")


def endpoint_config_name(endpoint: str, generation: int) -> str:
    return check_name(fit(f"{endpoint}-g{generation}"), "endpoint config name")


def rollback_alarm_names(endpoint: str, variant: str) -> tuple[str, str]:
    """The CloudWatch alarms an update's auto-rollback watches: 5xx errors, model latency."""
    return f"{endpoint}-{variant}-5xx-errors", f"{endpoint}-{variant}-model-latency"


def check_image(image: str) -> str:
    if not _ECR_IMAGE.fullmatch(image):
        raise ValidationError(
            f"image {image!r} is not an ECR image URI (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG); "
            "SageMaker pulls containers from Amazon ECR",
            param="platform.sagemaker.image",
        )
    return image


def check_role(arn: str | None) -> str:
    """The execution role ARN; ValidationError when none is given or it is malformed."""
    if not arn:
        raise ValidationError(
            "SageMaker needs an execution role: give --role-arn arn:aws:iam::ACCOUNT:role/NAME "
            "(or set SAGEMAKER_ROLE_ARN); docs/sagemaker.md shows the role to create",
            param="platform.sagemaker.role_arn",
        )
    if not _ROLE_ARN.fullmatch(arn):
        raise ValidationError(
            f"role {arn!r} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
            param="platform.sagemaker.role_arn",
        )
    return arn


def check_secret_arn(arn: str) -> str:
    if not _SECRET_ARN.fullmatch(arn):
        raise ValidationError(
            f"{arn!r} is not a Secrets Manager secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME)",
            param="platform.sagemaker.hf_token_secret",
        )
    return arn


def check_bucket(bucket: str) -> str:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValidationError(
            f"{bucket!r} is not a valid S3 bucket name", param="platform.sagemaker.model_data_bucket"
        )
    return bucket


def check_s3_uri(uri: str, param: str) -> str:
    """`uri` if it is s3://BUCKET[/PREFIX] with a valid bucket name (SageMaker writes there)."""
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if not uri.startswith("s3://") or not _BUCKET.fullmatch(bucket) or ".." in bucket or len(uri) > 512:
        raise ValidationError(
            f"{param} is {uri!r}; SageMaker writes async results to S3: give s3://BUCKET/PREFIX "
            "(at most 512 characters)",
            param=param,
        )
    return uri
