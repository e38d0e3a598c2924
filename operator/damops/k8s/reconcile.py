"""Reconcile decisions as pure functions: desired vs actual pods + worker states → actions.

Rules (issue 3):

* Pods are created up to ``spec.replicas`` before any operation needs them (pre-heating).
* Scale down removes pending workers first, then free ones, and never kills a
  worker with an active operation: it is *drained* (no new work) and its pod is
  deleted once the scheduler has let it go (operation ended) – or it expires.
* A change of the pod template replaces free workers in rolling fashion: up to
  ``max_surge`` new pods are started, and an outdated free worker is deleted only
  once enough ready workers remain (``ready - 1 >= replicas``).
* Failed/succeeded pods are deleted (the next round replaces them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

WorkerStateName = Literal["pending", "free", "active"]


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
    worker_state: WorkerStateName | None = None  # from the scheduler; None = not known to it
    uid: str = ""


@dataclass(frozen=True)
class Action:
    kind: Literal["create", "delete", "drain"]
    name: str = ""
    reason: str = ""


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
        return sum(1 for a in self.actions if a.kind == "create")

    def names(self, kind: str) -> list[str]:
        return [a.name for a in self.actions if a.kind == kind]


def _state(p: PodInfo) -> WorkerStateName:
    return p.worker_state or "pending"


def plan(desired: int, template_hash: str, pods: list[PodInfo], max_surge: int = 1) -> Plan:
    """Decide what to do now. Called again after every change (level-triggered)."""
    result = Plan()
    live: list[PodInfo] = []
    for p in pods:
        if p.terminating:
            continue
        if p.phase in ("Succeeded", "Failed"):
            result.actions.append(Action("delete", p.name, f"pod {p.phase.lower()}"))
            continue
        live.append(p)

    # Drained workers: once the scheduler no longer holds an operation for them, they go.
    serving: list[PodInfo] = []
    for p in live:
        if p.draining:
            if p.worker_state == "active":
                result.draining += 1
                result.active += 1
                continue
            result.actions.append(Action("delete", p.name, "drained"))
            continue
        serving.append(p)

    for p in serving:
        s = _state(p)
        setattr(result, s, getattr(result, s) + 1)
    result.replicas = len(serving) + result.draining
    result.ready = sum(1 for p in serving if _state(p) in ("free", "active")) + result.draining
    result.updated = sum(1 for p in serving if p.template_hash == template_hash)

    outdated = [p for p in serving if p.template_hash != template_hash]
    current_pending = [p for p in serving if p.template_hash == template_hash and _state(p) == "pending"]
    ready = sum(1 for p in serving if _state(p) in ("free", "active"))
    excess = len(serving) - desired

    if excess < 0:
        result.actions.extend(Action("create", reason="scale up") for _ in range(-excess))
        return result

    if excess == 0:
        # rolling replacement: surge new pods while outdated non-active workers exist
        replaceable = [p for p in outdated if _state(p) != "active"]
        if replaceable and len(current_pending) < max_surge:
            room = min(max_surge - len(current_pending), len(replaceable))
            result.actions.extend(Action("create", reason="template changed") for _ in range(room))
        return result

    # excess > 0: choose victims. Order: outdated pending, outdated free, current pending,
    # current free, then active (drained, never killed): outdated first, newest first.
    def newest_first(items: list[PodInfo]) -> list[PodInfo]:
        return sorted(items, key=lambda p: (p.created, p.name), reverse=True)

    rolling = bool(outdated)
    by = lambda cur, st: newest_first(  # noqa: E731
        [p for p in serving if (p.template_hash == template_hash) == cur and _state(p) == st]
    )
    candidates = by(False, "pending") + by(False, "free") + by(True, "pending") + by(True, "free")
    candidates += by(False, "active") + by(True, "active")
    for p in candidates:
        if excess <= 0:
            break
        state = _state(p)
        current = p.template_hash == template_hash
        if state == "pending":
            if current and rolling:
                continue  # a surge pod coming up to replace an outdated worker
            result.actions.append(Action("delete", p.name, "scale down (pending)"))
            excess -= 1
        elif state == "free":
            if ready - 1 < desired:
                continue  # keep capacity until the replacements are ready
            ready -= 1
            result.actions.append(Action("delete", p.name, "template changed" if not current else "scale down (free)"))
            excess -= 1
        else:  # active: drain, never kill – but not merely to make room for surge pods
            if rolling and excess <= len(current_pending):
                continue
            result.actions.append(Action("drain", p.name, "scale down (active)" if current else "template changed"))
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
    gone, terminating, finished, or its IP changed.
    """
    want: dict[str, PodInfo] = {}
    for p in pods:
        if p.terminating or p.phase in ("Succeeded", "Failed") or not p.ip:
            continue
        want[p.name] = p
    # a drained worker the scheduler has let go must not come back
    add = [
        (n, p.ip)
        for n, p in sorted(want.items())
        if (n not in known and not p.draining) or (n in known and known[n] and known[n] != p.ip)
    ]
    remove = sorted(n for n in known if n not in want)
    drain = sorted(n for n, p in want.items() if p.draining and n in known)
    return SchedulerSync(add=[(n, ip) for n, ip in add if ip], remove=remove, drain=drain)
