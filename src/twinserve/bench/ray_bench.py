"""`twinserve bench endpoint --platform ray`: what Serve's proxy costs at W32.

The same W32 chat workload as the router part runs, in interleaved rounds, through the Serve
proxy to a Ray endpoint's one replica and straight to a local `twinserve serve` replica of the
same model with the same threads: the difference is Serve's hop (its proxy, a Ray call per
request and per streamed chunk). Both endpoints live for the run's duration in a temporary
state folder and are deleted however the run ends.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from twinserve.bench.endpoint_bench import (
    EndpointBenchConfig,
    RouterResult,
    RouterRound,
    SideResult,
    _side,
    endpoint_config,
)
from twinserve.bench.prompts import chat_messages
from twinserve.bench.serve_bench import chat_workload
from twinserve.deploy.platform import Progress
from twinserve.deploy.spec import Endpoint, EndpointConfig
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.ray.platform import RayPlatform

PROXY_GOAL = 0.90  # Serve's proxy ÷ a replica straight: it may cost at most 10%


@contextlib.contextmanager
def _created(
    platform: LocalPlatform | RayPlatform, config: EndpointConfig, progress: Progress
) -> Iterator[Endpoint]:
    try:
        if isinstance(platform, LocalPlatform):
            yield platform.create(config, controller=False, progress=progress)
        else:
            yield platform.create(config, progress=progress)
    finally:
        progress(f"deleting endpoint {config.name!r}")
        platform.delete(config.name)


def ray_proxy_part(
    manager: LocalPlatform, cfg: EndpointBenchConfig, workdir: Path, progress: Progress
) -> RouterResult:
    """Rounds of W{concurrency} through Serve's proxy ("router" side) and straight to a local
    replica ("direct" side)."""
    threads = cfg.threads or os.cpu_count() or 1
    same = cfg.model_copy(update={"threads": threads})
    on_ray = endpoint_config(same, "bench-ray", platform={"type": "ray", "ray": {"address": cfg.ray_address}})
    ray_platform = RayPlatform(manager.store)
    with (
        _created(ray_platform, on_ray, progress) as proxied,
        _created(manager, endpoint_config(same, "bench-direct"), progress) as local,
    ):
        assert proxied.url is not None
        urls = {"router": proxied.url, "direct": local.replicas[0].url}
        bench = chat_workload(
            proxied.url, chat_messages(cfg.concurrency), workdir, max_new_tokens=cfg.max_new_tokens
        )
        progress(f"warm-up: one unmeasured W{cfg.concurrency} run on each side")
        _side(bench, urls["router"])
        _side(bench, urls["direct"])
        rounds = []
        for i in range(cfg.rounds):
            order: tuple[Literal["router", "direct"], ...] = (
                ("router", "direct") if i % 2 == 0 else ("direct", "router")
            )
            sides: dict[str, SideResult] = {}
            for side in order:
                progress(f"round {i + 1}/{cfg.rounds}: {'Serve proxy' if side == 'router' else 'direct'}")
                sides[side] = _side(bench, urls[side])
            rounds.append(RouterRound(first=order[0], router=sides["router"], direct=sides["direct"]))
    return RouterResult(
        model_version=local.replicas[0].model_version,
        rounds=rounds,
        ratio_median=statistics.median(r.ratio for r in rounds),
        router_ttft_ms_p50=statistics.median(r.router.ttft_ms_p50 for r in rounds),
        direct_ttft_ms_p50=statistics.median(r.direct.ttft_ms_p50 for r in rounds),
        goal=PROXY_GOAL,
    )
