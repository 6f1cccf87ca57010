"""Replicas as local `twinserve serve` processes on 127.0.0.1, each on its own port.

A replica outlives the CLI that started it (its own session, output to a log file), so all
that identifies it later is in its `ReplicaRecord`: pid, port, URL, log file. Before a pid is
trusted (probed, signalled) its command line must still be `twinserve serve … --port N`: pids
are reused, and a stale record must never make us signal someone else's process.

The API key reaches a replica through its environment (`API_KEY`), never its command line,
which `ps` shows to every user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path

import httpx
import psutil

from twinserve.config import get_settings
from twinserve.deploy.spec import EndpointConfig, ReplicaRecord, ReplicaState, VariantConfig, utcnow
from twinserve.deploy.state import StateStore
from twinserve.errors import ModelLoadError, NotFoundError
from twinserve.platforms.local.processes import has_option, live_cmdline, terminate
from twinserve.platforms.local.runtime import ReplicaStartError
from twinserve.server.process import ServerProcess, free_port, is_healthy, tail_lines

log = logging.getLogger("twinserve.runtime")

# after the drain, the engine stops and the interpreter exits: a few seconds more before SIGKILL
_EXIT_GRACE_S = 10.0
_PROBE_TIMEOUT_S = 2.0
_LOG_TAIL_LINES = 30


def serve_args(endpoint: EndpointConfig, variant: VariantConfig) -> list[str]:
    """`twinserve serve` flags for one replica (host and port are added by ServerProcess)."""
    args = ["--model", variant.load_ref, "--dtype", variant.dtype, "--log-format", "json"]
    args += ["--drain-timeout", f"{endpoint.drain_timeout_s:g}"]
    args += ["--payload-limit", str(endpoint.payload_limit)]
    if variant.quantize:
        args += ["--quantize", variant.quantize]
    if variant.threads:
        args += ["--threads", str(variant.threads)]
    return args + variant.limits.serve_args()


# a request the router sent just before it saw the replica drain still reaches an open port
LOCAL_DRAIN_GRACE_S = 1.0


def serve_env(
    endpoint: EndpointConfig, variant: VariantConfig, replica_id: str, state: Path
) -> dict[str, str]:
    """Environment additions for one replica: who it is (so `sweep_orphans` can find it even
    when no record of it was written) and the key (both names: TWINSERVE_API_KEY wins in serve)."""
    env = {
        "TWINSERVE_REPLICA_ID": replica_id,
        "TWINSERVE_ENDPOINT": endpoint.name,
        "TWINSERVE_ENDPOINT_STATE": str(state),
    }
    if endpoint.api_key is not None:
        key = endpoint.api_key.get_secret_value()
        env["API_KEY"] = key
        env["TWINSERVE_API_KEY"] = key
    if variant.device == "cpu":
        # serve has no --device flag; hiding the GPUs makes its `auto` pick the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    if "TWINSERVE_DRAIN_GRACE_S" not in os.environ:
        # the router has stopped sending a replica new requests before it is stopped (see
        # router/client.py), so the port need not stay open 5 s for a load balancer to notice
        env["TWINSERVE_DRAIN_GRACE_S"] = str(LOCAL_DRAIN_GRACE_S)
    return env


class LocalRuntime:
    """The `Runtime` of one machine: replicas are child processes, records are in the state store."""

    def __init__(self, store: StateStore | None = None, *, home: Path | None = None) -> None:
        self.store = store or StateStore()
        self.logs_root = (home or get_settings().home) / "endpoints"
        # children started by this process: waited on directly, so they never linger as zombies
        self._children: dict[str, ServerProcess] = {}

    def log_path(self, endpoint_name: str, replica_id: str) -> Path:
        return self.logs_root / endpoint_name / f"{replica_id}.log"

    def start_replica(
        self, endpoint: EndpointConfig, variant: VariantConfig, *, generation: int = 1
    ) -> ReplicaRecord:
        """See `Runtime.start_replica`. A replica killed by a signal while it loaded, by someone
        other than the control plane (which removes the row of a replica it stops), is started
        once more; a load that fails by itself fails at once."""
        try:
            return self._start_replica(endpoint, variant, generation)
        except ReplicaStartError as exc:
            if not exc.killed:
                raise
            log.warning("%s was killed while it loaded; starting another", exc.record.id)
            return self._start_replica(endpoint, variant, generation)

    def _start_replica(
        self, endpoint: EndpointConfig, variant: VariantConfig, generation: int
    ) -> ReplicaRecord:
        replica_id = f"{endpoint.name}-{variant.name}-{secrets.token_hex(3)}"
        log_path = self.log_path(endpoint.name, replica_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        port = free_port()
        started_at = utcnow()
        # intent before action: the row (with its deadline) exists before the process does, so a
        # control process killed at any point leaves a replica that reconcile finds and judges,
        # and a refused row (its endpoint gone or being deleted) starts nothing
        record = self.store.put_replica(
            ReplicaRecord(
                id=replica_id,
                endpoint=endpoint.name,
                variant=variant.name,
                port=port,
                url=f"http://127.0.0.1:{port}",
                started_at=started_at,
                start_deadline=started_at + timedelta(seconds=endpoint.startup_timeout_s),
                log_path=str(log_path),
                generation=generation,
            )
        )
        try:
            proc = ServerProcess(
                serve_args(endpoint, variant),
                port=port,
                env=serve_env(endpoint, variant, replica_id, self.store.path),
                log_path=log_path,
            )
        except BaseException:
            self.store.remove_replica(replica_id)
            raise
        try:
            record = self.store.update_replica(record.model_copy(update={"pid": proc.proc.pid}))
            proc.wait_healthy(endpoint.startup_timeout_s)
        except BaseException as exc:
            signalled = (proc.proc.poll() or 0) < 0  # before our own kill below
            if signalled:  # a stop by the control plane marks the row first: not worth a retry
                signalled = False
                with contextlib.suppress(NotFoundError):
                    signalled = self.store.get_replica(replica_id).state is ReplicaState.STARTING
            proc.kill()
            self.store.remove_replica(replica_id)
            if isinstance(exc, ModelLoadError):
                raise ReplicaStartError(
                    f"replica {replica_id} of endpoint {endpoint.name!r} (variant {variant.name!r}, "
                    f"model {variant.load_ref}) did not become healthy",
                    record=record,
                    log_tail=_log_tail(log_path, _LOG_TAIL_LINES, skip_probes=True),
                    killed=signalled,
                ) from exc
            raise
        served = _model_version(record.url)
        pinned = variant.pinned
        if pinned is not None and pinned.kind == "registry" and served != pinned.load_ref:
            proc.kill()  # a replica must never serve another version than its generation's pin
            self.store.remove_replica(replica_id)
            raise ReplicaStartError(
                f"replica {replica_id} serves {served or 'an unknown model'}, not the pinned {pinned.load_ref}",
                record=record,
                log_tail=_log_tail(log_path, _LOG_TAIL_LINES, skip_probes=True),
            )
        record = record.model_copy(update={"state": ReplicaState.HEALTHY, "model_version": served})
        try:
            record = self.store.update_replica(record)
        except NotFoundError:
            proc.kill()  # retired or its endpoint deleted while it loaded: nobody would stop it
            raise
        self._children[replica_id] = proc
        return record

    def stop_replica(self, record: ReplicaRecord, drain_timeout: float) -> None:
        with contextlib.suppress(NotFoundError):
            current = self.store.get_replica(record.id)
            self.store.put_replica(current.model_copy(update={"state": ReplicaState.DRAINING}))
        proc = self._children.pop(record.id, None)
        if proc is not None:
            proc.stop(timeout=drain_timeout + _EXIT_GRACE_S)
        elif record.pid is not None and _is_ours(record):
            terminate(record.pid, drain_timeout + _EXIT_GRACE_S)
        self.store.remove_replica(record.id)

    def find_orphans(self, endpoint_name: str) -> list[int]:
        """Replica processes of this endpoint (and state store) that no record describes: none
        has their replica id, or the record names another pid (or none yet). Read-only."""
        known = {r.id: r.pid for r in self.store.replicas(endpoint_name)}
        orphans = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "serve" not in cmdline or not any("twinserve" in a for a in cmdline):
                continue
            try:
                env = proc.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            ours = env.get("TWINSERVE_ENDPOINT") == endpoint_name and env.get(
                "TWINSERVE_ENDPOINT_STATE"
            ) == str(self.store.path)
            if ours and known.get(env.get("TWINSERVE_REPLICA_ID", ""), -1) != proc.pid:
                orphans.append(proc.pid)
        return orphans

    def sweep_orphans(self, endpoint_name: str, drain_timeout: float = 0.0) -> list[int]:
        """Stop the orphans (`find_orphans`): left by a control process killed between starting a
        replica and recording its pid. Call it only while holding the endpoint (no one else is
        starting replicas). Returns the pids stopped."""
        orphans = self.find_orphans(endpoint_name)
        for pid in orphans:
            terminate(pid, drain_timeout + _EXIT_GRACE_S)
        return orphans

    def replica_alive(self, record: ReplicaRecord) -> bool:
        return _is_ours(record) and _healthy(record.url)

    def replica_logs(self, record: ReplicaRecord, lines: int = 100) -> str:
        path = Path(record.log_path) if record.log_path else self.log_path(record.endpoint, record.id)
        return _log_tail(path, lines)

    def find_replicas(self, endpoint_name: str) -> list[ReplicaRecord]:
        found = []
        for record in self.store.replicas(endpoint_name):
            state = _observed_state(record)
            if state is not record.state:
                observed = self.store.observe_replica(record, state)
                if observed is None:
                    continue  # retired while we probed
                record = observed
            found.append(record)
        return found


def _log_tail(path: Path, lines: int, *, skip_probes: bool = False) -> str:
    """The last `lines` lines; `skip_probes` drops the access lines of our own /health polling,
    which would otherwise push the reason a replica failed out of the tail."""
    keep = (lambda line: '"path": "/health"' not in line) if skip_probes else None
    return tail_lines(path, lines, keep=keep)


def _observed_state(record: ReplicaRecord) -> ReplicaState:
    if record.pid is None:  # recorded, its process not started yet (or its starter died first)
        starting = record.state is ReplicaState.STARTING and not past_deadline(record)
        return ReplicaState.STARTING if starting else ReplicaState.STOPPED
    if not _is_ours(record):
        return ReplicaState.STOPPED
    if record.state is ReplicaState.DRAINING:
        return record.state
    if _healthy(record.url):
        return ReplicaState.HEALTHY
    # a replica still loading (another process is waiting for it) is not yet unhealthy
    return ReplicaState.STARTING if record.state is ReplicaState.STARTING else ReplicaState.UNHEALTHY


def past_deadline(record: ReplicaRecord) -> bool:
    """Started but still not healthy at its start deadline (records from before deadlines: never)."""
    return record.start_deadline is not None and utcnow() > record.start_deadline


def _is_ours(record: ReplicaRecord) -> bool:
    """The pid is alive (not a zombie) and still runs `twinserve serve … --port <port>`."""
    cmdline = live_cmdline(record.pid)
    if cmdline is None:
        return False
    port_given = has_option(cmdline, "--port", str(record.port))
    return port_given and "serve" in cmdline and any("twinserve" in a for a in cmdline)


def _healthy(url: str) -> bool:
    return is_healthy(url, _PROBE_TIMEOUT_S)


def _model_version(url: str) -> str | None:
    """`models:/name/N` for registry models, else a prefix of the served weights' sha256."""
    try:
        info = httpx.get(f"{url}/info", timeout=_PROBE_TIMEOUT_S).json()
    except (httpx.HTTPError, ValueError):
        return None
    if info.get("registry_name") and info.get("registry_version") is not None:
        return f"models:/{info['registry_name']}/{info['registry_version']}"
    sha = info.get("weights_sha256")
    return f"sha256:{sha[:12]}" if isinstance(sha, str) and sha else None
