"""Small pure parts of the operator: Events of a round, the housekeeper refcount, pool settings."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from damops.config import Settings
from damops.k8s.events import summary
from damops.k8s.housekeepers import RefCount
from damops.k8s.models import WorkerPoolSpec
from damops.k8s.poolconfig import SchedulerConfig, pool_settings
from damops.k8s.reconcile import Action, ActionKind, Reason


def test_events_of_a_round() -> None:
    done = [
        Action(ActionKind.CREATE, reason=Reason.SCALE_UP),
        Action(ActionKind.CREATE, reason=Reason.SCALE_UP),
        Action(ActionKind.DELETE, "dead", Reason.POD_FAILED),
        Action(ActionKind.DELETE, "x", Reason.SCALE_DOWN_FREE),
        Action(ActionKind.DRAIN, "busy", Reason.SCALE_DOWN_ACTIVE),
    ]
    events = {e.reason: e for e in summary(done, desired=4)}
    assert set(events) == {"WorkerRestarted", "ScalingUp", "ScalingDown", "Draining"}
    assert events["WorkerRestarted"].type == "Warning" and "dead: pod failed" in events["WorkerRestarted"].message
    assert events["ScalingUp"].message == "created 2 worker pod(s) (desired 4)"
    assert events["ScalingDown"].message == "deleted 2 worker pod(s): pod failed, scale down (free)"
    assert summary([], desired=4) == []


def test_reasons_know_scale_down_from_restarts() -> None:
    assert {r for r in Reason if r.scale_down} == {
        Reason.SCALE_DOWN_PENDING,
        Reason.SCALE_DOWN_FREE,
        Reason.SCALE_DOWN_ACTIVE,
    }
    assert {r for r in Reason if r.pod_finished} == {Reason.POD_FAILED, Reason.POD_SUCCEEDED}


def test_refcount_says_first_and_last() -> None:
    refs = RefCount()
    assert refs.acquire("db1") is True
    assert refs.acquire("db1") is False
    assert refs.acquire("db2") is True and len(refs) == 2
    assert refs.release("db1") is False
    assert refs.release("db1") is True and len(refs) == 1
    assert refs.release("db1") is False  # released more often than acquired: nothing to stop twice
    assert refs.release("never") is False and len(refs) == 1


def test_pool_timings_override_the_operator_defaults() -> None:
    base = Settings(SCHEDULER_HEARTBEAT="1s", MAX_WORKER_ACTIVE_TIME="10m")
    spec = WorkerPoolSpec.model_validate({"timings": {"maxWorkerActiveTime": "6s", "operationWaitInterval": "500ms"}})
    s = pool_settings(base, spec)
    assert s.max_worker_active_time == 6.0 and s.operation_wait_interval == 0.5
    assert s.scheduler_heartbeat == 1.0  # unset: the Helm value
    assert base.max_worker_active_time == 600.0  # the operator's own settings are untouched
    a = SchedulerConfig("postgresql://db", "p", "secret", s)
    assert a.key == SchedulerConfig("postgresql://db", "p", "secret", pool_settings(base, spec)).key
    assert a.key != SchedulerConfig("postgresql://db", "p", "rotated", s).key
    assert a.key != SchedulerConfig("postgresql://db", "p", "secret", base).key


def test_pool_worker_prefetch_overrides_the_operators_and_restarts_the_scheduler() -> None:
    base = Settings(WORKER_PREFETCH="false")
    assert pool_settings(base, WorkerPoolSpec()).worker_prefetch is False
    on = pool_settings(base, WorkerPoolSpec.model_validate({"workerPrefetch": True}))
    assert on.worker_prefetch is True
    assert pool_settings(Settings(WORKER_PREFETCH="true"), WorkerPoolSpec()).worker_prefetch is True
    off = pool_settings(Settings(WORKER_PREFETCH="true"), WorkerPoolSpec.model_validate({"workerPrefetch": False}))
    assert off.worker_prefetch is False
    key = lambda s: SchedulerConfig("postgresql://db", "p", "secret", s).key  # noqa: E731
    assert key(on) != key(pool_settings(base, WorkerPoolSpec())), "a changed prefetch restarts the scheduler"


def test_pool_worker_prefetch_depth_overrides_the_operators_and_restarts_the_scheduler() -> None:
    base = Settings(WORKER_PREFETCH="true", WORKER_PREFETCH_DEPTH="2")
    assert pool_settings(base, WorkerPoolSpec()).worker_prefetch_depth == 2
    deeper = pool_settings(base, WorkerPoolSpec.model_validate({"workerPrefetchDepth": 8}))
    assert deeper.worker_prefetch_depth == 8
    key = lambda s: SchedulerConfig("postgresql://db", "p", "secret", s).key  # noqa: E731
    assert key(deeper) != key(pool_settings(base, WorkerPoolSpec())), "a changed depth restarts the scheduler"
    with pytest.raises(ValidationError):
        WorkerPoolSpec.model_validate({"workerPrefetchDepth": 0})


def test_pool_worker_prefetch_max_wait_overrides_the_operators_and_restarts_the_scheduler() -> None:
    base = Settings(WORKER_PREFETCH="true", WORKER_PREFETCH_MAX_WAIT="2s")
    assert pool_settings(base, WorkerPoolSpec()).worker_prefetch_max_wait == 2.0
    shorter = pool_settings(base, WorkerPoolSpec.model_validate({"workerPrefetchMaxWait": "250ms"}))
    assert shorter.worker_prefetch_max_wait == 0.25
    key = lambda s: SchedulerConfig("postgresql://db", "p", "secret", s).key  # noqa: E731
    assert key(shorter) != key(pool_settings(base, WorkerPoolSpec())), "a changed max wait restarts the scheduler"
    for bad in ("0s", "0", "soon"):
        with pytest.raises(ValidationError):
            WorkerPoolSpec.model_validate({"workerPrefetchMaxWait": bad})
    with pytest.raises(ValidationError):
        Settings(WORKER_PREFETCH_MAX_WAIT="0")


def test_no_operation_log_drops_the_line_per_run_and_keeps_warnings() -> None:
    from damops.k8s.main import build_parser, set_log_levels
    from damops.logs import OPERATION_LOG

    loggers = [logging.getLogger(name) for name in (OPERATION_LOG, "damops", "kopf.objects")]
    operations, damops_log = loggers[0], loggers[1]
    saved = [logger.level for logger in loggers]
    try:
        for argv, info_shown in (([], True), (["--no-operation-log"], False)):
            args = build_parser().parse_args(argv)
            set_log_levels(verbose=args.verbose, operation_log=args.operation_log)
            assert operations.isEnabledFor(logging.INFO) is info_shown
            assert operations.isEnabledFor(logging.WARNING)
            assert damops_log.isEnabledFor(logging.INFO)  # the operator's other lines stay
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


def test_the_schedulers_counters_become_prometheus_counters_by_their_increase() -> None:
    from prometheus_client import REGISTRY

    from damops.k8s.metrics import observe_stats

    labels = {"namespace": "ns-counters", "workerpool": "pool-counters"}
    seen: dict[str, float] = {}
    observe_stats("ns-counters", "pool-counters", {"prefetched": 4, "overdue_handed_back": 1}, seen)
    observe_stats("ns-counters", "pool-counters", {"prefetched": 10, "overdue_handed_back": 3}, seen)
    assert REGISTRY.get_sample_value("damops_operations_prefetched_total", labels) == 10
    assert REGISTRY.get_sample_value("damops_operations_handed_back_overdue_total", labels) == 3
