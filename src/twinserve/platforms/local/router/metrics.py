"""The endpoint's own Prometheus metrics, served by its router at `GET /router/metrics`.

The replicas' `/metrics` (TGI's names) describe one replica each; these describe the endpoint:
load per traffic group (variant@generation) as the router sees it, the desired replica counts
and every scaling decision (autoscaler or manual) as counters by direction, so a dashboard can
plot scaling next to load. Read at scrape time: the router's pool for load, the state store
for desired counts and events.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twinserve.deploy.state import StateStore
from twinserve.errors import NotFoundError
from twinserve.platforms.local.router.pool import ReplicaPool


class EndpointCollector(Collector):
    """Collects one endpoint's metrics on each scrape."""

    def __init__(self, pool: ReplicaPool, store: StateStore, name: str) -> None:
        self.pool, self.store, self.name = pool, store, name

    def collect(self) -> Iterator[Metric]:
        labels = ["endpoint", "group"]
        replicas = GaugeMetricFamily(
            "twinserve_endpoint_replicas",
            "Replicas taking requests per traffic group (variant@generation).",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "twinserve_endpoint_in_flight_requests", "Requests outstanding per traffic group.", labels=labels
        )
        routed = CounterMetricFamily(
            "twinserve_endpoint_routed_requests",
            "Requests routed per traffic group since the router started.",
            labels=labels,
        )
        for group, stats in self.pool.stats().items():
            replicas.add_metric([self.name, group], stats.replicas)
            in_flight.add_metric([self.name, group], stats.in_flight)
            routed.add_metric([self.name, group], stats.routed_total)
        yield from (replicas, in_flight, routed)
        try:
            endpoint = self.store.get_endpoint(self.name)
        except NotFoundError:  # being deleted
            return
        desired = GaugeMetricFamily(
            "twinserve_endpoint_desired_replicas",
            "Replicas the control plane aims at per variant.",
            labels=["endpoint", "variant"],
        )
        for v in endpoint.variants:
            desired.add_metric([self.name, v.name], v.desired_replicas)
        generation = GaugeMetricFamily(
            "twinserve_endpoint_generation", "Config generation being served.", labels=["endpoint"]
        )
        generation.add_metric([self.name], endpoint.generation)
        events = CounterMetricFamily(
            "twinserve_endpoint_scaling_events",
            "Scaling decisions (autoscaler or manual) per variant and direction.",
            labels=["endpoint", "variant", "direction"],
        )
        counts: dict[tuple[str, str], int] = {}
        for event in self.store.events(self.name):
            direction = "out" if event.to_replicas > event.from_replicas else "in"
            counts[(event.variant, direction)] = counts.get((event.variant, direction), 0) + 1
        for (variant, direction), count in sorted(counts.items()):
            events.add_metric([self.name, variant, direction], count)
        yield from (desired, generation, events)


def metrics_exposition(pool: ReplicaPool, store: StateStore, name: str) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EndpointCollector(pool, store, name))
    return generate_latest(registry)
