"""Observed pods, the operator's expectations of its own writes, the scheduler's states (pure)."""

from __future__ import annotations

from damops.dispatch import WorkerState, WorkerView
from damops.k8s.pods import Expectations, observe_pod, pod_info, scheduler_states, with_worker_states
from damops.k8s.reconcile import PodInfo, plan


def raw(name: str = "p", **status) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {"damops.dev/template-hash": "abc"},
            "annotations": {"damops.dev/draining": "true"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {"phase": "Running", "podIP": "198.18.0.5", **status},
    }


def test_pod_info_reads_phase_ip_hash_and_draining() -> None:
    pod = raw()
    info = pod_info(pod)
    assert (info.name, info.template_hash, info.ip, info.draining, info.terminating, info.worker_state) == (
        "p",
        "abc",
        "198.18.0.5",
        True,
        False,
        None,
    )
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    assert pod_info(pod).terminating
    assert pod_info({"metadata": {"name": "new"}}).phase == "Pending"  # a pod just created has no status


def test_pod_info_reads_the_kubelets_ready_condition() -> None:
    body = {"metadata": {"name": "w"}, "status": {"phase": "Running"}}
    assert pod_info(body).pod_ready is False
    body["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    assert pod_info(body).pod_ready is False
    body["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]
    assert pod_info(body).pod_ready is True


def test_broken_containers_are_problems() -> None:
    pod = raw(
        containerStatuses=[
            {"name": "worker", "state": {"waiting": {"reason": "ErrImageNeverPull"}}},
            {"name": "sidecar", "state": {"waiting": {"reason": "ContainerCreating"}}},
        ]
    )
    assert observe_pod(pod).problems == ("p/worker: ErrImageNeverPull",)
    assert observe_pod(raw()).problems == ()


def test_scheduler_states_leave_out_drained_workers_that_are_done() -> None:
    views = [
        WorkerView("a", "free", False, None, 0.1, None),
        WorkerView("b", "active", True, 7, 0.1, None),
        WorkerView("c", "free", True, None, 0.1, None),
    ]
    states = scheduler_states(views)
    assert states == {"a": WorkerState.FREE, "b": WorkerState.ACTIVE}
    joined = with_worker_states([PodInfo("a", "h"), PodInfo("c", "h")], states)
    assert [p.worker_state for p in joined] == [WorkerState.FREE, None]


def test_a_created_pod_counts_until_the_watch_shows_it() -> None:
    exp = Expectations(ttl=60)
    new = PodInfo("n1", "h")
    exp.expect_created(new, now=0)
    # the watch has not seen it yet: without the expectation, plan would create it a second time
    assert plan(2, "h", exp.apply([PodInfo("a", "h", worker_state=WorkerState.FREE)], now=1)).creates == 0
    seen = PodInfo("n1", "h", phase="Running", ip="198.18.0.3")
    assert exp.apply([seen], now=2) == [seen] and exp.created == {}


def test_a_deleted_or_drained_pod_looks_so_until_the_watch_shows_it() -> None:
    exp = Expectations(ttl=60)
    exp.expect_deleted("d", now=0)
    exp.expect_drained("r", now=0)
    pods = [PodInfo("d", "h"), PodInfo("r", "h")]
    [d, r] = exp.apply(pods, now=1)
    assert d.terminating and r.draining
    caught_up = [PodInfo("d", "h", terminating=True), PodInfo("r", "h", draining=True)]
    assert exp.apply(caught_up, now=2) == caught_up and exp.deleted == {} and exp.drained == {}


def test_expectations_are_forgotten_after_their_ttl() -> None:
    exp = Expectations(ttl=10)
    exp.expect_created(PodInfo("lost", "h"), now=0)  # e.g. deleted before the watch ever showed it
    exp.expect_deleted("d", now=0)
    assert [p.name for p in exp.apply([PodInfo("d", "h")], now=5)] == ["d", "lost"]
    [d] = exp.apply([PodInfo("d", "h")], now=11)
    assert not d.terminating and exp.created == {}
