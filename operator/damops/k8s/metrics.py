"""Prometheus metrics of the operator (served on DAMOPS_METRICS_PORT, default 9090).

Per WorkerPool and per API verb here; the engine's histograms (enqueue → start,
execution time by pool and trigger function) come from damops.metrics, on the same endpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger("damops.operator")

_LABELS = ("namespace", "workerpool")

WORKERS = Gauge("damops_workers", "Workers of a WorkerPool by state", _LABELS + ("state",))
DESIRED = Gauge("damops_desired_replicas", "Workers wanted: spec.replicas or the autoscaler's decision", _LABELS)
REPLICAS = Gauge("damops_replicas", "Worker pods that exist and are not terminating", _LABELS)
RECOMMENDED = Gauge(
    "damops_autoscaler_recommended_replicas", "Workers the autoscaler wants for the load, before its windows", _LABELS
)
AUTOSCALED = Counter(
    "damops_autoscaler_decisions", "Changes of the desired replicas by the autoscaler", _LABELS + ("direction",)
)
QUEUED = Gauge("damops_queued_operations", "Claimable (NEW or WAIT) operations of the pool", _LABELS + ("pool",))
CLAIMED = Counter("damops_operations_claimed", "Operations claimed for workers", _LABELS)
SUCCEEDED = Counter("damops_operations_succeeded", "Operations that reached SUCCESS", _LABELS)
FAILED = Counter("damops_operations_failed", "Operations that reached FAILED", _LABELS)
RETRIED = Counter("damops_operations_retried", "Operations given back for another attempt", _LABELS)
PREFETCHED = Counter(
    "damops_operations_prefetched", "Operations sent ahead to a busy worker's sidecar (workerPrefetch)", _LABELS
)
HANDED_BACK_OVERDUE = Counter(
    "damops_operations_handed_back_overdue",
    "Operations held ahead that were handed back: the one running outlasted workerPrefetchMaxWait",
    _LABELS,
)
WORKER_RESTARTS = Counter("damops_worker_restarts", "Worker pods replaced by the operator", _LABELS + ("reason",))
ROUNDS = Counter("damops_reconcile_rounds", "Reconcile rounds of a WorkerPool's daemon", _LABELS)
API_REQUESTS = Counter(
    "damops_api_requests", "Kubernetes API requests of the operator's own client (kopf's watches aside)", ("verb",)
)

_STATS = {
    "claimed": CLAIMED,
    "succeeded": SUCCEEDED,
    "failed": FAILED,
    "retried": RETRIED,
    "prefetched": PREFETCHED,
    "overdue_handed_back": HANDED_BACK_OVERDUE,
}

_started = False


def start_server() -> None:
    global _started
    port = int(os.environ.get("DAMOPS_METRICS_PORT", "9090"))
    if _started or port <= 0:
        return
    start_http_server(port)
    _started = True
    log.info("metrics on :%d/metrics", port)


def observe_stats(namespace: str, name: str, stats: Mapping[str, float], seen: dict[str, float]) -> None:
    """Turn the scheduler's cumulative stats into counter increments."""
    for key, counter in _STATS.items():
        value = float(stats.get(key, 0) or 0)
        delta = value - seen.get(key, 0.0)
        if delta > 0:
            counter.labels(namespace, name).inc(delta)
        seen[key] = value
