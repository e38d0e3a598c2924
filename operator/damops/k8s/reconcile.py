"""Reconcile decisions as pure functions: desired vs actual pods + worker states → actions.

Rules (issue 3):

* Pods are created up to ``spec.replicas`` before any operation needs them (pre-heating).
* Scale down removes pending workers first, then free ones, and never kills a
  worker with an active operation: it is *drained* (no new work) and its pod is
  deleted once the scheduler has let it go (operation ended) – or it expires.
* A change of the pod template replaces free workers in rolling fashion: up to
  ``max_surge`` new pods are started, and an outdated free worker is deleted only
  once enough ready workers remain (``ready - 1 >= replicas``), ready both to the
  scheduler and to the kubelet.
* Failed/succeeded pods are deleted (the next round replaces them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from damops.dispatch import WorkerState


class ActionKind(str, enum.Enum):
    CREATE = "create"
    DELETE = "delete"
    DRAIN = "drain"


class Reason(str, enum.Enum):
    """Why an action is taken; the value is what Events and logs show."""

    SCALE_UP = "scale up"
    TEMPLATE_CHANGED = "template changed"
    SCALE_DOWN_PENDING = "scale down (pending)"
    SCALE_DOWN_FREE = "scale down (free)"
    SCALE_DOWN_ACTIVE = "scale down (active)"
    DRAINED = "drained"
    POD_SUCCEEDED = "pod succeeded"
    POD_FAILED = "pod failed"

    @property
    def scale_down(self) -> bool:
        return self in (Reason.SCALE_DOWN_PENDING, Reason.SCALE_DOWN_FREE, Reason.SCALE_DOWN_ACTIVE)

    @property
    def pod_finished(self) -> bool:
        """The pod's containers ended on their own: the worker is restarted, not scaled."""
        return self in (Reason.POD_SUCCEEDED, Reason.POD_FAILED)


@dataclass(frozen=True)
class PodInfo:
    """What the operator knows of one worker pod."""

    name: str
    template_hash: str
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    ip: str | None = None
    terminating: bool = False  # metadata.deletionTimestamp is set
    draining: bool = False  # annotated damops.dev/draining
    created: str = ""  # creationTimestamp (RFC 3339 sorts as text)
    worker_state: WorkerState | None = None  # from the scheduler; None = not known to it
    # The kubelet's Ready condition. The scheduler may see a worker free a probe period
    # before the kubelet does; capacity kept during a rolling replacement needs both.
    pod_ready: bool = True
    deletion_cost: str | None = None  # annotation controller.kubernetes.io/pod-deletion-cost


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    name: str = ""
    reason: Reason = Reason.SCALE_UP


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    # figures for status.* (from the same snapshot the decisions used)
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    pending: int = 0
    free: int = 0
    active: int = 0
    draining: int = 0

    @property
    def creates(self) -> int:
        return sum(1 for a in self.actions if a.kind is ActionKind.CREATE)

    @property
    def scaling_down(self) -> bool:
        return any(a.reason.scale_down for a in self.actions)

    def names(self, kind: str) -> list[str]:
        return [a.name for a in self.actions if a.kind == kind]


def _state(p: PodInfo) -> WorkerState:
    return WorkerState(p.worker_state) if p.worker_state else WorkerState.PENDING


_SERVING = (WorkerState.FREE, WorkerState.ACTIVE)


def plan(desired: int, template_hash: str, pods: list[PodInfo], max_surge: int = 1) -> Plan:
    """Decide what to do now. Called again after every change (level-triggered)."""
    result = Plan()
    live: list[PodInfo] = []
    for p in pods:
        if p.terminating:
            continue
        if p.phase in ("Succeeded", "Failed"):
            finished = Reason.POD_SUCCEEDED if p.phase == "Succeeded" else Reason.POD_FAILED
            result.actions.append(Action(ActionKind.DELETE, p.name, finished))
            continue
        live.append(p)

    # Drained workers: once the scheduler no longer holds an operation for them, they go.
    serving: list[PodInfo] = []
    for p in live:
        if p.draining:
            if _state(p) is WorkerState.ACTIVE:
                result.draining += 1
                result.active += 1
                continue
            result.actions.append(Action(ActionKind.DELETE, p.name, Reason.DRAINED))
            continue
        serving.append(p)

    states = [_state(p) for p in serving]
    result.pending = states.count(WorkerState.PENDING)
    result.free = states.count(WorkerState.FREE)
    result.active += states.count(WorkerState.ACTIVE)
    result.replicas = len(serving) + result.draining
    result.ready = result.free + result.active
    result.updated = sum(1 for p in serving if p.template_hash == template_hash)

    outdated = [p for p in serving if p.template_hash != template_hash]
    current_pending = [p for p in serving if p.template_hash == template_hash and _state(p) is WorkerState.PENDING]
    # Workers that count as capacity kept while an outdated or surplus one is deleted.
    ready = sum(1 for p, state in zip(serving, states) if state in _SERVING and p.pod_ready)
    excess = len(serving) - desired

    if excess < 0:
        result.actions.extend(Action(ActionKind.CREATE, reason=Reason.SCALE_UP) for _ in range(-excess))
        return result

    if excess == 0:
        # rolling replacement: surge new pods while outdated non-active workers exist
        replaceable = [p for p in outdated if _state(p) is not WorkerState.ACTIVE]
        if replaceable and len(current_pending) < max_surge:
            room = min(max_surge - len(current_pending), len(replaceable))
            result.actions.extend(Action(ActionKind.CREATE, reason=Reason.TEMPLATE_CHANGED) for _ in range(room))
        return result

    # excess > 0: choose victims. Order: outdated pending, outdated free, current pending,
    # current free, then active (drained, never killed): outdated first, newest first.
    def newest_first(items: list[PodInfo]) -> list[PodInfo]:
        return sorted(items, key=lambda p: (p.created, p.name), reverse=True)

    rolling = bool(outdated)

    def by(current: bool, state: WorkerState) -> list[PodInfo]:
        return newest_first(
            [p for p in serving if (p.template_hash == template_hash) == current and _state(p) is state]
        )

    pending, free, active = WorkerState.PENDING, WorkerState.FREE, WorkerState.ACTIVE
    candidates = by(False, pending) + by(False, free) + by(True, pending) + by(True, free)
    candidates += by(False, active) + by(True, active)
    for p in candidates:
        if excess <= 0:
            break
        state = _state(p)
        current = p.template_hash == template_hash
        if state is WorkerState.PENDING:
            if current and rolling:
                continue  # a surge pod coming up to replace an outdated worker
            result.actions.append(Action(ActionKind.DELETE, p.name, Reason.SCALE_DOWN_PENDING))
            excess -= 1
        elif state is WorkerState.FREE:
            if ready - 1 < desired:
                continue  # keep capacity until the replacements are ready
            ready -= 1
            why = Reason.SCALE_DOWN_FREE if current else Reason.TEMPLATE_CHANGED
            result.actions.append(Action(ActionKind.DELETE, p.name, why))
            excess -= 1
        else:  # active: drain, never kill – but not merely to make room for surge pods
            if rolling and excess <= len(current_pending):
                continue
            why = Reason.SCALE_DOWN_ACTIVE if current else Reason.TEMPLATE_CHANGED
            result.actions.append(Action(ActionKind.DRAIN, p.name, why))
            excess -= 1
    return result


@dataclass(frozen=True)
class SchedulerSync:
    add: list[tuple[str, str]]  # (name, ip)
    remove: list[str]
    drain: list[str]


def sync_scheduler(pods: list[PodInfo], known: dict[str, str | None]) -> SchedulerSync:
    """Which workers the scheduler must open a channel to, forget, or drain.

    ``known`` maps the scheduler's worker names to their host (None if unknown).
    A pod joins once it has an IP and is not terminating; it leaves when it is
    gone, finished, or its IP changed. A terminating pod (deleted by hand, a node
    drain) is drained, not removed: its sidecar finishes the running operation
    and hands the result over within the grace period; removing it would
    recover the operation and count a failed attempt.
    """
    want: dict[str, PodInfo] = {}
    for p in pods:
        if p.phase in ("Succeeded", "Failed") or not p.ip:
            continue
        want[p.name] = p
    # a drained worker the scheduler has let go must not come back
    add = [
        (n, p.ip)
        for n, p in sorted(want.items())
        if not p.terminating and ((n not in known and not p.draining) or (n in known and known[n] and known[n] != p.ip))
    ]
    remove = sorted(n for n in known if n not in want)
    drain = sorted(n for n, p in want.items() if (p.draining or p.terminating) and n in known)
    return SchedulerSync(add=[(n, ip) for n, ip in add if ip], remove=remove, drain=drain)
