"""Pure helpers of the kopf handlers: per-pool settings, pod parsing, conditions."""

from __future__ import annotations

from damops.config import Settings
from damops.k8s.handlers import _conditions, _pod_info, _pool_settings, _waiting_reasons
from damops.k8s.models import Condition, WorkerPoolSpec


def test_pool_timings_override_the_operator_defaults() -> None:
    base = Settings(SCHEDULER_HEARTBEAT="1s", MAX_WORKER_ACTIVE_TIME="10m")
    spec = WorkerPoolSpec.model_validate({"timings": {"maxWorkerActiveTime": "6s", "operationWaitInterval": "500ms"}})
    s = _pool_settings(base, spec)
    assert s.max_worker_active_time == 6.0 and s.operation_wait_interval == 0.5
    assert s.scheduler_heartbeat == 1.0  # unset: the Helm value
    assert base.max_worker_active_time == 600.0  # the operator's own settings are untouched


def test_pod_info_reads_phase_ip_hash_and_draining() -> None:
    pod = {
        "metadata": {
            "name": "p",
            "uid": "u",
            "labels": {"damops.dev/template-hash": "abc"},
            "annotations": {"damops.dev/draining": "true"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {"phase": "Running", "podIP": "198.18.0.5"},
    }
    info = _pod_info(pod, {"p": "active"})
    assert (info.template_hash, info.ip, info.draining, info.worker_state, info.terminating) == (
        "abc",
        "198.18.0.5",
        True,
        "active",
        False,
    )
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    assert _pod_info(pod, {}).terminating and _pod_info(pod, {}).worker_state is None


def test_waiting_reasons_report_broken_pods() -> None:
    pods = [
        {
            "metadata": {"name": "p"},
            "status": {
                "containerStatuses": [
                    {"name": "worker", "state": {"waiting": {"reason": "ErrImageNeverPull"}}},
                    {"name": "sidecar", "state": {"running": {}}},
                ]
            },
        }
    ]
    assert _waiting_reasons(pods) == ["p/worker: ErrImageNeverPull"]


def test_condition_transition_time_kept_while_status_unchanged() -> None:
    old = [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    same = _conditions(old, [Condition(type="Ready", status="True", reason="AllWorkersReady")])
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    flipped = _conditions(old, [Condition(type="Ready", status="False", reason="WorkersNotReady")])
    assert flipped[0]["lastTransitionTime"] != "2026-01-01T00:00:00Z"
