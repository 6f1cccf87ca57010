"""The SageMaker Runtime API, served locally for every local endpoint (see docs/runtime-gateway.md).

`app` is the ASGI app, `eventstream` the response-stream framing, `sigv4` the signature
check, `process` the daemon and `daemon` the helpers the platform calls:
`ensure_gateway(store, home)` (start it unless it runs; its URL), `gateway_url(home)` and
`stop_gateway(home)`.
"""

from __future__ import annotations

from twinserve.platforms.local.gateway.daemon import (
    GatewayStartError,
    ensure_gateway,
    gateway_url,
    stop_gateway,
)

__all__ = ["GatewayStartError", "ensure_gateway", "gateway_url", "stop_gateway"]
