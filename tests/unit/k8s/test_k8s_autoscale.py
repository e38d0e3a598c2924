"""The autoscaler's decision: load + history + spec → desired workers (pure, no cluster)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from damops.k8s.autoscale import SCALE_DOWN, SCALE_UP, Change, History, Load, decide, recommend
from damops.k8s.models import Autoscaling, WorkerPoolSpec
from damops.k8s.reconcile import PodInfo, plan


def spec(min_replicas: int = 1, max_replicas: int = 6, up: dict | None = None, down: dict | None = None, **kw):
    behavior = {"scaleUp": up or {}, "scaleDown": down or {}}
    return Autoscaling.model_validate(
        {"minReplicas": min_replicas, "maxReplicas": max_replicas, "behavior": behavior, **kw}
    )


QUICK = {"up": {"stabilizationWindowSeconds": 0}, "down": {"stabilizationWindowSeconds": 0}}


def run(loads: list[tuple[float, Load]], current: int, s: Autoscaling) -> list[int]:
    """Feed rounds through decide as the operator does; the desired count after each."""
    history, out = History(), []
    for now, load in loads:
        d = decide(load, current, s, history, now)
        current, history = d.desired, d.history
        out.append(current)
    return out


# --------------------------------------------------------------------------- recommendation


def test_one_worker_per_waiting_operation_on_top_of_the_busy_ones_by_default() -> None:
    assert recommend(Load(queued=3, active=2), spec())[0] == 5
    assert recommend(Load(queued=0, active=2, free=3), spec())[0] == 2


def test_target_queued_per_worker_rounds_up() -> None:
    assert recommend(Load(queued=7, active=1), spec(targetQueuedPerWorker=3))[0] == 1 + 3


def test_target_utilisation_counts_queued_as_demand() -> None:
    assert recommend(Load(queued=2, active=6), spec(targetUtilization=80))[0] == 10  # ceil(8 / 0.8)


def test_both_targets_take_the_larger() -> None:
    s = spec(targetQueuedPerWorker=10, targetUtilization=50)
    assert recommend(Load(queued=10, active=2), s)[0] == 24  # 50%: ceil(12 * 2) beats 2 + 1


# --------------------------------------------------------------------------- bounds


def test_bounds_clamp_the_recommendation() -> None:
    d = decide(Load(queued=100), 1, spec(max_replicas=4), History(), 0.0)
    assert d.desired == 4 and d.recommended == 4 and "maxReplicas 4" in d.message and d.reason == SCALE_UP
    d = decide(Load(), 3, spec(min_replicas=2, **QUICK), History(), 0.0)
    assert d.desired == 2 and d.reason == SCALE_DOWN


def test_min_above_max_is_rejected() -> None:
    with pytest.raises(ValidationError):
        spec(min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError):
        WorkerPoolSpec.model_validate({"autoscaling": {"minReplicas": 0}})  # maxReplicas is required


def test_bounds_changed_in_the_spec_apply_at_once_despite_windows() -> None:
    d = decide(Load(active=8), 8, spec(max_replicas=3), History.fresh(8, 0.0), 1.0)
    assert d.desired == 3


# --------------------------------------------------------------------------- scale to zero


def test_scale_to_zero_with_an_empty_queue_and_wake_on_the_first_operation() -> None:
    s = spec(min_replicas=0, max_replicas=4, **QUICK)
    assert decide(Load(free=1), 1, s, History(), 100.0).desired == 0
    woken = decide(Load(queued=1), 0, s, History(), 100.0)
    assert woken.desired == 1 and woken.reason == SCALE_UP


def test_a_percent_only_scale_up_policy_still_wakes_a_pool_at_zero() -> None:
    s = spec(min_replicas=0, up={"policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]})
    assert decide(Load(queued=5), 0, s, History(), 0.0).desired == 1


# --------------------------------------------------------------------------- stabilisation windows


def test_scale_down_waits_for_the_whole_window_of_lower_recommendations() -> None:
    s = spec(max_replicas=4, down={"stabilizationWindowSeconds": 5})
    burst = [(0.0, Load(queued=20))]
    idle = [(t, Load(free=4)) for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    assert run(burst + idle, 1, s) == [4, 4, 4, 4, 4, 4, 1]  # the burst's 4 leaves the window after 5 s


def test_a_queue_empty_for_a_moment_between_bursts_keeps_the_workers() -> None:
    s = spec(max_replicas=4, down={"stabilizationWindowSeconds": 5})
    loads = [(0.0, Load(queued=20)), (2.0, Load(free=4)), (4.0, Load(queued=10, active=4)), (8.0, Load(free=4))]
    assert run(loads, 1, s) == [4, 4, 4, 4]


def test_scale_down_goes_to_the_highest_recommendation_of_the_window() -> None:
    s = spec(max_replicas=6, down={"stabilizationWindowSeconds": 10})
    loads = [(0.0, Load(active=6)), (4.0, Load(active=3)), (8.0, Load(active=1)), (11.0, Load(active=1))]
    assert run(loads, 6, s) == [6, 6, 6, 3]  # at 11 s the 6 has left the window, the 3 has not


def test_scale_up_window_requires_the_load_to_hold() -> None:
    s = spec(max_replicas=6, up={"stabilizationWindowSeconds": 4})
    loads = [(0.0, Load(active=1)), (1.0, Load(queued=3, active=1)), (3.0, Load(queued=3, active=1))]
    loads += [(5.5, Load(queued=3, active=1))]
    assert run(loads, 1, s) == [1, 1, 1, 4]  # 4 s after the load arrived, not before


def test_a_restart_does_not_scale_down_before_one_window() -> None:
    s = spec(max_replicas=4, down={"stabilizationWindowSeconds": 30})
    h = History.fresh(4, 0.0)
    assert decide(Load(), 4, s, h, 10.0).desired == 4
    assert "scale-down window" in decide(Load(), 4, s, h, 10.0).message
    assert decide(Load(), 4, s, h, 31.0).desired == 1


# --------------------------------------------------------------------------- step limits


def test_default_scale_up_allows_four_pods_or_doubling_per_15_seconds() -> None:
    s = spec(max_replicas=100)
    first = decide(Load(queued=50, active=2), 2, s, History(), 0.0)
    assert first.desired == 6 and "scale-up policies" in first.message  # max(2 + 4, 2 * 2)
    second = decide(Load(queued=50, active=6), 6, s, first.history, 5.0)
    assert second.desired == 6  # the period's 4 pods are spent
    third = decide(Load(queued=50, active=6), 6, s, second.history, 15.0)
    assert third.desired == 12  # doubling beats +4 now


def test_pods_policy_limits_scale_down_per_period() -> None:
    s = spec(
        max_replicas=10,
        down={"stabilizationWindowSeconds": 0, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 10}]},
    )
    loads = [(0.0, Load(free=10)), (3.0, Load(free=8)), (10.0, Load(free=8)), (20.0, Load(free=6))]
    assert run(loads, 10, s) == [8, 8, 6, 4]


def test_select_policy_min_and_disabled() -> None:
    pol = [{"type": "Pods", "value": 1, "periodSeconds": 10}, {"type": "Pods", "value": 3, "periodSeconds": 10}]
    assert decide(Load(queued=10), 1, spec(up={"policies": pol, "selectPolicy": "Min"}), History(), 0.0).desired == 2
    assert decide(Load(queued=10), 1, spec(up={"policies": pol}), History(), 0.0).desired == 4
    assert decide(Load(queued=10), 1, spec(up={"selectPolicy": "Disabled"}), History(), 0.0).desired == 1
    off = spec(down={"selectPolicy": "Disabled", "stabilizationWindowSeconds": 0})
    assert decide(Load(), 3, off, History(), 0.0).desired == 3


def test_changes_outside_every_period_are_forgotten() -> None:
    s = spec(max_replicas=10)
    h = History(changes=(Change(0.0, 1, 5),))
    d = decide(Load(), 5, s, h, 100.0)
    assert d.history.changes == () or all(100.0 - c.at < 15 for c in d.history.changes)
    assert len(d.history.recommendations) <= 2


# --------------------------------------------------------------------------- with the plan


def _pod(name: str, state: str) -> PodInfo:
    return PodInfo(name=name, template_hash="h", phase="Running", ip="198.18.0.9", worker_state=state)  # type: ignore[arg-type]


def test_scale_down_never_targets_fewer_than_the_active_workers_so_the_plan_deletes_only_idle_ones() -> None:
    pods = [_pod("a1", "active"), _pod("a2", "active"), _pod("f1", "free"), _pod("f2", "free"), _pod("p1", "pending")]
    d = decide(Load(active=2, free=2, pending=1), 5, spec(max_replicas=5, **QUICK), History(), 0.0)
    assert d.desired == 2
    p = plan(d.desired, "h", pods)
    assert sorted(p.names("delete")) == ["f1", "f2", "p1"] and p.names("drain") == []


def test_burst_grows_to_max_then_shrinks_back_after_the_window() -> None:
    s = spec(
        min_replicas=1, max_replicas=4, up={"stabilizationWindowSeconds": 0}, down={"stabilizationWindowSeconds": 5}
    )
    loads = [(0.0, Load(free=1)), (2.0, Load(queued=40, active=1)), (4.0, Load(queued=30, active=4))]
    loads += [(6.0, Load(queued=0, active=2, free=2)), (8.0, Load(free=4)), (10.0, Load(free=4)), (12.0, Load(free=4))]
    # 10 s: the highest recommendation of the last 5 s is 2 (the two still active at 6 s)
    assert run(loads, 1, s) == [1, 4, 4, 4, 4, 2, 1]
