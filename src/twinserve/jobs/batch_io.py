"""Where a batch job's inputs come from and its answers go: a file, a folder, or s3://.

S3 inputs are downloaded into the job's folder before they are read (once: a resumed job
reads the same bytes its checkpoint counted), S3 outputs are written there first and
uploaded as each input file is done, so resuming works the same for both. boto3 is
imported only for s3:// locations (`jobs.s3.s3_client`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twinserve.errors import NotFoundError, ValidationError
from twinserve.jobs.batch_spec import TransformJobConfig, is_s3, local_path
from twinserve.jobs.checkpoints import JobDir


@dataclass(frozen=True)
class InputFile:
    """One input file: the name its answers are named after, and where to read it."""

    name: str
    path: Path
    s3_key: str | None = None


def _split(location: str) -> tuple[str, str]:
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValidationError(f"{location!r} names no bucket")
    return bucket, prefix


def list_inputs(cfg: TransformJobConfig, job: JobDir) -> list[InputFile]:
    """The job's input files in name order (NotFoundError when there are none)."""
    if is_s3(cfg.input):
        return _s3_inputs(cfg.input, job)
    path = local_path(cfg.input)
    if path.is_file():
        return [InputFile(path.name, path)]
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
        if not files:
            raise NotFoundError(f"input folder {path} holds no files")
        return [InputFile(p.name, p) for p in files]
    raise NotFoundError(f"input {path} does not exist")


def _s3_inputs(location: str, job: JobDir) -> list[InputFile]:
    from twinserve.jobs.s3 import s3_client, translate

    bucket, prefix = _split(location)
    client = s3_client()
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    except Exception as exc:
        raise translate(exc, f"listing {location}", caller_fault=True) from exc
    if not keys:
        raise NotFoundError(f"no objects under {location}")
    folder = job.path / "input"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for key in sorted(keys):
        name = key.rsplit("/", 1)[-1]
        target = folder / name
        if not target.exists():  # downloaded once: the checkpoint counts these bytes
            tmp = target.with_name(f".{name}.part")
            try:
                client.download_file(bucket, key, str(tmp))
            except Exception as exc:
                raise translate(exc, f"reading s3://{bucket}/{key}", caller_fault=True) from exc
            tmp.replace(target)
        out.append(InputFile(name, target, key))
    return out


def output_dir(cfg: TransformJobConfig, job: JobDir) -> Path:
    return job.staging if is_s3(cfg.output) else local_path(cfg.output)


def publish(cfg: TransformJobConfig, paths: list[Path]) -> None:
    """Upload finished answer files to an s3:// output (nothing to do for a folder)."""
    if not is_s3(cfg.output):
        return
    from twinserve.jobs.s3 import s3_client, translate

    bucket, prefix = _split(cfg.output)
    client = s3_client()
    for path in paths:
        if not path.exists():
            continue
        key = f"{prefix.rstrip('/')}/{path.name}" if prefix else path.name
        try:
            client.upload_file(str(path), bucket, key)
        except Exception as exc:
            raise translate(exc, f"writing s3://{bucket}/{key}") from exc


def check_output_writable(cfg: TransformJobConfig) -> None:
    """ValidationError when a local output folder cannot be created or written."""
    if is_s3(cfg.output):
        return
    path = local_path(cfg.output)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".twinserve-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValidationError(f"output {path} is not writable: {exc.strerror or exc}") from exc
