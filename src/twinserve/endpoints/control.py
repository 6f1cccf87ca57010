"""The control plane of real-time endpoints on one machine: create, describe, list, delete, logs.

```
create:  store Creating ─► start every variant's replicas (threads) ─► start the router process
         ─► router /health 200 ─► InService
         any failure ─► stop what was started ─► Failed (reason: the replica's log tail) ─► raise
delete:  Deleting ─► stop the router (drains) ─► stop every replica (drains) ─► forget the state
```
Everything lives in processes that outlive the caller (replicas and the router run in their
own sessions), so a later CLI process acts from the state store alone. `create(wait=False)`
hands the start-up to a detached `python -m twinserve.endpoints.control provision NAME`.

Not yet here: update (blue/green), scale, autoscaling, reconciling after a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twinserve.endpoints.local_runtime import LocalRuntime
from twinserve.endpoints.processes import has_option, kill_group, live_cmdline, terminate
from twinserve.endpoints.router_process import MODULE as ROUTER_MODULE
from twinserve.endpoints.spec import Endpoint, EndpointConfig, EndpointStatus, ReplicaRecord, ReplicaState
from twinserve.endpoints.state import StateStore
from twinserve.errors import ModelLoadError, NotFoundError
from twinserve.server.process import free_port, is_healthy, tail_lines, wait_until_healthy

Progress = Callable[[str], None]

ROUTER_LOG = "router.log"
PROVISION_LOG = "control.log"
_ROUTER_START_TIMEOUT_S = 60.0
_EXIT_GRACE_S = 10.0


def _quiet(_: str) -> None:
    """The default progress callback: say nothing."""


class EndpointManager:
    """Create, inspect and delete local endpoints; state in a `StateStore`, replicas by a `LocalRuntime`.

    `delete` of a missing endpoint is not an error (it returns False): deleting is idempotent,
    so a retried or concurrent delete never fails.
    """

    def __init__(self, store: StateStore | None = None, runtime: LocalRuntime | None = None) -> None:
        self.store = store or (runtime.store if runtime is not None else StateStore())
        self.runtime = runtime or LocalRuntime(self.store, home=self.store.path.parent.parent)
        # routers started by this process: waited on, so none lingers as a zombie here
        self._routers: dict[str, subprocess.Popen[bytes]] = {}

    def endpoint_dir(self, name: str) -> Path:
        return self.runtime.logs_root / name

    # ------------------------------------------------------------ create
    def create(self, config: EndpointConfig, *, wait: bool = True, progress: Progress = _quiet) -> Endpoint:
        """Create the endpoint; with `wait`, return it InService (or raise, leaving it Failed).

        ConflictError if the name exists. Without `wait`, return it Creating while a detached
        process starts it (follow with `describe`).
        """
        self.store.put_endpoint(Endpoint.new(config))
        progress(f"endpoint {config.name!r} is Creating")
        if not wait:
            self._provision_detached(config.name)
            return self.store.get_endpoint(config.name)
        return self.provision(config.name, progress=progress)

    def provision(self, name: str, *, progress: Progress = _quiet) -> Endpoint:
        """Start the replicas and the router of a Creating endpoint; InService, or Failed and raise."""
        config = self.store.get_endpoint(name).config
        try:
            self._start_replicas(config, progress)
            progress("starting the router")
            self._start_router(config)
            progress("router is up")
        except BaseException as exc:  # Ctrl-C included: nothing may be left running
            reason = str(exc) or type(exc).__name__
            progress("start-up failed; stopping what was started")
            self._stop_all(name, config.drain_timeout_s)
            with contextlib.suppress(NotFoundError):
                self.store.update_status(name, EndpointStatus.FAILED, reason)
            raise
        self.store.update_status(name, EndpointStatus.IN_SERVICE)
        progress(f"endpoint {name!r} is InService")
        return self.describe(name)

    def _start_replicas(self, config: EndpointConfig, progress: Progress) -> None:
        jobs = [v for v in config.variants for _ in range(v.replicas)]
        progress(f"starting {len(jobs)} replica(s)")
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="replica-start") as pool:
            futures = [pool.submit(self.runtime.start_replica, config, v) for v in jobs]
            errors: list[BaseException] = []
            for future in futures:  # wait for all: a replica still starting must not be orphaned
                try:
                    record = future.result()
                    progress(f"replica {record.id} is healthy ({record.url})")
                except BaseException as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    def _provision_detached(self, name: str) -> None:
        log_path = self.endpoint_dir(name) / PROVISION_LOG
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", __name__, "provision", name, "--state", str(self.store.path)]
        cmd += ["--home", str(self.runtime.logs_root.parent)]
        with log_path.open("wb") as out:
            subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    # ------------------------------------------------------------ router process
    def _start_router(self, config: EndpointConfig) -> None:
        port = free_port()
        log_path = self.endpoint_dir(config.name) / ROUTER_LOG
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", ROUTER_MODULE, "--endpoint", config.name, "--port", str(port)]
        cmd += ["--state", str(self.store.path), "--drain", f"{config.drain_timeout_s:g}"]
        with log_path.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._routers[config.name] = proc
        url = f"http://127.0.0.1:{port}"
        self.store.update_endpoint(
            config.name, lambda ep: ep.model_copy(update={"url": url, "router_pid": proc.pid})
        )
        if wait_until_healthy(url, _ROUTER_START_TIMEOUT_S, gone=lambda: proc.poll() is not None):
            return
        if proc.poll() is not None:
            raise ModelLoadError(f"the router exited with {proc.returncode}:\n{tail_lines(log_path, 20)}")
        raise ModelLoadError(
            f"the router had no healthy replica after {_ROUTER_START_TIMEOUT_S:.0f}s:\n{tail_lines(log_path, 20)}"
        )

    def _stop_router(self, endpoint: Endpoint) -> None:
        proc = self._routers.pop(endpoint.name, None)
        timeout = endpoint.config.drain_timeout_s + _EXIT_GRACE_S
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    kill_group(proc.pid)
                    proc.wait(10)
        elif endpoint.router_pid is not None and router_is_ours(endpoint):
            terminate(endpoint.router_pid, timeout)

    # ------------------------------------------------------------ read
    def describe(self, name: str) -> Endpoint:
        """The endpoint with its replicas' states probed now and current replica counts; NotFoundError."""
        endpoint = self.store.get_endpoint(name)
        replicas = self.runtime.find_replicas(name)
        variants = [
            v.model_copy(
                update={
                    "current_replicas": sum(
                        r.variant == v.name and r.state is ReplicaState.HEALTHY for r in replicas
                    )
                }
            )
            for v in endpoint.variants
        ]
        return endpoint.model_copy(update={"replicas": replicas, "variants": variants})

    def list(self) -> list[Endpoint]:
        """Every endpoint, described (replicas probed now)."""
        found = []
        for endpoint in self.store.list_endpoints():
            with contextlib.suppress(NotFoundError):  # deleted while we looked
                found.append(self.describe(endpoint.name))
        return found

    def router_alive(self, endpoint: Endpoint) -> bool:
        """The recorded router process is running and its `/health` is 200."""
        return endpoint.url is not None and router_is_ours(endpoint) and is_healthy(endpoint.url)

    def logs(self, name: str, lines: int = 50) -> dict[str, str]:
        """The last `lines` of each replica's log and of the router's (key `router`); NotFoundError."""
        endpoint = self.store.get_endpoint(name)
        out = {r.id: self.runtime.replica_logs(r, lines) for r in endpoint.replicas}
        for label, file in (("router", ROUTER_LOG), ("control", PROVISION_LOG)):
            path = self.endpoint_dir(name) / file
            if path.exists():
                out[label] = tail_lines(path, lines)
        return out

    # ------------------------------------------------------------ delete
    def delete(self, name: str, *, progress: Progress = _quiet) -> bool:
        """Drain and stop the router and every replica, then forget the endpoint; False if none existed."""
        try:
            endpoint = self.store.update_status(name, EndpointStatus.DELETING)
        except NotFoundError:
            return False
        progress(f"endpoint {name!r} is Deleting")
        self._stop_all(name, endpoint.config.drain_timeout_s)
        self.store.delete_endpoint(name)
        progress(f"endpoint {name!r} deleted")
        return True

    def _stop_all(self, name: str, drain_timeout: float) -> None:
        """Stop the router first (no new requests reach replicas), then every replica, in parallel."""
        with contextlib.suppress(NotFoundError):
            self._stop_router(self.store.get_endpoint(name))
        records = self.store.replicas(name)
        if records:
            with ThreadPoolExecutor(max_workers=len(records), thread_name_prefix="replica-stop") as pool:
                list(pool.map(lambda r: self._stop_replica(r, drain_timeout), records))

    def _stop_replica(self, record: ReplicaRecord, drain_timeout: float) -> None:
        self.runtime.stop_replica(record, drain_timeout)


def router_is_ours(endpoint: Endpoint) -> bool:
    """The recorded router pid still runs our router module for this endpoint (pids are reused)."""
    cmdline = live_cmdline(endpoint.router_pid)
    return (
        cmdline is not None and ROUTER_MODULE in cmdline and has_option(cmdline, "--endpoint", endpoint.name)
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m twinserve.endpoints.control provision NAME`: what `create --no-wait` runs detached."""
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("command", choices=["provision"])
    parser.add_argument("name")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--home", type=Path, required=True)
    args = parser.parse_args(argv)
    store = StateStore(args.state)
    manager = EndpointManager(store, LocalRuntime(store, home=args.home))
    try:
        manager.provision(args.name, progress=lambda msg: print(msg, flush=True))
    except Exception as exc:
        print(f"failed: {exc}", flush=True)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
