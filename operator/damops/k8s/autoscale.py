"""The autoscaler's decision as a pure function: load + history + spec → desired workers.

The operator already knows, every round, the queue depth of the pool (claimable
operations) and the state of every worker, so it scales on the queue itself:

* recommendation: ``active + ceil(queued / targetQueuedPerWorker)`` (default target 1)
  and/or ``ceil((active + queued) * 100 / targetUtilization)``, the larger one,
  clamped to ``[minReplicas, maxReplicas]``;
* stabilisation, as the HorizontalPodAutoscaler's ``behavior``: scale up to the
  lowest recommendation of the scale-up window, down to the highest of the
  scale-down window (so a queue that empties for a moment between bursts does
  not shed workers);
* step limits: per policy, at most ``value`` pods (or percent) added or removed
  within ``periodSeconds``, counted from the changes made in that period.

Only the desired *count* is decided here; which pods go is ``reconcile.plan``'s
business, and it removes pending and free workers first and drains active ones
(never deletes them). The recommendation never drops below the active workers,
so a scale decision alone does not even need to drain.

Time is passed in (``now``, seconds on any monotonic clock); the history is
returned, not kept, so the whole decision is testable without a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from damops.k8s.models import Autoscaling, ScalingPolicy, ScalingRules

DEFAULT_UP_WINDOW = 0
DEFAULT_DOWN_WINDOW = 300
DEFAULT_UP_POLICIES = (
    ScalingPolicy(type="Pods", value=4, period_seconds=15),
    ScalingPolicy(type="Percent", value=100, period_seconds=15),
)
DEFAULT_DOWN_POLICIES = (ScalingPolicy(type="Percent", value=100, period_seconds=15),)

SCALE_UP = "ScaleUp"
SCALE_DOWN = "ScaleDown"


@dataclass(frozen=True)
class Load:
    """The pool as one round saw it (draining workers left out: they are on their way out)."""

    queued: int = 0  # claimable operations (NEW or WAIT) of the pool
    active: int = 0
    free: int = 0
    pending: int = 0


@dataclass(frozen=True)
class Change:
    at: float
    before: int
    after: int


@dataclass(frozen=True)
class History:
    """What the windows and step limits need: recent recommendations and changes."""

    recommendations: tuple[tuple[float, int], ...] = ()
    changes: tuple[Change, ...] = ()

    @staticmethod
    def fresh(current: int, now: float) -> History:
        """After an operator (re)start: as if ``current`` had just been recommended, so a
        restart never causes a scale-down before one whole window has been observed."""
        return History(recommendations=((now, current),))


@dataclass(frozen=True)
class Decision:
    current: int
    desired: int
    recommended: int  # for the load, within bounds, before windows and step limits
    message: str
    history: History = field(default_factory=History)

    @property
    def changed(self) -> bool:
        return self.desired != self.current

    @property
    def reason(self) -> str | None:
        if self.desired > self.current:
            return SCALE_UP
        if self.desired < self.current:
            return SCALE_DOWN
        return None


def window(rules: ScalingRules, default: int) -> int:
    w = rules.stabilization_window_seconds
    return default if w is None else w


def _policies(rules: ScalingRules, default: tuple[ScalingPolicy, ...]) -> tuple[ScalingPolicy, ...]:
    return default if rules.policies is None else tuple(rules.policies)


def recommend(load: Load, spec: Autoscaling) -> tuple[int, str]:
    """Workers wanted for the load (unbounded) and what it was derived from."""
    demand = load.active + load.queued
    parts: list[tuple[int, str]] = []
    if spec.target_queued_per_worker is not None or spec.target_utilization is None:
        per = spec.target_queued_per_worker or 1
        parts.append((load.active + math.ceil(load.queued / per), f"target {per} queued per worker"))
    if spec.target_utilization is not None:
        parts.append((math.ceil(demand * 100 / spec.target_utilization), f"target {spec.target_utilization}% busy"))
    wanted, why = max(parts, key=lambda p: p[0])
    return wanted, f"{load.queued} queued, {load.active} active: {wanted} wanted ({why})"


def _period_changes(changes: tuple[Change, ...], now: float, period: int) -> tuple[int, int]:
    """Pods added and removed by the changes of the last ``period`` seconds."""
    added = removed = 0
    for c in changes:
        if now - c.at < period:
            added += max(c.after - c.before, 0)
            removed += max(c.before - c.after, 0)
    return added, removed


def up_limit(current: int, rules: ScalingRules, changes: tuple[Change, ...], now: float) -> int:
    """The most replicas the scale-up policies allow now."""
    if rules.select_policy == "Disabled":
        return current
    proposals = []
    for p in _policies(rules, DEFAULT_UP_POLICIES):
        added, removed = _period_changes(changes, now, p.period_seconds)
        start = current - added + removed
        if p.type == "Pods":
            proposals.append(start + p.value)
        else:  # a percentage of nothing is nothing: allow one pod, so a pool at zero can wake
            proposals.append(max(math.ceil(start * (100 + p.value) / 100), start + 1))
    if not proposals:
        return current
    return max(proposals) if rules.select_policy == "Max" else min(proposals)


def down_limit(current: int, rules: ScalingRules, changes: tuple[Change, ...], now: float) -> int:
    """The fewest replicas the scale-down policies allow now."""
    if rules.select_policy == "Disabled":
        return current
    proposals = []
    for p in _policies(rules, DEFAULT_DOWN_POLICIES):
        added, removed = _period_changes(changes, now, p.period_seconds)
        start = current + removed - added
        if p.type == "Pods":
            proposals.append(start - p.value)
        else:
            proposals.append(math.floor(start * (100 - p.value) / 100))
    if not proposals:
        return current
    return min(proposals) if rules.select_policy == "Max" else max(proposals)


def decide(load: Load, current: int, spec: Autoscaling, history: History, now: float) -> Decision:
    """The desired number of workers now. ``current``: the desired number so far."""
    up, down = spec.behavior.scale_up, spec.behavior.scale_down
    up_window, down_window = window(up, DEFAULT_UP_WINDOW), window(down, DEFAULT_DOWN_WINDOW)
    wanted, why = recommend(load, spec)
    recommended = min(max(wanted, spec.min_replicas), spec.max_replicas)
    bound = ""
    if wanted > spec.max_replicas:
        bound = f", capped at maxReplicas {spec.max_replicas}"
    elif wanted < spec.min_replicas:
        bound = f", raised to minReplicas {spec.min_replicas}"

    keep = max(up_window, down_window)
    recs = tuple((t, r) for t, r in history.recommendations if now - t <= keep) + ((now, recommended),)
    up_rec = min(r for t, r in recs if now - t <= up_window)
    down_rec = max(r for t, r in recs if now - t <= down_window)

    desired, held = current, ""
    if up_rec > current:
        desired = up_rec
    elif down_rec < current:
        desired = down_rec
    if recommended > desired and desired == current:
        held = f"; held by the {up_window}s scale-up window"
    elif recommended < desired:
        held = f"; held at {desired} by the {down_window}s scale-down window"

    if desired > current:
        limit = up_limit(current, up, history.changes, now)
        if limit < desired:
            desired, held = max(limit, current), f"; held at {max(limit, current)} by the scale-up policies"
    elif desired < current:
        limit = down_limit(current, down, history.changes, now)
        if limit > desired:
            desired, held = min(limit, current), f"; held at {min(limit, current)} by the scale-down policies"
    # the bounds win over windows and limits (a spec that changed its bounds applies them at once)
    desired = min(max(desired, spec.min_replicas), spec.max_replicas)

    periods = [p.period_seconds for p in _policies(up, DEFAULT_UP_POLICIES) + _policies(down, DEFAULT_DOWN_POLICIES)]
    horizon = max(periods, default=0)
    changes = tuple(c for c in history.changes if now - c.at < horizon)
    if desired != current:
        changes += (Change(now, current, desired),)
    message = f"{why}{bound}{held}"
    if desired != current:
        message = f"{current} → {desired}: {message}"
    return Decision(current, desired, recommended, message, History(recs, changes))
