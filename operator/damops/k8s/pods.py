"""What the operator knows of its worker pods, without asking the API server.

Pods are observed through kopf's watch (an index, :func:`observe_pod` per event).
A watch lags behind the operator's own writes, so :class:`Expectations` remembers
what the operator has just created, deleted or drained until the watch shows it
(the ReplicaSet controller's "expectations"): without it, a round right after a
create would see one pod too few and create it again. Pure: time is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from damops.dispatch import WorkerState
from damops.k8s.reconcile import PodInfo
from damops.k8s.specs import (
    ANNOTATION_DELETION_COST,
    ANNOTATION_DRAINING,
    COST_BUSY,
    COST_IDLE,
    COST_PENDING,
    LABEL_HASH,
)

if TYPE_CHECKING:
    from damops.dispatch import WorkerView

#: container waiting reasons that will not go away by themselves
BROKEN = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "InvalidImageName",
        "CreateContainerError",
    }
)


@dataclass(frozen=True)
class ObservedPod:
    info: PodInfo
    problems: tuple[str, ...] = ()  # "pod/container: reason" of broken containers


def pod_info(pod: dict[str, Any]) -> PodInfo:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return PodInfo(
        name=meta.get("name", ""),
        template_hash=(meta.get("labels") or {}).get(LABEL_HASH, ""),
        phase=status.get("phase", "Pending"),
        ip=status.get("podIP"),
        terminating=bool(meta.get("deletionTimestamp")),
        draining=(meta.get("annotations") or {}).get(ANNOTATION_DRAINING) == "true",
        created=meta.get("creationTimestamp", ""),
        deletion_cost=(meta.get("annotations") or {}).get(ANNOTATION_DELETION_COST),
        pod_ready=any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []),
    )


def waiting_problems(pod: dict[str, Any]) -> tuple[str, ...]:
    name = (pod.get("metadata") or {}).get("name", "")
    found = []
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        reason = ((c.get("state") or {}).get("waiting") or {}).get("reason")
        if reason in BROKEN:
            found.append(f"{name}/{c.get('name')}: {reason}")
    return tuple(found)


def observe_pod(pod: dict[str, Any]) -> ObservedPod:
    return ObservedPod(pod_info(pod), waiting_problems(pod))


def with_worker_states(pods: list[PodInfo], states: dict[str, WorkerState]) -> list[PodInfo]:
    """Join the scheduler's view (by pod name) onto the pods."""
    return [replace(p, worker_state=states.get(p.name)) for p in pods]


@dataclass
class Expectations:
    """The operator's own writes the watch has not shown yet; each forgotten after ``ttl`` seconds."""

    ttl: float = 60.0
    created: dict[str, tuple[PodInfo, float]] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)
    drained: dict[str, float] = field(default_factory=dict)

    def expect_created(self, pod: PodInfo, now: float) -> None:
        self.created[pod.name] = (pod, now + self.ttl)

    def expect_deleted(self, name: str, now: float) -> None:
        self.deleted[name] = now + self.ttl
        self.created.pop(name, None)

    def expect_drained(self, name: str, now: float) -> None:
        self.drained[name] = now + self.ttl

    def apply(self, observed: list[PodInfo], now: float) -> list[PodInfo]:
        """The pods as they will be once the watch has caught up with our writes."""
        seen = {p.name: p for p in observed}
        self.created = {n: (p, t) for n, (p, t) in self.created.items() if n not in seen and t > now}
        self.deleted = {n: t for n, t in self.deleted.items() if n in seen and not seen[n].terminating and t > now}
        self.drained = {n: t for n, t in self.drained.items() if n in seen and not seen[n].draining and t > now}
        out = []
        for p in observed:
            if p.name in self.deleted:
                p = replace(p, terminating=True)
            elif p.name in self.drained:
                p = replace(p, draining=True)
            out.append(p)
        return out + [p for p, _ in self.created.values()]


def scheduler_states(workers: Iterable[WorkerView]) -> dict[str, WorkerState]:
    """Worker states by pod name, from the scheduler's snapshot. A drained worker that is no
    longer active counts as unknown: its pod is due for deletion, not for new work."""
    return {w.name: WorkerState(w.state) for w in workers if not w.draining or w.state == WorkerState.ACTIVE}


#: a free worker counts as idle (cheap to delete) only after this long without work, so that
#: workers of a busy pool, free for a moment between operations, are not re-annotated every round
IDLE_AFTER = 10.0


def deletion_cost(state: WorkerState | None, idle_seconds: float | None, now: str | None) -> str:
    """``now``: the pod's cost as last patched or seen. A worker that just finished an operation
    stays busy until IDLE_AFTER (hysteresis); one that just became ready is idle at once."""
    if state is WorkerState.ACTIVE:
        return COST_BUSY
    if state is WorkerState.FREE:
        if now == COST_BUSY and (idle_seconds is None or idle_seconds < IDLE_AFTER):
            return COST_BUSY
        return COST_IDLE
    return COST_PENDING


def cost_patches(pods: list[PodInfo], idle: dict[str, float], sent: dict[str, str]) -> list[tuple[str, str]]:
    """(pod, cost) for the pods whose pod-deletion-cost must change: only when a worker moves
    between pending, idle and busy, and not again while the watch has not shown our last patch
    (``sent``: the cost last patched per pod)."""
    out = []
    for p in pods:
        if p.terminating or p.draining or p.phase in ("Succeeded", "Failed"):
            continue  # on its way out
        cost = deletion_cost(p.worker_state, idle.get(p.name), sent.get(p.name, p.deletion_cost))
        if cost != p.deletion_cost and sent.get(p.name) != cost:
            out.append((p.name, cost))
    return out
