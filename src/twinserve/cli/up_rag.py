"""The RAG half of `twinserve up`: ingest the project's docs/, start `twinserve rag serve` in
front of the endpoint, ask it one question and print the answer with its sources.

The service is a separate process (the business microservice is deployed apart from the LLM);
it is stopped, whatever happens, before the endpoint is deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console

from twinserve.errors import TwinserveError

UP_COLLECTION = "twinserve-docs"
RAG_QUESTION = "How do I create an async endpoint that scales to zero?"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
PREFERRED_PORT = 8800


def project_docs() -> Path | None:
    """The docs/ folder of this checkout (twinserve runs from a clone), else ./docs, else None."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "docs", Path.cwd() / "docs"):
        if candidate.is_dir() and any(candidate.glob("*.md")):
            return candidate
    return None


def ingest_docs(docs: Path, err: Console) -> str:
    """Ingest `docs` into UP_COLLECTION (unchanged files are skipped); a one-line summary."""
    from twinserve.rag.embed import load_embedder
    from twinserve.rag.ingest import Ingestor
    from twinserve.rag.settings import RagSettings
    from twinserve.rag.store import VectorStore

    settings = RagSettings(collection=UP_COLLECTION)
    embedder = load_embedder(settings.embedding_model_path(), settings.embed_batch_size)
    store = VectorStore(settings)  # closed before the service opens the same local folder
    try:
        report = Ingestor(settings, embedder, store).ingest([docs], collection=UP_COLLECTION, prune=True)
    finally:
        store.close()
    return (
        f"{report.files} files, {report.chunks} chunks embedded, {report.unchanged} unchanged, "
        f"{report.pruned} pruned"
    )


def _free_port() -> int:
    from twinserve.platforms.local.ports import port_free

    if port_free(PREFERRED_PORT):
        return PREFERRED_PORT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RagProcess:
    """`twinserve rag serve --endpoint NAME` on 127.0.0.1, started and stopped by `up`."""

    def __init__(self, endpoint: str, log_path: Path) -> None:
        self.endpoint = endpoint
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "twinserve.cli.main", "rag", "serve",
            "--endpoint", self.endpoint, "--collection", UP_COLLECTION,
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            # its own session: a Ctrl-C meant for `up` does not cut the service short before `up`
            # stops it in order
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ)
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise TwinserveError(
                    f"the RAG service exited with {self._process.returncode}; see {self.log_path}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.5)
        raise TwinserveError(
            f"the RAG service did not become healthy in {START_TIMEOUT_S:.0f} s; see {self.log_path}"
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rag_usage(url: str) -> list[str]:
    body = {"query": RAG_QUESTION, "k": 4}
    curl = f"curl {url}/rag -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"
    return [
        f"[bold]rag service[/bold]: {url}  (collection {UP_COLLECTION}: this project's docs/)",
        f"  RAG:    {curl}",
        f'  ask:    twinserve rag ask "How do I roll back an update?" --url {url} --stream   (docs/rag.md)',
    ]
