"""Prometheus metrics under TGI's names, plus the latency histograms TGI lacks.

Each app owns its registry (tests build many apps in one process). TGI's counters are
exposed under their exact names (`tgi_request_count`, not `..._total`) as untyped
samples, so Grafana dashboards written for TGI work unchanged; `rate()` does not care.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# `*_created` series double the payload and no TGI/vLLM dashboard reads them
disable_created_metrics()

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class EngineGauges:
    """What the engine reports at scrape time."""

    queue_size: int
    batch_size: int
    prefix_queries: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_tokens_held: int = 0
    speculation_steps: int = 0
    speculation_draft_tokens: int = 0
    speculation_accepted_tokens: int = 0


class _Counters(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.request_count = 0
        self.request_success = 0
        self.failures: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield _untyped("tgi_request_count", "Requests received (counter).", self.request_count)
            yield _untyped("tgi_request_success", "Requests that finished (counter).", self.request_success)
            failure = Metric(
                "tgi_request_failure", "Requests that failed, by error type (counter).", "unknown"
            )
            for err, n in sorted(self.failures.items()):
                failure.add_sample("tgi_request_failure", {"err": err}, n)
            yield failure


def _untyped(name: str, doc: str, value: float) -> Metric:
    metric = Metric(name, doc, "unknown")
    metric.add_sample(name, {}, value)
    return metric


class _Gauges(Collector):
    def __init__(self, read: Callable[[], EngineGauges | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        gauges = self._read() or EngineGauges(0, 0)
        for name, doc, value in (
            ("tgi_queue_size", "Requests waiting for a batch slot.", gauges.queue_size),
            ("tgi_batch_current_size", "Requests in the running batch.", gauges.batch_size),
            ("prefix_cache_tokens", "Tokens whose KV the prefix cache holds.", gauges.prefix_tokens_held),
            (
                "prefix_cache_hit_rate",
                "Prompt tokens served from the prefix cache ÷ prompt tokens looked up, since start.",
                gauges.prefix_hit_tokens / gauges.prefix_queried_tokens
                if gauges.prefix_queried_tokens
                else 0.0,
            ),
            (
                "speculation_acceptance_rate",
                "Drafted tokens the model accepted ÷ tokens drafted (prompt lookup), since start.",
                gauges.speculation_accepted_tokens / gauges.speculation_draft_tokens
                if gauges.speculation_draft_tokens
                else 0.0,
            ),
        ):
            metric = Metric(name, doc, "gauge")
            metric.add_sample(name, {}, value)
            yield metric
        for name, doc, value in (
            ("prefix_cache_queries", "Prompts looked up in the prefix cache.", gauges.prefix_queries),
            (
                "prefix_cache_queried_tokens",
                "Prompt tokens looked up in the prefix cache.",
                gauges.prefix_queried_tokens,
            ),
            (
                "prefix_cache_hit_tokens",
                "Prompt tokens served from the prefix cache.",
                gauges.prefix_hit_tokens,
            ),
            ("speculation_steps", "Decode steps that verified drafted tokens.", gauges.speculation_steps),
            (
                "speculation_draft_tokens",
                "Tokens drafted by prompt lookup and verified.",
                gauges.speculation_draft_tokens,
            ),
            (
                "speculation_accepted_tokens",
                "Drafted tokens the model agreed with (each one a decode step saved).",
                gauges.speculation_accepted_tokens,
            ),
        ):
            metric = Metric(name, doc, "counter")
            metric.add_sample(f"{name}_total", {}, value)
            yield metric


class ServerMetrics:
    """Every metric the server records; one instance per app."""

    def __init__(self, read_gauges: Callable[[], EngineGauges | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = _Counters()
        self.registry.register(self._counters)
        self.registry.register(_Gauges(read_gauges))

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=self.registry)

        self.duration = hist("tgi_request_duration", "End-to-end request time (s).", _SECONDS)
        self.validation_duration = hist(
            "tgi_request_validation_duration", "Time tokenizing and validating (s).", _SECONDS
        )
        self.queue_duration = hist("tgi_request_queue_duration", "Time waiting for a batch (s).", _SECONDS)
        self.inference_duration = hist(
            "tgi_request_inference_duration", "Time in the running batch (s).", _SECONDS
        )
        self.time_per_token = hist(
            "tgi_request_mean_time_per_token_duration", "Mean time per generated token (s).", _TOKEN_SECONDS
        )
        self.generated_tokens = hist("tgi_request_generated_tokens", "Generated tokens per request.", _TOKENS)
        self.input_length = hist("tgi_request_input_length", "Prompt tokens per request.", _TOKENS)
        self.time_to_first_token = hist(
            "twinserve_time_to_first_token_seconds", "Arrival to first generated token (s).", _SECONDS
        )
        self.inter_token_latency = hist(
            "twinserve_inter_token_latency_seconds", "Time between two streamed tokens (s).", _TOKEN_SECONDS
        )

    def request_received(self) -> None:
        with self._counters._lock:
            self._counters.request_count += 1

    def request_succeeded(
        self,
        *,
        total_s: float,
        validation_s: float,
        queue_s: float,
        inference_s: float,
        prompt_tokens: int,
        generated_tokens: int,
    ) -> None:
        with self._counters._lock:
            self._counters.request_success += 1
        self.duration.observe(total_s)
        self.validation_duration.observe(validation_s)
        self.queue_duration.observe(queue_s)
        self.inference_duration.observe(inference_s)
        self.input_length.observe(prompt_tokens)
        self.generated_tokens.observe(generated_tokens)
        if generated_tokens > 0:
            self.time_per_token.observe(inference_s / generated_tokens)

    def request_failed(self, error_type: str) -> None:
        with self._counters._lock:
            self._counters.failures[error_type] = self._counters.failures.get(error_type, 0) + 1
