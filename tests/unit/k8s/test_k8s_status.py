"""Status, conditions and the progressing reason from a plan and an observation (pure, no cluster)."""

from __future__ import annotations

from damops.k8s.reconcile import PodInfo, plan
from damops.k8s.status import Observation, Progressing, comparable, pool_status, progressing_reason

H = "new"
NOW = "2026-01-01T00:10:00Z"


def pod(name: str, state: str | None = None, h: str = H, **kw) -> PodInfo:
    return PodInfo(name=name, template_hash=h, phase="Running", ip="198.18.0.9", worker_state=state, **kw)


def obs(desired: int, **kw) -> Observation:
    return Observation(desired=desired, pool="p", selector="s", template_hash=H, **kw)


def conds(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_stable_pool_is_ready_not_progressing_not_degraded() -> None:
    p = plan(2, H, [pod("a", "free"), pod("b", "active")])
    status = pool_status(p, obs(2, generation=3, queued=7), [], NOW)
    c = conds(status)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", "AllWorkersReady")
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("False", "Stable")
    assert (c["Degraded"]["status"], c["Degraded"]["reason"], c["Degraded"]["message"]) == ("False", "AsExpected", "")
    assert {cond["observedGeneration"] for cond in status["conditions"]} == {3}
    assert status["queuedOperations"] == 7 and status["freeWorkers"] == 1 and status["activeWorkers"] == 1
    assert status["observedGeneration"] == 3 and status["templateHash"] == H and status["selector"] == "s"


def test_progressing_reasons() -> None:
    assert progressing_reason(plan(3, H, [pod("a", "free")]), 3) is Progressing.SCALING_UP
    down = plan(1, H, [pod("a", "free"), pod("b", "free")])
    assert down.scaling_down and progressing_reason(down, 1) is Progressing.SCALING_DOWN
    draining = plan(1, H, [pod("a", "free"), pod("d", "active", draining=True)])
    assert draining.actions == [] and progressing_reason(draining, 1) is Progressing.SCALING_DOWN
    # a surge pod still coming up: the rollout, not a scale up, is what is going on
    rolling = plan(2, H, [pod("o1", "free", h="old"), pod("o2", "free", h="old"), pod("n", "pending")])
    assert progressing_reason(rolling, 2) is Progressing.ROLLING_UPDATE
    starting = plan(2, H, [pod("a", "free"), pod("b", None)])
    assert progressing_reason(starting, 2) is Progressing.WORKERS_STARTING
    assert progressing_reason(plan(1, H, [pod("a", "active")]), 1) is Progressing.STABLE


def test_draining_active_workers_is_scaling_down() -> None:
    p = plan(1, H, [pod("a", "free"), pod("b", "active"), pod("c", "active")])
    assert p.names("drain")
    c = conds(pool_status(p, obs(1), [], NOW))
    assert c["Progressing"]["reason"] == "ScalingDown" and c["Progressing"]["status"] == "True"


def test_not_ready_while_workers_start() -> None:
    c = conds(pool_status(plan(2, H, [pod("a", "free"), pod("b", None)]), obs(2), [], NOW))
    assert (c["Ready"]["status"], c["Ready"]["message"]) == ("False", "1/2 workers ready")
    assert c["Progressing"]["message"] == "2 pods, 2 of the current template, 1 pending, 0 draining"


def test_problems_make_the_pool_degraded_with_every_message() -> None:
    problems = ("p/worker: ErrImageNeverPull", "database: connection refused")
    c = conds(pool_status(plan(1, H, [pod("a", "free")]), obs(1, problems=problems), [], NOW))
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "Problems")
    assert c["Degraded"]["message"] == "p/worker: ErrImageNeverPull; database: connection refused"


def test_transition_time_kept_while_the_status_holds() -> None:
    p = plan(1, H, [pod("a", "free")])
    first = pool_status(p, obs(1), [], "2026-01-01T00:00:00Z")
    again = pool_status(p, obs(1), first["conditions"], NOW)
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {"2026-01-01T00:00:00Z"}
    assert comparable(first) == comparable(again)
    broken = pool_status(p, obs(1, problems=("x",)), again["conditions"], NOW)
    times = {c["type"]: c["lastTransitionTime"] for c in broken["conditions"]}
    assert times == {"Ready": "2026-01-01T00:00:00Z", "Progressing": "2026-01-01T00:00:00Z", "Degraded": NOW}
    assert comparable(broken) != comparable(again)
