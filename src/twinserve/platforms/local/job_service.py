"""An async endpoint's job service, seen from the local control plane: start it, probe it, stop it.

The service itself (`python -m twinserve.jobs.async_service`: the `/async-invocations` routes,
the workers, the queue metrics) belongs to `twinserve.jobs`, which builds on the platforms;
so the control plane knows it only as a module to run and a URL to probe, the way it knows
the router, and never imports it. It runs beside the router, with replicas or without (an
endpoint scaled to zero still takes jobs), and is restarted by reconcile like the router.
"""

from __future__ import annotations

from pathlib import Path

from twinserve.deploy.spec import Endpoint
from twinserve.deploy.state import StateStore
from twinserve.errors import ModelLoadError
from twinserve.platforms.local.daemons import Daemon
from twinserve.platforms.local.ports import reclaim_port
from twinserve.server.process import is_healthy, tail_lines, wait_until_healthy

MODULE = "twinserve.jobs.async_service"
LOG = "async.log"
HEALTH_PATH = "/async/health"
_START_TIMEOUT_S = 60.0


class JobService:
    """The job service daemon of async endpoints (one per endpoint)."""

    def __init__(self, store: StateStore, home: Path) -> None:
        self.store = store
        self.home = home
        self.daemon = Daemon(MODULE, LOG)

    def start(self, endpoint: Endpoint, log_dir: Path) -> None:
        """Start it on the port of its recorded URL when that is free (the router's upstream stays)."""
        port = reclaim_port(endpoint.async_url)
        name = endpoint.name
        args = ["--port", str(port), "--state", str(self.store.path), "--home", str(self.home)]
        url = f"http://127.0.0.1:{port}"
        proc = self.daemon.start_recorded(
            name,
            args,
            log_dir,
            lambda started: self.store.update_endpoint(
                name, lambda ep: ep.model_copy(update={"async_url": url, "async_pid": started.pid})
            ),
        )
        if wait_until_healthy(url, _START_TIMEOUT_S, gone=lambda: proc.poll() is not None, path=HEALTH_PATH):
            return
        log_tail = tail_lines(log_dir / LOG, 20)
        if proc.poll() is not None:
            raise ModelLoadError(f"the job service exited with {proc.returncode}:\n{log_tail}")
        raise ModelLoadError(f"the job service was not ready after {_START_TIMEOUT_S:.0f}s:\n{log_tail}")

    def alive(self, endpoint: Endpoint) -> bool:
        """Not needed (a real-time endpoint), or its recorded process runs and answers its probe."""
        if endpoint.config.async_inference is None:
            return True
        return (
            endpoint.async_url is not None
            and self.daemon.is_ours(endpoint.async_pid, endpoint.name)
            and is_healthy(endpoint.async_url, path=HEALTH_PATH)
        )

    def stop(self, endpoint: Endpoint, timeout: float) -> None:
        """SIGTERM: it stops leasing, lets running jobs finish for `timeout` s (the rest are
        redelivered after their lease), and purges the queue if the endpoint is being deleted."""
        self.daemon.stop(endpoint.name, endpoint.async_pid, timeout)
