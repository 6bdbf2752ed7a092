"""Prometheus metrics, on a registry of the service's own (two apps in one process never share counters).

Names: ``ptuning_requests_total{endpoint,status}``, ``ptuning_request_errors_total{endpoint,status}`` (status >= 400),
``ptuning_request_latency_seconds{endpoint}`` (to the last byte, streams included), ``ptuning_batch_size{kind}``
(rows per batch run), ``ptuning_queue_depth`` (rows waiting for the batcher), ``ptuning_inflight_requests``,
``ptuning_generated_tokens_total``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no ``*_created`` series: one timestamp per label set doubles the output for nothing

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ptuning_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("ptuning_request_errors", "HTTP requests answered with status >= 400",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("ptuning_request_latency_seconds", "Time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ptuning_batch_size", "Rows per batch run", ["kind"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("ptuning_queue_depth", "Rows waiting for the batcher", registry=r)
        self.inflight = Gauge("ptuning_inflight_requests", "HTTP requests being answered", registry=r)
        self.tokens = Counter("ptuning_generated_tokens", "Tokens generated", registry=r)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
