"""``GET /metrics``: the engine's metrics and the HTTP layer's, in one registry.

The engine's series (``capibara_requests_finished_total``, TTFT/TPOT summaries, ...)
come from ``SnapshotCollector`` over ``engine.metrics()`` at each scrape; the HTTP
layer adds request counts by endpoint and status, client disconnects, request
durations and the KV page pool (so a load test can see every page come back).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from capibara.core.inference.metrics import SnapshotCollector

# Request durations from a few ms (a rejected request) to minutes (a long generation).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _PoolCollector:
    """KV pages by state, and the HTTP requests being served, read at each scrape."""

    def __init__(self, engine, active: set):
        self._engine, self._active = engine, active

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        counts = self._engine.page_counts()
        pages = GaugeMetricFamily("capibara_kv_pages", "KV cache pages by state.", labels=["state"])
        for state in ("free", "prefix_cache", "capacity"):
            pages.add_metric([state], counts[state])
        yield pages
        yield GaugeMetricFamily(
            "capibara_http_active_requests",
            "Generation requests the HTTP server is serving now.",
            value=len(self._active),
        )


class ServerMetrics:
    """The registry of one server (its own, not the process-global one: two apps in one
    process, e.g. in tests, never share counters)."""

    def __init__(self, engine, active: set):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(engine.metrics))
        self.registry.register(_PoolCollector(engine, active))
        self.http_requests = Counter(
            "capibara_http_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "capibara_http_client_disconnects",
            "Generation requests whose client went away before the whole response was "
            "sent (aborted in the engine if still running there).",
            ["endpoint"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "capibara_http_request_duration_seconds",
            "Arrival to last byte of a generation request.",
            ["endpoint"],
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
