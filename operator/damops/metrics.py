"""Prometheus metrics of the engine, wherever a scheduler runs (``damops run
--metrics-port``, the operator): what happened to operations, and how long
they waited and ran. Names follow Prometheus conventions (base units, _total).
The operator's own metrics (per WorkerPool, API requests) are in damops.k8s.metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from damops.dispatch import Snapshot

# Asset operations take from milliseconds to many minutes.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

FINISHED = Counter(
    "damops_operation_runs",
    "Runs of operations whose StatusUpdate was stored, by the status it left (SUCCESS, FAILED, NEW = retried, ...)",
    ("pool", "trigger_function", "status"),
)
DURATION = Histogram(
    "damops_operation_duration_seconds",
    "Execution time of one run of an operation (start to StatusUpdate)",
    ("pool", "trigger_function"),
    buckets=_SECONDS,
)
QUEUE_WAIT = Histogram(
    "damops_operation_queue_seconds",
    "Time from enqueue to the start of its first run",
    ("pool", "trigger_function"),
    buckets=_SECONDS,
)


def observe_run(
    pool: str, trigger_function: str, status: str, attempts: int, duration: float | None, waited: float | None
) -> None:
    finished, durations, queue_waits = _series(pool, trigger_function, status)
    finished.inc()
    if duration is not None:
        durations.observe(max(duration, 0.0))
    if waited is not None and attempts == 1:
        queue_waits.observe(max(waited, 0.0))


@functools.cache
def _series(pool: str, trigger_function: str, status: str) -> tuple[Any, Any, Any]:
    """The labelled series of one kind of run, looked up once: ``labels()``
    validates and locks on every call, a cost paid per operation otherwise."""
    return (
        FINISHED.labels(pool, trigger_function, status),
        DURATION.labels(pool, trigger_function),
        QUEUE_WAIT.labels(pool, trigger_function),
    )


class WorkersCollector(Collector):
    """Workers by state (and the scheduler's counters) read from a snapshot at scrape time."""

    def __init__(self, pool: str, snapshot: Callable[[], Snapshot]) -> None:
        self.pool = pool
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self.snapshot()
        workers = GaugeMetricFamily(
            "damops_scheduler_workers", "Workers of this scheduler by state", labels=("pool", "state")
        )
        for state, count in (
            ("pending", snap.pending),
            ("free", snap.free),
            ("active", snap.active),
            ("draining", snap.draining),
        ):
            workers.add_metric((self.pool, state), count)
        yield workers
        for key, help_text in _SCHEDULER_COUNTERS.items():
            family = CounterMetricFamily(f"damops_scheduler_{key}", help_text, labels=("pool",))
            family.add_metric((self.pool,), float(snap.stats.get(key, 0) or 0))
            yield family


# Counters of the dispatch core worth watching: the difference between a
# hand-over and an execution (released), and what the scheduler had to recover.
_SCHEDULER_COUNTERS = {
    "released": "Hand-overs given back without using an attempt (they never reached the trigger function)",
    "recovered": "Operations the scheduler ended as failures: their worker died, expired or was removed",
    "readopted": "Operations kept across a dropped channel or adopted from a sidecar (not run twice)",
    "prefetched": "Operations sent ahead to a busy worker's sidecar (WORKER_PREFETCH)",
    "overdue_handed_back": "Operations held ahead that were handed back: the one running outlasted WORKER_PREFETCH_MAX_WAIT",
    "dropped_channels": "Scheduler-sidecar channels that dropped",
    "write_errors": "StatusUpdates the database refused as sent (stored as failures naming why)",
}


@dataclass
class MetricsServer:
    port: int
    close: Callable[[], None]


def serve(port: int, pool: str, snapshot: Callable[[], Snapshot], host: str = "127.0.0.1") -> MetricsServer:
    """Serve /metrics (port 0: a free one) until ``close()``."""
    from prometheus_client import start_http_server

    collector = WorkersCollector(pool, snapshot)
    REGISTRY.register(collector)
    server, _ = start_http_server(port, addr=host)

    def close() -> None:
        server.shutdown()
        REGISTRY.unregister(collector)

    return MetricsServer(int(server.server_port), close)
