"""One Serve replica: our LLM microservice (the same app factory, engine and routes) in a Ray actor.

The constructor loads the model before it returns, so Serve keeps the replica STARTING (no
traffic, a rolling update keeps the old replicas) until the engine is ready, and a model that
cannot load fails the replica with the loader's reason, which Serve shows in its status.
`check_health` hands Serve the engine's health, so a replica whose engine died is replaced.
Serve's proxy passes the endpoint's route prefix as the ASGI `root_path`, which FastAPI strips
before it routes; the app itself is the one `twinserve serve` runs.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twinserve.config import ServeConfig
from twinserve.errors import ModelLoadError
from twinserve.logs import configure_logging
from twinserve.platforms.local.router.app import REPLICA_HEADER
from twinserve.server.app import create_app
from twinserve.server.service import ModelService


class LLMReplica:
    """Serve deployment body; `deployment()` wraps it with `serve.deployment` and `serve.ingress`."""

    def __init__(self, serve_flags: dict[str, Any], env: dict[str, str]) -> None:
        os.environ.update(env)
        config = ServeConfig(**serve_flags)
        configure_logging(config.log_format)
        self.service = ModelService(config)
        self.service.start_loading()
        if not self.service.wait_loaded():
            raise ModelLoadError(
                self.service.load_error or self.service.failure or "the model failed to load"
            )

    def __serve_build_asgi_app__(self) -> FastAPI:
        from ray import serve

        app = create_app(self.service.config, self.service)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    def check_health(self) -> None:
        ok, state, reason = self.service.health()
        if not ok:
            raise RuntimeError(f"replica {state}: {reason or 'not serving'}")


class ReplicaHeader:
    """Names the Serve replica that answered (`x-twinserve-replica`, as the local router does), so
    a client or a test can tell replicas and generations apart; pure ASGI, streams untouched."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def deployment(name: str) -> Any:
    """The Serve deployment `name` running `LLMReplica` (options are applied by the caller)."""
    from ray import serve

    return serve.deployment(name=name)(serve.ingress()(LLMReplica))
