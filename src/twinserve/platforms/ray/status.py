"""What Serve reports about an application, in twinserve's terms: the endpoint's status, its
replicas and counts, and Serve's own words on why it is not running (yet)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from twinserve.deploy.spec import Endpoint, EndpointStatus, ReplicaRecord, ReplicaState, VariantState

_REPLICA_STATES = {
    "RUNNING": ReplicaState.HEALTHY,
    "STARTING": ReplicaState.STARTING,
    "UPDATING": ReplicaState.STARTING,
    "RECOVERING": ReplicaState.STARTING,
    "PENDING_MIGRATION": ReplicaState.DRAINING,
    "STOPPING": ReplicaState.DRAINING,
}


def serve_name(value: object) -> str:
    """Serve's status and state enums (or their names) as plain names: RUNNING, DEPLOY_FAILED."""
    return str(getattr(value, "value", value))


def reason_of(app: dict[str, Any]) -> str:
    """Serve's words on why the application is not (yet) running: its own message and each
    deployment's (a pending reason such as resources the cluster cannot give)."""
    messages = [str(app.get("message") or "").strip()]
    for deployment, d in (app.get("deployments") or {}).items():
        message = str(d.get("message") or "").strip()
        if message and serve_name(d.get("status")) != "HEALTHY":
            messages.append(f"{deployment}: {message}")
    return "; ".join(m for m in messages if m)


def observed(ep: Endpoint, app: dict[str, Any] | None) -> Endpoint:
    """The stored endpoint updated with what Serve reports (`app` None: the application is gone)."""
    if app is None:
        if ep.status is EndpointStatus.FAILED:
            return ep
        return ep.model_copy(
            update={
                "status": EndpointStatus.FAILED,
                "failure_reason": "its Serve application is not in the cluster (deleted outside "
                "twinserve, or the cluster restarted); `twinserve endpoint delete` forgets it",
            }
        )
    port = (urlsplit(ep.url).port or 80) if ep.url else 8000
    records: list[ReplicaRecord] = []
    for variant_name, d in (app.get("deployments") or {}).items():
        for r in d.get("replicas") or []:
            started = r.get("start_time_s")
            records.append(
                ReplicaRecord(
                    id=str(r["replica_id"]),
                    endpoint=ep.name,
                    variant=variant_name,
                    pid=r.get("pid") or None,
                    port=port,
                    url=f"ray://{r.get('node_ip') or '?'}/{r.get('actor_name') or r['replica_id']}",
                    state=_REPLICA_STATES.get(serve_name(r.get("state")), ReplicaState.STARTING),
                    started_at=datetime.fromtimestamp(started, UTC) if started else ep.created_at,
                    model_version=_model_version(ep),
                    log_path=r.get("log_file_path"),
                    generation=ep.generation,
                )
            )
    variants = [
        VariantState(
            name=v.name,
            desired_replicas=_target(app, v.name, ep.desired(v.name)),
            current_replicas=sum(r.variant == v.name and r.state.serves for r in records),
        )
        for v in ep.variants
    ]
    status, reason = ep.status, ep.failure_reason
    serve_status = serve_name(app.get("status"))
    if serve_status == "DEPLOY_FAILED":
        status, reason = EndpointStatus.FAILED, reason_of(app) or reason
    elif serve_status == "RUNNING" and ep.operation is None:
        status = EndpointStatus.IN_SERVICE
    elif serve_status == "UNHEALTHY":
        reason = reason_of(app) or reason
    elif serve_status == "DEPLOYING" and ep.operation is None and status is EndpointStatus.CREATING:
        reason = reason_of(app) or None
    elif serve_status == "DELETING":
        status = EndpointStatus.DELETING
    return ep.model_copy(
        update={"status": status, "failure_reason": reason, "replicas": records, "variants": variants}
    )


def _target(app: dict[str, Any], variant: str, fallback: int) -> int:
    d = (app.get("deployments") or {}).get(variant) or {}
    target = d.get("target_num_replicas")
    return int(target) if isinstance(target, int) else fallback


def _model_version(ep: Endpoint) -> str | None:
    pinned = ep.config.variants[0].pinned
    return pinned.load_ref if pinned is not None else None
