"""Prometheus metrics of one server: requests, latency, batches, queue and truncation.

Each app gets its own `CollectorRegistry`, so two servers in one process (tests, a
benchmark) never share or double-register counters. The batch histograms are what show
dynamic batching at work: `diffcse_batch_requests` counts how many different requests one
`session.run` served.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # the *_created series only double the exposition

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServeMetrics:
    """The server's metric families, registered in a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "diffcse_requests", "HTTP requests by path and status.", ["path", "status"], registry=r
        )
        self.latency = Histogram(
            "diffcse_request_duration_seconds",
            "Time from request to response, by path.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "diffcse_requests_in_flight", "Embedding requests being served now.", registry=r
        )
        self.inputs = Counter("diffcse_inputs", "Texts embedded, by model.", ["model"], registry=r)
        self.tokens = Counter(
            "diffcse_prompt_tokens",
            "Tokens embedded (after truncation), by model.",
            ["model"],
            registry=r,
        )
        self.truncated = Counter(
            "diffcse_inputs_truncated",
            "Texts cut to the model's token limit.",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "diffcse_queue_depth", "Texts waiting for a worker, by model.", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "diffcse_batch_size",
            "Texts per session run.",
            ["model"],
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "diffcse_batch_tokens",
            "Padded tokens (rows x longest row) per session run.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "diffcse_batch_requests",
            "Distinct requests served by one session run.",
            ["model"],
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "diffcse_batch_duration_seconds",
            "Time of one session run (the ids were tokenized with the request), by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "diffcse_queue_rejected",
            "Requests refused with 503 because the queue was full.",
            ["model"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
