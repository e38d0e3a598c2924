"""Reconcile decisions: desired vs actual pods + worker states → actions (pure, no cluster)."""

from __future__ import annotations

from damops.dispatch import WorkerState
from damops.k8s.reconcile import ActionKind, PodInfo, Reason, plan, sync_scheduler

H = "new"
OLD = "old"


def pod(name, state=None, h=H, phase="Running", ip="198.18.0.9", created="2026-01-01T00:00:00Z", **kw):
    return PodInfo(name=name, template_hash=h, phase=phase, ip=ip, created=created, worker_state=state, **kw)


def kinds(p):
    return sorted((a.kind, a.name) for a in p.actions)


def test_scale_up_from_nothing_creates_all_pods_before_any_operation() -> None:
    p = plan(3, H, [])
    assert [a.kind for a in p.actions] == ["create"] * 3


def test_scale_up_counts_pending_pods() -> None:
    p = plan(3, H, [pod("a", "free"), pod("b", None, phase="Pending", ip=None)])
    assert p.creates == 1


def test_steady_state_does_nothing() -> None:
    p = plan(2, H, [pod("a", "free"), pod("b", "active")])
    assert p.actions == [] and p.ready == 2 and p.active == 1 and p.free == 1


def test_scale_down_removes_pending_then_free_and_drains_active_last() -> None:
    pods = [pod("act1", "active"), pod("act2", "active"), pod("free1", "free"), pod("pend1", "pending")]
    p = plan(1, H, pods)
    # 3 to go: the pending one, the free one, then one active is drained (never deleted)
    assert sorted(p.names("delete")) == ["free1", "pend1"]
    assert len(p.names("drain")) == 1 and p.names("drain")[0].startswith("act")
    assert not set(p.names("delete")) & {"act1", "act2"}


def test_active_workers_are_never_deleted_even_to_zero() -> None:
    p = plan(0, H, [pod("a", "active"), pod("b", "active")])
    assert p.names("delete") == [] and sorted(p.names("drain")) == ["a", "b"]


def test_drained_pod_is_deleted_once_its_operation_ended() -> None:
    still = plan(1, H, [pod("a", "free"), pod("d", "active", draining=True)])
    assert still.actions == [] and still.draining == 1
    done = plan(1, H, [pod("a", "free"), pod("d", None, draining=True)])
    assert done.names("delete") == ["d"]


def test_terminating_pods_are_ignored_and_replaced() -> None:
    p = plan(2, H, [pod("a", "free"), pod("gone", "free", terminating=True)])
    assert p.creates == 1 and p.names("delete") == []


def test_failed_pod_is_deleted_and_replaced() -> None:
    p = plan(2, H, [pod("a", "free"), pod("dead", None, phase="Failed")])
    assert p.names("delete") == ["dead"] and p.creates == 1


def test_rolling_update_surges_then_replaces_free_workers_one_by_one() -> None:
    pods = [pod("o1", "free", h=OLD), pod("o2", "free", h=OLD), pod("o3", "active", h=OLD)]
    p1 = plan(3, H, pods)
    assert p1.creates == 1 and p1.names("delete") == []  # surge first, nothing deleted
    # the surge pod is still pending: keep capacity, wait
    pods2 = pods + [pod("n1", "pending", created="2026-01-01T00:01:00Z")]
    assert plan(3, H, pods2).actions == []
    # surge pod ready: one outdated free worker goes
    pods3 = pods + [pod("n1", "free", created="2026-01-01T00:01:00Z")]
    p3 = plan(3, H, pods3)
    assert len(p3.names("delete")) == 1 and p3.names("delete")[0] in ("o1", "o2")
    assert p3.names("drain") == []


def test_rolling_update_waits_for_the_kubelet_to_see_the_surge_pod_ready() -> None:
    """Free to the scheduler but not yet Ready to the kubelet: the outdated one stays."""
    pods = [pod("o1", "free", h=OLD), pod("o2", "free", h=OLD)]
    surge = pod("n1", "free", created="2026-01-01T00:01:00Z", pod_ready=False)
    assert plan(2, H, [*pods, surge]).names("delete") == []
    ready = pod("n1", "free", created="2026-01-01T00:01:00Z")
    assert len(plan(2, H, [*pods, ready]).names("delete")) == 1


def test_rolling_update_never_touches_active_outdated_workers_while_free_ones_remain() -> None:
    pods = [pod("o1", "active", h=OLD), pod("n1", "free"), pod("n2", "free")]
    assert plan(3, H, pods).actions == []  # nothing replaceable: o1 is replaced when it is free


def test_rolling_update_respects_max_surge() -> None:
    pods = [pod(f"o{i}", "free", h=OLD) for i in range(5)]
    assert plan(5, H, pods, max_surge=2).creates == 2


def test_status_figures() -> None:
    p = plan(3, H, [pod("a", "free"), pod("b", "active", h=OLD), pod("c", None, phase="Pending", ip=None)])
    assert (p.replicas, p.ready, p.updated, p.pending, p.free, p.active) == (3, 2, 2, 1, 1, 1)


def test_sync_scheduler_adds_running_pods_and_removes_gone_ones() -> None:
    pods = [pod("a", ip="198.18.0.2"), pod("b", ip=None, phase="Pending"), pod("t", ip="198.18.0.4", terminating=True)]
    s = sync_scheduler(pods, {"gone": "198.18.0.7", "t": "198.18.0.4"})
    assert s.add == [("a", "198.18.0.2")]
    assert s.remove == ["gone"]


def test_sync_scheduler_drains_a_terminating_pod_until_it_is_gone() -> None:
    # deleted by hand while busy: it finishes its operation in its grace period; nothing is recovered
    terminating = [pod("t", ip="198.18.0.4", terminating=True)]
    s = sync_scheduler(terminating, {"t": "198.18.0.4"})
    assert (s.add, s.remove, s.drain) == ([], [], ["t"])
    assert sync_scheduler(terminating, {}).add == []  # never (re)joins
    assert sync_scheduler([], {"t": "198.18.0.4"}).remove == ["t"]  # gone: recovered if it still held one


def test_sync_scheduler_readds_on_ip_change_and_never_readds_drained() -> None:
    pods = [pod("a", ip="198.18.0.3"), pod("d", ip="198.18.0.5", draining=True)]
    s = sync_scheduler(pods, {"a": "198.18.0.2"})
    assert s.add == [("a", "198.18.0.3")] and s.drain == []
    s2 = sync_scheduler(pods, {"a": "198.18.0.3", "d": "198.18.0.5"})
    assert s2.add == [] and s2.drain == ["d"]


def test_actions_carry_their_reason() -> None:
    p = plan(1, H, [pod("x", "free"), pod("y", "pending"), pod("z", "active"), pod("dead", None, phase="Failed")])
    reasons = {a.name: a.reason for a in p.actions}
    assert reasons == {"dead": Reason.POD_FAILED, "y": Reason.SCALE_DOWN_PENDING, "x": Reason.SCALE_DOWN_FREE}
    assert p.scaling_down
    done = plan(1, H, [pod("z", "free"), pod("d", None, draining=True)])
    assert [(a.kind, a.reason) for a in done.actions] == [(ActionKind.DELETE, Reason.DRAINED)]
    assert not done.scaling_down
    rolled = plan(1, H, [pod("o", WorkerState.ACTIVE, h=OLD), pod("n", WorkerState.FREE), pod("m", "free")])
    # free current workers go before an outdated active one is even drained
    assert sorted((a.kind, a.name, a.reason) for a in rolled.actions) == [
        (ActionKind.DELETE, "m", Reason.SCALE_DOWN_FREE),
        (ActionKind.DELETE, "n", Reason.SCALE_DOWN_FREE),
    ]
