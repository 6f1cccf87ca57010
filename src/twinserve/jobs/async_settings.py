"""An async endpoint's concrete settings: which queue, which result store, which input folders,
which webhooks — decided in one place from its `Endpoint` record.

The job service (`twinserve.jobs.async_service`) and the CLI (`twinserve jobs …`) must agree on
where an endpoint's jobs and answers are, or one would look in a queue the other never wrote;
so both call `AsyncSettings.of`. The defaults follow the local platform's layout:
```
queue     AsyncInferenceConfig.queue_url, else $TWINSERVE_QUEUE_URL, else sqlite:///<state dir>/queue.db
results   output_location (failures: failure_location, else <results>/failures),
          else file://HOME/endpoints/NAME/results
inputs    HOME/endpoints/NAME/inputs plus AsyncInferenceConfig.input_roots (file:// inputs)
```
`LiveEndpoint` keeps the record fresh for a running service: the router's URL moves when it
restarts on another port, and the API key changes with an update.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from twinserve.deploy.async_config import AsyncInferenceConfig
from twinserve.deploy.spec import Endpoint, EndpointStatus
from twinserve.deploy.state import StateStore
from twinserve.errors import NotFoundError, ValidationError
from twinserve.jobs.locations import file_path
from twinserve.jobs.notify import Notifier
from twinserve.jobs.queue import QUEUE_URL_ENV, JobQueue, open_queue, sqlite_url
from twinserve.jobs.results import ResultStore, open_results

log = logging.getLogger(__name__)

RESULTS_FOLDER = "results"
INPUTS_FOLDER = "inputs"


def endpoint_folder(home: Path, name: str) -> Path:
    """HOME/endpoints/NAME: the local platform's folder of the endpoint (logs, results, inputs)."""
    return home / "endpoints" / name


@dataclass(frozen=True)
class AsyncSettings:
    """Where one async endpoint's jobs, answers and inputs are, and whom to notify."""

    endpoint: str
    config: AsyncInferenceConfig
    queue_url: str
    output_location: str
    failure_location: str | None
    input_roots: tuple[Path, ...]
    payload_limit: int

    @classmethod
    def of(cls, endpoint: Endpoint, *, home: Path, state_path: Path) -> AsyncSettings:
        """The settings of `endpoint` (ValidationError if it is not an async endpoint)."""
        config = endpoint.config.async_inference
        if config is None:
            raise ValidationError(f"endpoint {endpoint.name!r} is real-time only (no `async:` block)")
        folder = endpoint_folder(home, endpoint.name).expanduser().resolve()
        queue_url = config.queue_url or os.environ.get(QUEUE_URL_ENV) or sqlite_url(state_path.parent)
        roots = (folder / INPUTS_FOLDER, *(_root(r) for r in config.input_roots))
        return cls(
            endpoint=endpoint.name,
            config=config,
            queue_url=queue_url,
            output_location=config.output_location or (folder / RESULTS_FOLDER).as_uri(),
            failure_location=config.failure_location,
            input_roots=roots,
            payload_limit=endpoint.config.payload_limit,
        )

    def open_queue(self) -> JobQueue:
        # the state folder only matters for a sqlite URL, which names its file itself
        return open_queue(self.queue_url, state_dir=Path("."))

    def open_results(self) -> ResultStore:
        return open_results(self.output_location, failure_location=self.failure_location)

    def notifier(self) -> Notifier:
        """The webhooks of the endpoint (a Notifier with no URL sends nothing)."""
        c = self.config
        return Notifier(c.notify_success_url, c.notify_error_url, c.notify_secret)


def _root(root: str) -> Path:
    """An input root as a path: `file:///dir` or a plain path (`~` expanded)."""
    path = file_path(root, param="input_roots") if root.startswith("file:") else Path(root)
    return path.expanduser().resolve()


class LiveEndpoint:
    """The endpoint's record as last read from the state store, re-read at most every `refresh_s`.

    A store that cannot be read (busy, or the endpoint deleted) leaves the last record in
    place: a running service keeps serving what it knew; `gone` says the record went away.
    """

    def __init__(
        self, endpoint: Endpoint, store: StateStore | None = None, *, refresh_s: float = 2.0
    ) -> None:
        self.endpoint = endpoint
        self.store = store
        self.refresh_s = refresh_s
        self.gone = False
        self._read_at = time.monotonic()

    @property
    def api_key(self) -> str | None:
        key = self.endpoint.config.api_key
        return key.get_secret_value() if key is not None else None

    @property
    def url(self) -> str | None:
        """The router's URL (None until it runs)."""
        return self.endpoint.url

    @property
    def leasable(self) -> bool:
        """Whether jobs should be started: not while the endpoint is being deleted (its queue is
        about to be purged) or once its record is gone."""
        return not self.gone and self.endpoint.status is not EndpointStatus.DELETING

    def read(self) -> Endpoint:
        """Read the record now (blocking); the last one if the store cannot say."""
        if self.store is None:
            return self.endpoint
        try:
            self.endpoint = self.store.get_endpoint(self.endpoint.name)
            self.gone = False
        except NotFoundError:
            self.gone = True
        except Exception as exc:  # a busy or broken store must not stop the service
            log.warning("reading endpoint %s from the state store failed: %s", self.endpoint.name, exc)
        self._read_at = time.monotonic()
        return self.endpoint

    async def refresh(self) -> Endpoint:
        """`read` in a thread when the record is older than `refresh_s`."""
        if self.store is not None and time.monotonic() - self._read_at >= self.refresh_s:
            await asyncio.to_thread(self.read)
        return self.endpoint
