"""Prometheus metrics of the lens service, in a registry of the app's own (so that several
apps in one process, as in the tests, do not share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double every counter for little use.
disable_created_metrics()

__all__ = ["CONTENT_TYPE", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tzoo_lens_requests",
            "Lens requests finished, by analysis and final status.",
            ["analysis", "status"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "tzoo_lens_rejected",
            "Lens requests refused before queueing, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tzoo_lens_request_seconds",
            "Seconds from submission to result, by analysis.",
            ["analysis"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tzoo_lens_batch_requests",
            "Requests run together in one batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.websockets = Gauge(
            "tzoo_websocket_connections", "Open WebSocket connections.", registry=self.registry
        )
        self.queue_size = Gauge(
            "tzoo_lens_queue_size", "Lens requests waiting.", registry=self.registry
        )
        self.running = Gauge(
            "tzoo_lens_running", "Lens requests running now.", registry=self.registry
        )
        self.models_loaded = Gauge(
            "tzoo_models_loaded", "Models loaded in this process.", registry=self.registry
        )
        self.model_bytes = Gauge(
            "tzoo_model_memory_bytes",
            "Memory the loaded models take together.",
            registry=self.registry,
        )

    def bind(
        self,
        *,
        queue_size: Callable[[], float],
        running: Callable[[], float],
        models_loaded: Callable[[], float],
        model_bytes: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time."""
        self.queue_size.set_function(queue_size)
        self.running.set_function(running)
        self.models_loaded.set_function(models_loaded)
        self.model_bytes.set_function(model_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
