"""Prometheus metrics of the RAG service (one registry per app, so tests and several apps in
one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RagMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rag_requests", "Requests by route and status code.", ["route", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "rag_request_duration_seconds",
            "Whole request, by route.",
            ["route"],
            buckets=_LATENCY,
            registry=self.registry,
        )
        self.retrieval_seconds = Histogram(
            "rag_retrieval_duration_seconds",
            "Expansion + embedding + search + rerank.",
            buckets=_LATENCY,
            registry=self.registry,
        )
        self.llm_seconds = Histogram(
            "rag_llm_duration_seconds",
            "The LLM call (to its last token when streaming).",
            buckets=_LATENCY,
            registry=self.registry,
        )
        self.llm_failures = Counter(
            "rag_llm_failures",
            "LLM calls that failed, by the LLM's error type.",
            ["error_type"],
            registry=self.registry,
        )
        self.context_chunks = Histogram(
            "rag_context_chunks",
            "Chunks that fitted in the prompt.",
            buckets=(0, 1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        self.dropped_chunks = Counter(
            "rag_dropped_chunks",
            "Retrieved chunks left out to fit the model's limits.",
            registry=self.registry,
        )
