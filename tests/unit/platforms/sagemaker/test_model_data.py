"""A registry version's files go to S3 once, content-addressed; a re-deploy uploads nothing."""

from __future__ import annotations

import boto3
import pytest

from tests.unit.platforms.sagemaker.conftest import ACCOUNT, Calls, sm_config
from twinserve.platforms.sagemaker.model_data import MARKER_SUFFIX
from twinserve.platforms.sagemaker.platform import SageMakerPlatform


def _objects(session: boto3.Session, bucket: str) -> dict[str, str]:
    listing = session.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listing}


def test_uploaded_once_then_reused(platform: SageMakerPlatform, calls: Calls, session: boto3.Session) -> None:
    said: list[str] = []
    ep = platform.create(sm_config(), progress=said.append)
    bucket = f"sagemaker-us-east-1-{ACCOUNT}"
    pinned = ep.config.variants[0].pinned
    assert pinned is not None and pinned.content_sha256 is not None
    prefix = f"twinserve/models/{pinned.content_sha256}/"
    first = _objects(session, bucket)
    files = {k for k in first if k.startswith(prefix)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {k.removeprefix(prefix) for k in files}
    puts = calls.params("PutObject")
    assert puts[-1]["Key"] == prefix.rstrip("/") + MARKER_SUFFIX  # the marker is written last
    assert not any(k.endswith(MARKER_SUFFIX) for k in files)  # and not inside the prefix
    assert any("(100%)" in line for line in said)
    head = session.client("s3").head_object(Bucket=bucket, Key=prefix + "model.safetensors")
    sha = pinned.content_sha256  # one shard: the weights' hash is the file's
    assert head["Metadata"]["sha256"] == sha

    # another endpoint of the same version, and a re-create: nothing is uploaded again
    n = len(puts)
    said.clear()
    platform.create(sm_config(name="twin-b"), progress=said.append)
    platform.delete("twin")
    platform.create(sm_config(), progress=said.append)
    assert len(calls.params("PutObject")) == n
    assert "CreateBucket" not in calls.names()[calls.names().index("CreateBucket") + 1 :]
    assert _objects(session, bucket) == first
    assert sum("nothing to upload" in line for line in said) == 2
    uris = {
        m["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]["S3Uri"] for m in calls.params("CreateModel")
    }
    assert uris == {f"s3://{bucket}/{prefix}"}


def test_an_interrupted_upload_is_redone(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    ep = platform.create(sm_config())
    pinned = ep.config.variants[0].pinned
    assert pinned is not None
    bucket = f"sagemaker-us-east-1-{ACCOUNT}"
    marker = f"twinserve/models/{pinned.content_sha256}{MARKER_SUFFIX}"
    session.client("s3").delete_object(Bucket=bucket, Key=marker)  # as if killed before the end
    n = len(calls.params("PutObject"))
    platform.create(sm_config(name="twin-b"))
    assert len(calls.params("PutObject")) > n
    session.client("s3").head_object(Bucket=bucket, Key=marker)


def test_own_bucket_in_another_region(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    ep = platform.create(
        sm_config(region="eu-west-1", model_data_bucket="my-models", model_data_prefix="llm/")
    )
    assert ep.resources["model_data.primary"].startswith("s3://my-models/llm/")
    (create,) = calls.params("CreateBucket")
    assert create == {"Bucket": "my-models", "CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"}}
    assert ep.url is not None and ".eu-west-1." in ep.url
    assert platform.delete("twin")


@pytest.mark.parametrize("code", ["403"])
def test_a_bucket_of_another_account_is_refused(platform: SageMakerPlatform, calls: Calls, code: str) -> None:
    from tests.unit.platforms.sagemaker.conftest import client_error
    from twinserve.errors import ValidationError

    calls.answer("HeadBucket", lambda _: client_error(code, "Forbidden", "HeadBucket"))
    with pytest.raises(ValidationError, match="exists but this account cannot use it"):
        platform.create(sm_config(model_data_bucket="someone-elses"))
    assert "CreateModel" not in calls.names()
