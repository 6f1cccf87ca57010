"""A registry version's files in S3, uploaded once: `s3://{bucket}/{prefix}/{content_sha256}/`.

SageMaker reads uncompressed model data straight from an S3 prefix (`ModelDataSource`
S3Prefix, CompressionType None) into `/opt/ml/model`: no tarball to build, and a 16 GB model
starts as fast as S3 streams. The prefix is named by the version's content hash, so every
endpoint, generation and re-deploy of the same weights shares one copy and a re-deploy
uploads nothing. A marker object, written after the last file, says the copy is complete
(an upload killed half-way is redone, never used); it sits beside the prefix, not in it,
so it is not downloaded into the container. It holds the manifest: the same weights with
other files (a tokenizer, a chat template) go to a prefix of their own.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from twinserve.errors import ValidationError
from twinserve.platforms.sagemaker.clients import aws_step, error_code
from twinserve.registry.versions import VersionInfo

Progress = Callable[[str], None]
MARKER_SUFFIX = ".twinserve-complete.json"
_REPORT_EVERY = 0.1  # progress every 10% of the bytes


class ModelData(BaseModel):
    """Where a variant's weights are in S3."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str = Field(description="S3 bucket.")
    prefix: str = Field(description="Key prefix of the files, ending in '/'.")
    total_bytes: int = Field(ge=0, description="Bytes of all files.")

    @property
    def s3_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def marker_key(self) -> str:
        return self.prefix.rstrip("/") + MARKER_SUFFIX

    def model_data_source(self) -> dict[str, Any]:
        """CreateModel's PrimaryContainer.ModelDataSource for these files."""
        return {"S3DataSource": {"S3Uri": self.s3_uri, "S3DataType": "S3Prefix", "CompressionType": "None"}}


def manifest_digest(info: VersionInfo) -> str:
    """sha256 over every file's digest: what the marker records and compares."""
    files = {path: entry.sha256 for path, entry in sorted(info.manifest.files.items())}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def locate(info: VersionInfo, bucket: str, prefix: str) -> ModelData:
    """Where `info`'s files go (nothing is read or written)."""
    key = f"{prefix.strip('/')}/{info.content_sha256}/" if prefix.strip("/") else f"{info.content_sha256}/"
    return ModelData(bucket=bucket, prefix=key, total_bytes=info.manifest.total_bytes)


def ensure_bucket(s3: Any, bucket: str, region: str, progress: Progress) -> None:
    """Create `bucket` in `region` unless it exists (and is ours to use)."""
    from botocore.exceptions import ClientError

    with aws_step(f"s3.head_bucket {bucket}"):
        try:
            s3.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if error_code(exc) in ("403", "AccessDenied", "Forbidden"):
                raise ValidationError(
                    f"S3 bucket {bucket!r} exists but this account cannot use it (another account's?); "
                    "set platform.sagemaker.model_data_bucket to a bucket of yours"
                ) from exc
            if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
    progress(f"creating S3 bucket {bucket} in {region}")
    params: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # us-east-1 refuses its own name as a LocationConstraint
        params["CreateBucketConfiguration"] = {"LocationConstraint": region}
    with aws_step(f"s3.create_bucket {bucket}"):
        s3.create_bucket(**params)


def is_uploaded(s3: Any, data: ModelData, info: VersionInfo) -> bool:
    """The marker exists and names the same files."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=data.bucket, Key=data.marker_key)["Body"].read()
    except ClientError as exc:
        if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
            return False
        with aws_step(f"s3.get_object {data.marker_key}"):
            raise
    try:
        return bool(json.loads(body).get("manifest_sha256") == manifest_digest(info))
    except ValueError:
        return False


def upload(s3: Any, data: ModelData, info: VersionInfo, progress: Progress) -> ModelData:
    """Upload `info`'s files to `data` unless already there; returns where they are.

    The registry resolves (and verifies against the recorded hashes) the version's folder only
    when something must be uploaded. Same weights with other files: a prefix of their own.
    """
    if is_uploaded(s3, data, info):
        progress(f"model data already in {data.s3_uri} (content-addressed): nothing to upload")
        return data
    if _marker_exists(s3, data):  # same weights, other tokenizer or config: do not overwrite
        data = data.model_copy(update={"prefix": f"{data.prefix.rstrip('/')}-{manifest_digest(info)[:12]}/"})
        if is_uploaded(s3, data, info):
            progress(f"model data already in {data.s3_uri}: nothing to upload")
            return data
    from twinserve.registry.store import ModelRegistry

    progress(f"verifying models:/{info.name}/{info.version} against the hashes recorded at import")
    folder = ModelRegistry().resolve(f"models:/{info.name}/{info.version}").path
    progress(f"uploading models:/{info.name}/{info.version} ({_size(data.total_bytes)}) to {data.s3_uri}")
    counter = _Counter(data.total_bytes, progress)
    for rel, entry in sorted(info.manifest.files.items()):
        with aws_step(f"uploading {rel} to {data.s3_uri}"):
            s3.upload_file(
                str(folder / rel),
                data.bucket,
                data.prefix + rel,
                ExtraArgs={"Metadata": {"sha256": entry.sha256}},
                Callback=counter,
            )
    marker = {
        "model": f"models:/{info.name}/{info.version}",
        "content_sha256": info.content_sha256,
        "manifest_sha256": manifest_digest(info),
        "files": {p: e.model_dump() for p, e in sorted(info.manifest.files.items())},
    }
    with aws_step(f"s3.put_object {data.marker_key}"):  # last: the copy is complete
        s3.put_object(
            Bucket=data.bucket,
            Key=data.marker_key,
            Body=json.dumps(marker).encode(),
            ContentType="application/json",
        )
    progress(f"uploaded {_size(data.total_bytes)} to {data.s3_uri}")
    return data


def _marker_exists(s3: Any, data: ModelData) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=data.bucket, Key=data.marker_key)
    except ClientError:
        return False
    return True


class _Counter:
    """boto3's transfer callback (bytes per chunk, from several threads) as progress lines."""

    def __init__(self, total: int, progress: Progress) -> None:
        self.total, self.done, self.next, self.progress = total, 0, _REPORT_EVERY, progress
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            if not self.total or self.done / self.total < self.next:
                return
            while self.done / self.total >= self.next:
                self.next += _REPORT_EVERY
            done = self.done
        self.progress(f"uploaded {_size(done)} / {_size(self.total)} ({done / self.total:.0%})")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
