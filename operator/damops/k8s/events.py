"""Which Kubernetes Events a reconcile round posts about the actions it carried out (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from damops.k8s.reconcile import Action, ActionKind


@dataclass(frozen=True)
class PoolEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


def restarted(action: Action) -> PoolEvent:
    return PoolEvent("Warning", "WorkerRestarted", f"worker pod {action.name}: {action.reason.value}")


def expired(worker: str) -> PoolEvent:
    return PoolEvent(
        "Warning",
        "WorkerExpired",
        f"worker {worker} was active longer than MAX_WORKER_ACTIVE_TIME: pod deleted and replaced, "
        "its operation recovered",
    )


def autoscaled(message: str) -> PoolEvent:
    """One per change of the desired replicas by the autoscaler."""
    return PoolEvent("Normal", "Autoscaled", message)


def summary(done: list[Action], desired: int) -> list[PoolEvent]:
    """One Event per kind of action carried out (``done``: the actions that succeeded)."""
    created = [a for a in done if a.kind is ActionKind.CREATE]
    deleted = [a for a in done if a.kind is ActionKind.DELETE]
    drained = [a for a in done if a.kind is ActionKind.DRAIN]
    out = [restarted(a) for a in deleted if a.reason.pod_finished]
    if created:
        out.append(PoolEvent("Normal", "ScalingUp", f"created {len(created)} worker pod(s) (desired {desired})"))
    if deleted:
        reasons = ", ".join(sorted({a.reason.value for a in deleted}))
        out.append(PoolEvent("Normal", "ScalingDown", f"deleted {len(deleted)} worker pod(s): {reasons}"))
    if drained:
        out.append(
            PoolEvent(
                "Normal",
                "Draining",
                f"draining {len(drained)} active worker(s): no new work, removed when their operation ends",
            )
        )
    return out
