"""The gateway as its own process: `python -m twinserve.platforms.local.gateway.process`.

It must outlive the CLI that started it (one gateway serves every local endpoint of a state
store, whoever created them), so `ensure_gateway` starts it detached. It serves
`create_gateway_app(store)` on 127.0.0.1:PORT with uvicorn, reading the store on each call, so
endpoints created, updated or deleted later need no restart. SIGTERM lets in-flight calls
finish (uvicorn's graceful shutdown) and exits 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twinserve.deploy.state import StateStore
from twinserve.platforms.local.daemons import configure_logging
from twinserve.platforms.local.gateway.app import create_gateway_app

MODULE = "twinserve.platforms.local.gateway.process"


def run(port: int, state: Path | None, *, drain_s: float = 30.0) -> None:
    """Serve the gateway until SIGTERM/SIGINT."""
    import uvicorn

    app = create_gateway_app(StateStore(state))
    config = uvicorn.Config(
        app,
        host="127.0.0.1",  # never beyond this machine: open endpoints need no signature
        port=port,
        access_log=True,  # method, path and status: no header, so no credential, is logged
        log_level="info",
        timeout_graceful_shutdown=max(1, round(drain_s)),
    )
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="Port on 127.0.0.1.")
    parser.add_argument("--state", type=Path, default=None, help="State store file (default: under home).")
    parser.add_argument("--drain", type=float, default=30.0, help="Seconds in-flight calls may finish.")
    args = parser.parse_args(argv)
    configure_logging()
    run(args.port, args.state, drain_s=args.drain)


if __name__ == "__main__":
    main()
