"""Serving metrics: per-request latencies, throughput, utilisation, prefix hits, expert load.

``EngineMetrics`` is updated by the engine thread under the engine lock;
``snapshot()`` returns an immutable ``MetricsSnapshot``. ``SnapshotCollector`` turns
snapshots into ``prometheus_client`` metric families (registered in a server's
``CollectorRegistry``, it reads a fresh snapshot at every scrape), and
``prometheus_text`` renders one snapshot in the text exposition format through it.

The engine keeps its own counters (they are also read by ``metrics()``, without
Prometheus); the collector re-exports them at scrape time instead of mirroring every
update into ``prometheus_client`` objects from the engine thread.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import CollectorRegistry

WINDOW = 10_000  # latency samples kept per series (the most recent)
QUANTILES = (0.5, 0.9, 0.99)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Count, mean and quantiles of a latency series (seconds), over the recent window."""

    count: int
    mean: float
    quantiles: dict[float, float]

    @classmethod
    def of(cls, samples, total_count: int) -> Summary:
        if not samples:
            return cls(total_count, 0.0, {q: 0.0 for q in QUANTILES})
        values = np.asarray(samples, np.float64)
        return cls(
            total_count,
            float(values.mean()),
            {q: float(np.quantile(values, q)) for q in QUANTILES},
        )


@dataclasses.dataclass(frozen=True)
class MetricsSnapshot:
    """The engine's state and history at one moment."""

    requests_finished: dict[str, int]  # by finish reason
    requests_rejected: int  # QueueFullError or validation errors at submit
    preemptions: int
    generated_tokens: int
    prompt_tokens: int
    tokens_per_second: float  # generated tokens / time the engine was busy
    ttft: Summary
    tpot: Summary
    e2e_latency: Summary
    queue_depth: int
    running: int
    slot_utilization: float  # running / max_slots
    page_utilization: float  # pages in use (sequences or prefix cache) / usable pages
    prefix_cache_hit_rate: float  # prompt tokens served from cache / prompt tokens looked up
    prefix_cache_pages: int
    steps: int
    compilations: int
    expert_load: list[list[float]] | None  # [moe_layers][E]: tokens routed to each expert
    expert_load_imbalance: float | None  # max / mean expert load (1 = balanced)


class EngineMetrics:
    def __init__(self):
        self.finished: collections.Counter[str] = collections.Counter()
        self.rejected = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.busy_seconds = 0.0
        self.steps = 0
        self.ttft = collections.deque(maxlen=WINDOW)
        self.tpot = collections.deque(maxlen=WINDOW)
        self.e2e = collections.deque(maxlen=WINDOW)
        self.counts = collections.Counter()
        self.expert_load: np.ndarray | None = None

    def record_step(
        self, seconds: float, new_tokens: int, load: np.ndarray | None, *, steps: int = 1
    ) -> None:
        self.steps += steps
        self.busy_seconds += seconds
        self.generated_tokens += new_tokens
        if load is not None:
            load = load.astype(np.float64)
            self.expert_load = load if self.expert_load is None else self.expert_load + load

    def record_finish(self, reason: str, metrics) -> None:
        self.finished[reason] += 1
        self.prompt_tokens += metrics.prompt_tokens
        self.counts["e2e"] += 1
        self.e2e.append(metrics.e2e)
        if metrics.ttft is not None:
            self.counts["ttft"] += 1
            self.ttft.append(metrics.ttft)
        if metrics.tpot is not None:
            self.counts["tpot"] += 1
            self.tpot.append(metrics.tpot)

    def snapshot(self, *, scheduler, prefix_cache, compilations: int) -> MetricsSnapshot:
        pool = scheduler.pool
        load = self.expert_load
        imbalance = None
        if load is not None and load.sum() > 0:
            imbalance = float((load.max(axis=-1) / np.maximum(load.mean(axis=-1), 1e-9)).mean())
        return MetricsSnapshot(
            requests_finished=dict(self.finished),
            requests_rejected=self.rejected,
            preemptions=scheduler.num_preemptions,
            generated_tokens=self.generated_tokens,
            prompt_tokens=self.prompt_tokens,
            tokens_per_second=self.generated_tokens / self.busy_seconds
            if self.busy_seconds
            else 0.0,
            ttft=Summary.of(self.ttft, self.counts["ttft"]),
            tpot=Summary.of(self.tpot, self.counts["tpot"]),
            e2e_latency=Summary.of(self.e2e, self.counts["e2e"]),
            queue_depth=len(scheduler.waiting),
            running=len(scheduler.running),
            slot_utilization=len(scheduler.running) / scheduler.config.max_slots,
            page_utilization=(pool.capacity - pool.num_free) / pool.capacity,
            prefix_cache_hit_rate=prefix_cache.hit_rate if prefix_cache else 0.0,
            prefix_cache_pages=len(prefix_cache) if prefix_cache else 0,
            steps=self.steps,
            compilations=compilations,
            expert_load=None if load is None else load.tolist(),
            expert_load_imbalance=imbalance,
        )


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


class SnapshotCollector:
    """A ``prometheus_client`` collector of ``MetricsSnapshot``s.

    ``snapshot`` is called at every ``collect()`` (every scrape), e.g.
    ``SnapshotCollector(engine.metrics)``. Names are ``{prefix}_...``; counters end in
    ``_total`` and summaries carry ``quantile`` samples over the recent window.
    """

    def __init__(self, snapshot: Callable[[], MetricsSnapshot], prefix: str = "capibara"):
        self._snapshot = snapshot
        self._prefix = prefix

    def describe(self) -> list[Metric]:
        return []  # no fixed description: expert metrics exist only for MoE models

    def collect(self) -> Iterator[Metric]:
        m = self._snapshot()
        p = self._prefix

        def counter(name, help_text, value):
            return CounterMetricFamily(f"{p}_{name}", help_text, value=value)

        def gauge(name, help_text, value):
            return GaugeMetricFamily(f"{p}_{name}", help_text, value=value)

        def summary(name, help_text, s: Summary):
            family = SummaryMetricFamily(f"{p}_{name}", help_text)
            for q, v in s.quantiles.items():
                family.add_sample(f"{p}_{name}", {"quantile": str(q)}, v)
            # The sum over the window's samples (the count is every sample ever):
            # quantiles and the mean describe the recent window.
            family.add_sample(f"{p}_{name}_sum", {}, s.mean * min(s.count, WINDOW))
            family.add_sample(f"{p}_{name}_count", {}, s.count)
            return family

        finished = CounterMetricFamily(
            f"{p}_requests_finished", "Finished requests by reason.", labels=["reason"]
        )
        for reason, n in sorted((m.requests_finished or {"length": 0}).items()):
            finished.add_metric([reason], n)
        yield finished
        yield counter("requests_rejected", "Rejected at submit.", m.requests_rejected)
        yield counter("preemptions", "Requests preempted for pages.", m.preemptions)
        yield counter("generated_tokens", "Tokens generated.", m.generated_tokens)
        yield counter("prompt_tokens", "Prompt tokens served.", m.prompt_tokens)
        yield counter("steps", "Engine steps run.", m.steps)
        yield gauge("compilations", "Compiled step shapes.", m.compilations)
        yield gauge("tokens_per_second", "Generated tokens per busy second.", m.tokens_per_second)
        yield summary("time_to_first_token_seconds", "Arrival to first token.", m.ttft)
        yield summary(
            "time_per_output_token_seconds", "Mean time per token after the first.", m.tpot
        )
        yield summary("e2e_latency_seconds", "Arrival to finish.", m.e2e_latency)
        yield gauge("queue_depth", "Waiting requests.", m.queue_depth)
        yield gauge("running_requests", "Requests in the batch.", m.running)
        yield gauge("slot_utilization", "Busy slots / slots.", m.slot_utilization)
        yield gauge("page_utilization", "KV pages in use / pages.", m.page_utilization)
        yield gauge(
            "prefix_cache_hit_rate",
            "Prompt tokens from the prefix cache / looked up.",
            m.prefix_cache_hit_rate,
        )
        yield gauge("prefix_cache_pages", "Pages held by the prefix cache.", m.prefix_cache_pages)
        if m.expert_load is not None:
            experts = CounterMetricFamily(
                f"{p}_expert_tokens", "Tokens routed to each expert.", labels=["layer", "expert"]
            )
            for i, row in enumerate(m.expert_load):
                for e, v in enumerate(row):
                    experts.add_metric([str(i), str(e)], v)
            yield experts
            yield gauge(
                "expert_load_imbalance",
                "Max / mean expert load, averaged over MoE layers.",
                m.expert_load_imbalance or 0.0,
            )


def prometheus_text(m: MetricsSnapshot, prefix: str = "capibara") -> str:
    """``m`` in the Prometheus text format (``# HELP``/``# TYPE`` then samples)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: m, prefix))
    return generate_latest(registry).decode()
