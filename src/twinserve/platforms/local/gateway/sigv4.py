"""Checking an AWS Signature Version 4 whose secret access key is an endpoint's API key.

SageMaker Runtime authenticates every call with SigV4, so boto3 signs whatever it sends. For
an endpoint with an `api_key`, the gateway takes that key as the *secret access key* (any
access key id will do) and accepts a request only if signing it again gives the same
signature: botocore's own `SigV4Auth` recomputes it from the request's method, path, query,
the headers it lists in `SignedHeaders` (with their received values), the SHA-256 of the body
received and its `X-Amz-Date`, and the two are compared in constant time. The key itself
never crosses the wire. A date more than `max_skew_s` away from now is refused (a captured
request cannot be replayed later), and so is an unsigned payload: the body must be covered.

botocore is imported on first use: it is only needed once an endpoint has a key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})\s*$"
)
_TIMESTAMP = "%Y%m%dT%H%M%SZ"
SERVICE = "sagemaker"  # the signing name in sagemaker-runtime's service model


class SignatureError(Exception):
    """Why a request's signature is refused; `code` is the AWS error code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SignedRequest:
    """What the signature covers, as received. `path` is the raw (still percent-encoded) path."""

    method: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return ",".join(values) if values else None


def verify(
    request: SignedRequest, secret: str, *, now: datetime | None = None, max_skew_s: float = 900
) -> None:
    """Return if `request` is signed with `secret`; raise SignatureError otherwise."""
    given = request.header("authorization")
    if not given:
        raise SignatureError("MissingAuthenticationTokenException", "Missing Authentication Token")
    match = _AUTH.match(given)
    if match is None:
        raise SignatureError(
            "IncompleteSignatureException", "Authorization is not an AWS4-HMAC-SHA256 signature"
        )
    access_key, date, region, service, terminator = _credential(match["credential"])
    amz_date = request.header("x-amz-date") or ""
    timestamp = _timestamp(amz_date, date)
    skew = abs(((now or datetime.now(UTC)) - timestamp).total_seconds())
    if skew > max_skew_s:
        raise SignatureError(
            "InvalidSignatureException", f"Signature expired: {amz_date} is {skew:.0f}s away"
        )
    if service != SERVICE or terminator != "aws4_request":
        raise SignatureError("InvalidSignatureException", f"Credential should be scoped to {SERVICE!r}")
    signed = match["signed"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        raise SignatureError("InvalidSignatureException", "SignedHeaders must include host and x-amz-date")
    declared = request.header("x-amz-content-sha256")
    if declared is not None and declared != hashlib.sha256(request.body).hexdigest():
        # UNSIGNED-PAYLOAD included: the body must be what was signed
        raise SignatureError("InvalidSignatureException", "X-Amz-Content-SHA256 does not match the body")
    expected, names = _signature(request, signed, secret, access_key, region, amz_date)
    if names != match["signed"] or not hmac.compare_digest(expected, match["signature"]):
        raise SignatureError(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key (the endpoint's API key) and signing method.",
        )


def _credential(credential: str) -> tuple[str, str, str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5:
        raise SignatureError(
            "IncompleteSignatureException", "Credential is not key/date/region/service/aws4_request"
        )
    return parts[0], parts[1], parts[2], parts[3], parts[4]


def _timestamp(amz_date: str, scope_date: str) -> datetime:
    try:
        timestamp = datetime.strptime(amz_date, _TIMESTAMP).replace(tzinfo=UTC)
    except ValueError:
        raise SignatureError("IncompleteSignatureException", "X-Amz-Date is missing or malformed") from None
    if amz_date[:8] != scope_date:
        raise SignatureError("InvalidSignatureException", "Credential date does not match X-Amz-Date")
    return timestamp


def _signature(
    request: SignedRequest, signed: list[str], secret: str, access_key: str, region: str, amz_date: str
) -> tuple[str, str]:
    """botocore's signature of the request as received, and the SignedHeaders it computed."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    host = request.header("host") or ""
    query = f"?{request.query}" if request.query else ""
    # http: botocore hashes the payload itself (over https it could skip that)
    aws = AWSRequest(method=request.method, url=f"http://{host}{request.path}{query}", data=request.body)
    wanted = set(signed)
    for name, value in request.headers:
        if name.lower() in wanted:
            aws.headers[name.lower()] = value  # HTTPHeaders: a repeated header is added, not replaced
    aws.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secret), SERVICE, region)
    canonical = signer.canonical_request(aws)
    signature = signer.signature(signer.string_to_sign(aws, canonical), aws)
    return signature, signer.signed_headers(signer.headers_to_sign(aws))
