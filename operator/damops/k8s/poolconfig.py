"""A pool's scheduler configuration: the operator's settings with the pool's own timings (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from damops.config import Settings, parse_duration
from damops.k8s.models import WorkerPoolSpec


def pool_settings(base: Settings, spec: WorkerPoolSpec) -> Settings:
    update = {}
    for attr, value in (
        ("scheduler_heartbeat", spec.timings.scheduler_heartbeat),
        ("max_operation_processing_time", spec.timings.max_operation_processing_time),
        ("max_worker_active_time", spec.timings.max_worker_active_time),
        ("operation_wait_interval", spec.timings.operation_wait_interval),
    ):
        if value is not None:
            update[attr] = parse_duration(value)
    if spec.worker_prefetch is not None:
        update["worker_prefetch"] = spec.worker_prefetch
    if spec.worker_prefetch_depth is not None:
        update["worker_prefetch_depth"] = spec.worker_prefetch_depth
    if spec.worker_prefetch_max_wait is not None:
        update["worker_prefetch_max_wait"] = parse_duration(spec.worker_prefetch_max_wait)
    return base.model_copy(update=update)


@dataclass(frozen=True)
class SchedulerConfig:
    """What a running scheduler was started with; when it changes, the scheduler is restarted."""

    url: str
    pool: str
    secret: str
    settings: Settings

    @property
    def key(self) -> tuple[object, ...]:
        s = self.settings
        return (
            self.url,
            self.pool,
            self.secret,
            s.scheduler_heartbeat,
            s.max_operation_processing_time,
            s.max_worker_active_time,
            s.operation_wait_interval,
            s.worker_prefetch,
            s.worker_prefetch_depth,
            s.worker_prefetch_max_wait,
        )
