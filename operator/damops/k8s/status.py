"""A WorkerPool's status and conditions, computed from what the operator observed (pure).

Inputs: the plan (whose figures come from the observed pods joined with the
scheduler's snapshot), the problems found on the way (broken containers, API
errors, an unreachable database) and the previous conditions (to keep their
``lastTransitionTime`` while their status holds).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from damops.k8s.models import AutoscalingStatus, Condition, WorkerPoolStatus
from damops.k8s.reconcile import Plan


class Progressing(str, enum.Enum):
    SCALING_UP = "ScalingUp"
    SCALING_DOWN = "ScalingDown"
    ROLLING_UPDATE = "RollingUpdate"
    WORKERS_STARTING = "WorkersStarting"
    STABLE = "Stable"


@dataclass(frozen=True)
class Observation:
    """Everything about the pool that is not in the plan."""

    desired: int
    pool: str
    selector: str
    template_hash: str
    generation: int | None = None
    queued: int = 0
    problems: tuple[str, ...] = ()
    autoscaling: AutoscalingStatus | None = None  # None: spec.replicas rules


def progressing_reason(plan: Plan, desired: int) -> Progressing:
    serving = plan.replicas - plan.draining
    if plan.creates or serving < desired:
        return Progressing.SCALING_UP
    if plan.scaling_down or plan.draining:
        return Progressing.SCALING_DOWN
    if plan.updated < plan.replicas:
        return Progressing.ROLLING_UPDATE
    if plan.pending:
        return Progressing.WORKERS_STARTING
    return Progressing.STABLE


def is_ready(plan: Plan, desired: int) -> bool:
    return plan.ready >= desired and plan.replicas - plan.draining <= desired


def conditions(plan: Plan, obs: Observation) -> list[Condition]:
    ready = is_ready(plan, obs.desired)
    progressing = bool(plan.actions) or plan.updated < plan.replicas or plan.pending > 0
    g = obs.generation
    return [
        Condition(
            type="Ready",
            status="True" if ready else "False",
            reason="AllWorkersReady" if ready else "WorkersNotReady",
            message=f"{plan.ready}/{obs.desired} workers ready",
            observed_generation=g,
        ),
        Condition(
            type="Progressing",
            status="True" if progressing else "False",
            reason=progressing_reason(plan, obs.desired).value,
            message=f"{plan.replicas} pods, {plan.updated} of the current template, "
            f"{plan.pending} pending, {plan.draining} draining",
            observed_generation=g,
        ),
        Condition(
            type="Degraded",
            status="True" if obs.problems else "False",
            reason="Problems" if obs.problems else "AsExpected",
            message="; ".join(obs.problems)[:4000],
            observed_generation=g,
        ),
    ]


def carry_transition_times(previous: list[dict[str, Any]], current: list[Condition], now: str) -> list[dict[str, Any]]:
    """Keep lastTransitionTime when a condition's status did not change; ``now`` otherwise."""
    before = {c.get("type"): c for c in previous or []}
    out = []
    for cond in current:
        old = before.get(cond.type)
        kept = old and old.get("status") == cond.status and old.get("lastTransitionTime")
        out.append(cond.model_copy(update={"last_transition_time": kept or now}).to_k8s())
    return out


def pool_status(plan: Plan, obs: Observation, previous_conditions: list[dict[str, Any]], now: str) -> dict[str, Any]:
    """The whole ``status`` to write."""
    status = WorkerPoolStatus(
        observed_generation=obs.generation,
        replicas=plan.replicas,
        ready_replicas=plan.ready,
        updated_replicas=plan.updated,
        pending_workers=plan.pending,
        free_workers=plan.free,
        active_workers=plan.active,
        draining_workers=plan.draining,
        queued_operations=obs.queued,
        pool=obs.pool,
        selector=obs.selector,
        template_hash=obs.template_hash,
        desired_replicas=obs.desired,
        autoscaling=obs.autoscaling,
    ).to_k8s()
    if obs.autoscaling is None:
        status["autoscaling"] = None  # a merge patch removes what an earlier autoscaler wrote
    status["conditions"] = carry_transition_times(previous_conditions, conditions(plan, obs), now)
    return status


def comparable(status: dict[str, Any]) -> dict[str, Any]:
    """The status without transition times: a patch is needed only when this changes."""
    conds = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])]
    return {**status, "conditions": conds}
