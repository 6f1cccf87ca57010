"""SageMakerPlatform: real-time and async endpoints on Amazon SageMaker with the Hugging Face LLM DLC (TGI).

```
create:  check everything (prepare.py) ─► Creating ─► weights to S3 once ─► create_model (each
         variant) ─► create_endpoint_config ─► create_endpoint ─► wait InService ─► autoscaling
         Failed: FailureReason + CloudWatch log tail ─► clean up (unless keep_on_failure) ─► raise
update:  generation N+1 model + config ─► rollback alarms ─► update_endpoint (blue/green, canary/
         linear, auto-rollback) ─► wait ─► committed: old generation deleted │ rolled back: new deleted
scale:   update_endpoint_weights_and_capacities, within the autoscaling bounds
delete:  autoscaling, alarms, endpoint (waited gone), configs, models; "already gone" is fine
```
Everything lives on AWS; the state store records what was created (names first, then the
call), so any later process — `describe`, `delete` after a crash — acts from it. One
operation holds an endpoint at a time (`StateStore.begin_operation`). The Hub token is read
from Secrets Manager into `create_model` only: never stored, printed or put in an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twinserve.deploy.platform import Capabilities, Progress, quiet
from twinserve.deploy.platform_config import PlatformName
from twinserve.deploy.policies import AutoscalingPolicy
from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus, ScalingEvent, VariantState
from twinserve.deploy.state import StateStore
from twinserve.errors import ConflictError, ModelLoadError, NotFoundError, TwinserveError, ValidationError
from twinserve.platforms.sagemaker import autoscaling, resources, steps
from twinserve.platforms.sagemaker.clients import AwsClients, Region, aws_step
from twinserve.platforms.sagemaker.create import PROVISION_S
from twinserve.platforms.sagemaker.create import create as _create
from twinserve.platforms.sagemaker.prepare import settings_of
from twinserve.platforms.sagemaker.teardown import teardown
from twinserve.platforms.sagemaker.update import settle_interrupted
from twinserve.platforms.sagemaker.update import update as _update

if TYPE_CHECKING:
    import boto3

    from twinserve.client.transport import Transport

# SageMaker's statuses in ours (EndpointStatus has the six a twinserve endpoint passes through)
STATUS = {
    "OutOfService": EndpointStatus.FAILED,
    "Creating": EndpointStatus.CREATING,
    "Updating": EndpointStatus.UPDATING,
    "SystemUpdating": EndpointStatus.UPDATING,
    "RollingBack": EndpointStatus.ROLLING_BACK,
    "InService": EndpointStatus.IN_SERVICE,
    "Deleting": EndpointStatus.DELETING,
    "Failed": EndpointStatus.FAILED,
    "UpdateRollbackFailed": EndpointStatus.FAILED,
}


class SageMakerPlatform:
    """Create, update, scale and delete SageMaker endpoints (real-time, or async with an `async:`
    block: SageMaker's AsyncInferenceConfig, see `async_inference.py`); state in a `StateStore`.

    `session` is the boto3 session (default: boto3's chain: env, profile, instance role);
    `poll_interval_s` how often DescribeEndpoint is polled while waiting.
    """

    name: PlatformName = "sagemaker"
    capabilities = Capabilities(
        native_routing=True,
        native_autoscaling=True,
        traffic_shifting=frozenset({"canary", "all_at_once"}),
        scale_to_zero=True,  # async endpoints only (autoscaling from 0 on HasBacklogWithoutCapacity)
        runtime_api=True,
    )

    def __init__(
        self,
        store: StateStore | None = None,
        *,
        session: boto3.Session | None = None,
        poll_interval_s: float = 15.0,
    ) -> None:
        self.store = store or StateStore()
        self.clients = AwsClients(session)
        self.poll_interval_s = poll_interval_s

    def region_of(self, endpoint: Endpoint) -> Region:
        region = endpoint.resources.get("region") or settings_of(endpoint.config).region
        if not region:
            raise ValidationError(f"endpoint {endpoint.name!r} has no recorded region")
        return self.clients.region(region)

    # ------------------------------------------------------------ create
    def create(
        self,
        config: EndpointConfig,
        *,
        wait: bool = True,
        progress: Progress = quiet,
        keep_on_failure: bool = False,
    ) -> Endpoint:
        """Deploy generation 1; with `wait`, return it InService (or raise, cleaned up and Failed).

        Bad input raises before any AWS call that creates something. Without `wait`, a detached
        process waits for InService and applies the autoscaling policy (follow with `describe`).
        `keep_on_failure` keeps a Failed endpoint's resources for a look at them (delete removes them).
        """
        return _create(self, config, wait=wait, progress=progress, keep_on_failure=keep_on_failure)

    # ------------------------------------------------------------ update
    def update(
        self,
        name: str,
        target: EndpointConfig,
        *,
        canary_percent: Iterable[float] = (),
        bake_s: float = 0.0,
        progress: Progress = quiet,
    ) -> Endpoint:
        """Blue/green to `target` (generation N+1) with SageMaker's deployment guardrails; see `update.py`."""
        return _update(self, name, target, canary_percent=canary_percent, bake_s=bake_s, progress=progress)

    def recover(self, name: str) -> None:
        """Settle an operation whose process died, or an update left in flight, from what AWS
        reports (there is no controller to do it); BusyError while SageMaker still works on it."""
        ep = self.store.get_endpoint(name)
        holder = ep.operation_holder
        dead = ep.operation is not None and not (holder and holder.alive())
        if not dead and not (ep.operation is None and ep.target is not None):
            return
        # hold it while settling: only an operation's holder changes what the endpoint runs
        if dead:
            self.store.take_over(name, holder)
        else:
            self.store.begin_operation(name, "settle")
        try:
            settle_interrupted(self, name)
        except BaseException:  # not settled (SageMaker is still at work): leave it as it was found
            with contextlib.suppress(NotFoundError, ConflictError):
                self.store.update_endpoint(
                    name,
                    lambda e: e.model_copy(update={"operation": ep.operation, "operation_holder": holder}),
                )
            raise

    def begin(self, name: str, operation: str, status: EndpointStatus) -> Endpoint:
        """Take the endpoint for `operation` (InService only), recovering an interrupted one first."""
        self.recover(name)
        return self.store.begin_operation(name, operation, status, allowed=_in_service)

    # ------------------------------------------------------------ scale and autoscaling
    def scale(
        self, name: str, replicas: int, *, variant: str | None = None, progress: Progress = quiet
    ) -> Endpoint:
        """DesiredInstanceCount of a variant (UpdateEndpointWeightsAndCapacities), within the
        autoscaling bounds when it has a policy; waits until InService."""
        ep = self.store.get_endpoint(name)
        v = ep.config.variant(variant) if variant else ep.config.variants[0]
        policy = ep.config.autoscaling
        if replicas < (0 if ep.config.async_inference is not None else 1):
            raise ValidationError(
                "a real-time SageMaker endpoint runs at least 1 instance per variant (0 is for async endpoints)"
            )
        scaled = policy is not None and policy.variant in (None, v.name)
        if scaled and policy is not None and not policy.min_replicas <= replicas <= policy.max_replicas:
            raise ValidationError(
                f"{replicas} instances is outside the autoscaling bounds "
                f"{policy.min_replicas}..{policy.max_replicas} of {name!r}"
            )
        ep = self.begin(name, "scale", EndpointStatus.UPDATING)
        region, before = self.region_of(ep), ep.desired(v.name)
        progress(f"scaling {name}/{v.name}: {before} → {replicas} instances")
        try:
            with aws_step(f"update_endpoint_weights_and_capacities {name}"):
                region.sagemaker.update_endpoint_weights_and_capacities(
                    EndpointName=ep.resources.get("endpoint", name),
                    DesiredWeightsAndCapacities=[{"VariantName": v.name, "DesiredInstanceCount": replicas}],
                )
            reply = steps.wait_endpoint(
                region, name, timeout_s=PROVISION_S + 3600, poll_s=self.poll_interval_s, progress=progress
            )
            if reply["EndpointStatus"] != "InService":
                raise ModelLoadError(f"scaling {name} failed: {steps.failure_report(region, reply)}")
        except BaseException as exc:
            with contextlib.suppress(NotFoundError):
                self.store.end_operation(
                    name, EndpointStatus.IN_SERVICE, reason=f"scaling to {replicas} failed: {exc}"
                )
            raise
        variants = [
            s.model_copy(update={"desired_replicas": replicas}) if s.name == v.name else s
            for s in ep.variants
        ]
        self.store.record_event(
            ScalingEvent(
                endpoint=name,
                variant=v.name,
                from_replicas=before,
                to_replicas=replicas,
                reason="manual scale",
            )
        )
        self.store.end_operation(name, EndpointStatus.IN_SERVICE, variants=variants)
        return self.describe(name)

    def set_autoscaling(
        self, name: str, policy: AutoscalingPolicy | None, *, progress: Progress = quiet
    ) -> Endpoint:
        """Apply `policy` on AWS (Application Auto Scaling + CloudWatch), or remove it with None."""
        ep = self.store.get_endpoint(name)
        new = ep.config_with_policy(policy)
        ep = self.begin(name, "autoscale", EndpointStatus.UPDATING)
        region = self.region_of(ep)
        self.store.update_endpoint(
            name, lambda e: e.model_copy(update={"resources": _intended_alarms(e, new)})
        )
        try:
            autoscaling.change(region, ep.config, new, progress)
        except BaseException as exc:
            with contextlib.suppress(NotFoundError):
                self.store.end_operation(
                    name, EndpointStatus.IN_SERVICE, reason=f"autoscaling change failed: {exc}"
                )
            raise
        gone = autoscaling.parts(ep.config)[1] - autoscaling.parts(new)[1]
        res = self.store.get_endpoint(name).resources
        res["alarms"] = ",".join(a for a in resources.alarms(res) if a not in gone)
        self.store.end_operation(name, EndpointStatus.IN_SERVICE, config=new, resources=res)
        progress(f"autoscaling of {name!r} {'removed' if policy is None else 'applied'}")
        return self.describe(name)

    # ------------------------------------------------------------ read
    def describe(self, name: str) -> Endpoint:
        """The endpoint refreshed from DescribeEndpoint (status, failure, instance counts); NotFoundError."""
        ep = self.store.get_endpoint(name)
        if "region" not in ep.resources:
            return ep
        region = self.region_of(ep)
        reply = steps.describe_endpoint(region, ep.resources.get("endpoint", name))
        if reply is None:
            if ep.operation is not None or ep.status in (EndpointStatus.FAILED, EndpointStatus.CREATING):
                return ep
            return ep.model_copy(
                update={
                    "status": EndpointStatus.FAILED,
                    "failure_reason": "the SageMaker endpoint no longer exists (deleted outside twinserve?); "
                    f"`twinserve endpoint delete {name}` forgets it",
                }
            )
        return _refreshed(ep, reply)

    def list_endpoints(self) -> list[Endpoint]:
        """Every SageMaker endpoint of the store, described (the recorded state where AWS does not answer)."""
        found = []
        for each in self.store.list_endpoints():
            if each.config.platform.type != "sagemaker":
                continue
            try:
                found.append(self.describe(each.name))
            except NotFoundError:
                continue
            except TwinserveError:
                found.append(each)
        return found

    def logs(self, name: str, lines: int = 50) -> dict[str, str]:
        """The last `lines` of each CloudWatch log stream of the endpoint (Hub tokens masked)."""
        ep = self.store.get_endpoint(name)
        if "region" not in ep.resources:
            return {}
        return steps.endpoint_logs(self.region_of(ep), ep.resources.get("endpoint", name), lines)

    # ------------------------------------------------------------ delete
    def delete(self, name: str, *, progress: Progress = quiet) -> bool:
        """Remove everything the endpoint owns on AWS and forget it; False if none existed.

        Idempotent: what is already gone is skipped. If a step fails the endpoint stays recorded
        (Failed, with what is left) and the error is raised; deleting again finishes the job.
        """
        try:
            ep = self.store.begin_operation(name, "delete", EndpointStatus.DELETING, force=True)
        except NotFoundError:
            return False
        progress(f"endpoint {name!r} is Deleting")
        if "region" in ep.resources:
            failures = teardown(self.region_of(ep), ep, poll_s=self.poll_interval_s, progress=progress)
            if failures:
                message = f"delete of {name!r} is incomplete: " + "; ".join(f.message for f in failures)
                self.store.end_operation(name, EndpointStatus.FAILED, reason=message)
                raise type(failures[0])(message)
        self.store.delete_endpoint(name)
        progress(f"endpoint {name!r} deleted")
        return True

    # ------------------------------------------------------------ client
    def transport(self, endpoint: Endpoint) -> Transport:
        """A SageMaker Runtime transport (InvokeEndpoint / InvokeEndpointWithResponseStream, SigV4)."""
        from twinserve.client.sagemaker_transport import SageMakerTransport

        region = endpoint.resources.get("region") or settings_of(endpoint.config).region
        return SageMakerTransport(
            endpoint.resources.get("endpoint", endpoint.name), region=region, session=self.clients.session
        )


def _in_service(ep: Endpoint) -> str | None:
    if ep.status is EndpointStatus.IN_SERVICE:
        return None
    return f"it is {ep.status} (a Failed endpoint is deleted and created again)"


def _intended_alarms(ep: Endpoint, config: EndpointConfig) -> dict[str, str]:
    """The endpoint's resources with the alarms `config`'s policy will create (recorded first)."""
    return resources.with_alarms(ep.resources, sorted(autoscaling.parts(config)[1]))


def _refreshed(ep: Endpoint, reply: dict[str, Any]) -> Endpoint:
    status = STATUS.get(reply["EndpointStatus"], EndpointStatus.FAILED)
    live = {pv["VariantName"]: pv for pv in reply.get("ProductionVariants", [])}
    variants = [
        VariantState(
            name=s.name,
            desired_replicas=int(live.get(s.name, {}).get("DesiredInstanceCount", s.desired_replicas)),
            current_replicas=int(live.get(s.name, {}).get("CurrentInstanceCount", 0)),
        )
        for s in ep.variants
    ]
    # AWS keeps an old update's FailureReason; ours says whether the last operation failed
    aws_reason = reply.get("FailureReason") if status is EndpointStatus.FAILED else None
    failure = ep.failure_reason or aws_reason
    res = {**ep.resources, "live_endpoint_config": str(reply.get("EndpointConfigName", ""))}
    return ep.model_copy(
        update={"status": status, "variants": variants, "failure_reason": failure, "resources": res}
    )
