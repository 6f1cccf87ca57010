"""Creating a SageMaker endpoint: generation 1, from checked input to InService (or nothing left).

```
prepare (no AWS) ─► credentials, no endpoint of that name on AWS, Hub token ─► Creating (names
recorded) ─► weights to S3 once ─► create_model per variant ─► create_endpoint_config (with
AsyncInferenceConfig for an `async:` endpoint) ─► create_endpoint ─► wait InService ─► autoscaling
─► InService
any failure, Ctrl-C included ─► teardown of what was recorded ─► Failed (reason) ─► raise
SageMaker says Failed ─► FailureReason + CloudWatch log tail in the reason; kept if keep_on_failure
```
`create(wait=False)` returns once the endpoint is being created and leaves the waiting and the
autoscaling to a detached `python -m twinserve.platforms.sagemaker.create finish NAME`.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from twinserve.deploy.lease import OperationHolder
from twinserve.deploy.platform import Progress, quiet
from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus
from twinserve.deploy.state import StateStore
from twinserve.errors import ConflictError, ModelLoadError, NotFoundError
from twinserve.platforms.sagemaker import autoscaling, model_data, resources, steps
from twinserve.platforms.sagemaker.clients import Region
from twinserve.platforms.sagemaker.images import log_group, runtime_url
from twinserve.platforms.sagemaker.prepare import Generation, prepare, settings_of
from twinserve.platforms.sagemaker.teardown import teardown

if TYPE_CHECKING:
    from twinserve.platforms.sagemaker.platform import SageMakerPlatform

PROVISION_S = 1800  # instances, image pull: before the container's own timeouts start


class EndpointFailedError(ModelLoadError):
    """SageMaker reported the endpoint Failed (the container did not start or pass its health check)."""

    error_type = "endpoint_failed"


def create(
    platform: SageMakerPlatform,
    config: EndpointConfig,
    *,
    wait: bool = True,
    progress: Progress = quiet,
    keep_on_failure: bool = False,
) -> Endpoint:
    """See `SageMakerPlatform.create`."""
    settings_of(config)
    with contextlib.suppress(NotFoundError):
        platform.store.get_endpoint(config.name)
        raise ConflictError(f"endpoint {config.name!r} already exists")
    gen = prepare(config, 1, default_region=platform.clients.default_region())
    for v in gen.variants:
        for note in v.sizing.notes:
            progress(note)
    region = platform.clients.region(gen.region)
    account = platform.clients.account(gen.region)
    if steps.describe_endpoint(region, gen.endpoint) is not None:
        raise ConflictError(
            f"a SageMaker endpoint named {gen.endpoint!r} already exists in {gen.region} (not one this "
            "twinserve state knows); delete it there or choose another name"
        )
    token = steps.read_token(region, gen.token_secret)
    gen = locate_data(gen, account)
    platform.store.put_endpoint(_new_endpoint(gen, account))
    progress(f"endpoint {gen.endpoint!r} is Creating in {gen.region} ({gen.image})")
    try:
        gen = upload(region, gen, progress)
        create_generation(region, gen, token, progress)
        steps.create_endpoint(region, gen)
    except BaseException as exc:  # Ctrl-C included: nothing may be left half-created
        abort(platform, region, gen.endpoint, exc, progress)
        raise
    finally:
        token = None
    if not wait:
        _detach(platform, gen.endpoint, keep_on_failure)
        return platform.store.get_endpoint(gen.endpoint)
    return finish(platform, gen.endpoint, keep_on_failure=keep_on_failure, progress=progress)


def locate_data(gen: Generation, account: str) -> Generation:
    """Where each S3-served variant's weights go (bucket default: sagemaker-{region}-{account})."""
    bucket = gen.settings.model_data_bucket or f"sagemaker-{gen.region}-{account}"
    prefix = gen.settings.model_data_prefix
    variants = [
        v.model_copy(update={"model_data": model_data.locate(v.version, bucket, prefix)})
        if v.version is not None
        else v
        for v in gen.variants
    ]
    return gen.model_copy(update={"variants": variants})


def upload(region: Region, gen: Generation, progress: Progress) -> Generation:
    """Each S3-served variant's weights uploaded (once per content hash); the located generation."""
    variants = []
    for v in gen.variants:
        if v.model_data is not None and v.version is not None:
            model_data.ensure_bucket(region.s3, v.model_data.bucket, gen.region, progress)
            located = model_data.upload(region.s3, v.model_data, v.version, progress)
            v = v.model_copy(update={"model_data": located})
        variants.append(v)
    return gen.model_copy(update={"variants": variants})


def create_generation(region: Region, gen: Generation, token: str | None, progress: Progress) -> None:
    """create_model for each variant, then create_endpoint_config (names recorded beforehand)."""
    for v in gen.variants:
        steps.create_model(region, gen, v, token)
        progress(f"model {v.model_name} created ({v.pinned.label} from {v.source_label}, {v.instance_type})")
    steps.create_endpoint_config(region, gen)
    progress(f"endpoint config {gen.config_name} created")


def wait_timeout(gen: Generation) -> int:
    """How long a generation may take to come up: provisioning, download, the health check."""
    return PROVISION_S + max(v.sizing.download_timeout_s + v.sizing.startup_timeout_s for v in gen.variants)


def _new_endpoint(gen: Generation, account: str) -> Endpoint:
    res = {
        "region": gen.region,
        "account": account,
        "endpoint": gen.endpoint,
        "log_group": log_group(gen.endpoint),
        "wait_timeout_s": str(wait_timeout(gen)),
        **resources.generation_resources(gen),
    }
    if gen.token_secret:
        res["hf_token_secret"] = gen.token_secret  # the ARN; the token itself is never stored
    update = {
        "operation": "create",
        "operation_holder": OperationHolder.this_process(),
        "resources": res,
        "url": runtime_url(gen.region, gen.endpoint, asynchronous=gen.async_inference is not None),
    }
    return Endpoint.new(gen.config).model_copy(update=update)


def finish(
    platform: SageMakerPlatform, name: str, *, keep_on_failure: bool = False, progress: Progress = quiet
) -> Endpoint:
    """Wait for a Creating endpoint, apply its autoscaling; InService, or Failed and raise."""
    store = platform.store
    ep = store.begin_operation(name, "create", force=True)  # this process takes over
    region = platform.region_of(ep)
    timeout_s = float(ep.resources.get("wait_timeout_s", PROVISION_S + 2 * 3600))
    try:
        reply = steps.wait_endpoint(
            region, name, timeout_s=timeout_s, poll_s=platform.poll_interval_s, progress=progress
        )
        if reply["EndpointStatus"] != "InService":
            raise EndpointFailedError(f"endpoint {name} failed: {steps.failure_report(region, reply)}")
        alarms = sorted(autoscaling.parts(ep.config)[1])  # recorded before they are created
        store.update_endpoint(
            name, lambda e: e.model_copy(update={"resources": resources.with_alarms(e.resources, alarms)})
        )
        autoscaling.apply(region, ep.config, progress)
    except BaseException as exc:
        keep = keep_on_failure and isinstance(exc, EndpointFailedError)
        abort(platform, region, name, exc, progress, keep=keep)
        raise
    store.end_operation(name, EndpointStatus.IN_SERVICE, clear_failure=True)
    progress(f"endpoint {name!r} is InService: {ep.url}")
    return platform.describe(name)


def abort(
    platform: SageMakerPlatform,
    region: Region,
    name: str,
    exc: BaseException,
    progress: Progress,
    *,
    keep: bool = False,
) -> None:
    """Remove what the create made (unless `keep`); leave the endpoint Failed with the reason."""
    reason = str(exc) or type(exc).__name__
    if keep:
        reason += "; its resources were kept (keep_on_failure): `twinserve endpoint delete` removes them"
    else:
        progress("create failed; removing what was created")
        with contextlib.suppress(NotFoundError):
            ep = platform.store.get_endpoint(name)
            failures = teardown(region, ep, poll_s=platform.poll_interval_s, progress=progress)
            if failures:
                left = "; ".join(f.message for f in failures)
                reason += f"; clean-up incomplete ({left}): `twinserve endpoint delete {name}` finishes it"
    with contextlib.suppress(NotFoundError):
        platform.store.end_operation(name, EndpointStatus.FAILED, reason=reason)


def _detach(platform: SageMakerPlatform, name: str, keep_on_failure: bool) -> None:
    """Run `finish` in a process of its own (it outlives the CLI); its output goes to a log file."""
    log = platform.store.path.parent / name / "sagemaker-create.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", __name__, "finish", name, "--state", str(platform.store.path)]
    cmd += [f"--poll={platform.poll_interval_s:g}"] + (["--keep-on-failure"] if keep_on_failure else [])
    session = platform.clients.session
    if session is not None and session.profile_name not in (None, "default"):
        cmd += ["--profile", session.profile_name]
    with log.open("ab") as out:
        subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m twinserve.platforms.sagemaker.create finish NAME`: what `create --no-wait` runs detached."""
    from twinserve.platforms.sagemaker.platform import SageMakerPlatform

    parser = argparse.ArgumentParser(prog="python -m twinserve.platforms.sagemaker.create")
    parser.add_argument("command", choices=["finish"])
    parser.add_argument("name")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--poll", type=float, default=15.0)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--keep-on-failure", action="store_true")
    args = parser.parse_args(argv)
    session = None
    if args.profile:
        import boto3

        session = boto3.Session(profile_name=args.profile)
    platform = SageMakerPlatform(StateStore(args.state), session=session, poll_interval_s=args.poll)
    try:
        finish(
            platform, args.name, keep_on_failure=args.keep_on_failure, progress=lambda m: print(m, flush=True)
        )
    except Exception as exc:
        print(f"failed: {exc}", flush=True)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
