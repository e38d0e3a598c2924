"""One WorkerPool at run time: its scheduler and one reconcile round (the I/O around the pure parts).

A round: make sure the scheduler runs with the pool's current configuration;
replace expired workers; join the observed pods (kopf's index, corrected by
:class:`~damops.k8s.pods.Expectations`) with the scheduler's view; tell the
scheduler which workers exist; :func:`~damops.k8s.reconcile.plan`; carry the plan
out; post Events; write the status when it changed; set the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import psycopg

from damops.config import Settings
from damops.db import migrate
from damops.dispatch import WorkerState
from damops.k8s import events, metrics
from damops.k8s.autoscale import History, Load, decide
from damops.k8s.housekeepers import Housekeepers
from damops.k8s.kube import Kube
from damops.k8s.models import AutoscalingStatus, WorkerPoolSpec
from damops.k8s.pods import (
    Expectations,
    ObservedPod,
    cost_patches,
    pod_info,
    scheduler_states,
    with_worker_states,
)
from damops.k8s.poolconfig import SchedulerConfig, pool_settings
from damops.k8s.queue_depth import QueueDepth
from damops.k8s.reconcile import Action, ActionKind, PodInfo, Reason, plan, sync_scheduler
from damops.k8s.specs import (
    ANNOTATION_DELETION_COST,
    ANNOTATION_DRAINING,
    SECRET_KEY,
    SIDECAR_PORT,
    WorkerDefaults,
    build_secret_spec,
    build_worker_pod_spec,
    pod_template,
    secret_name,
    selector_string,
    template_hash,
)
from damops.k8s.status import Observation, comparable, pool_status
from damops.scheduler import Scheduler

log = logging.getLogger("damops.operator")

#: how often the queue depth is read, at most
QUEUED_INTERVAL = 2.0
#: the channel secret and the database URL are re-read this often (and on every spec change)
CONFIG_RESYNC = 60.0
#: an expired worker's pod gets this grace: its operation was recovered already
EXPIRED_GRACE = 5
#: a deleted pool's pods get this grace: the scheduler has let them go, their operations are back in the queue
DELETED_POOL_GRACE = 1


@dataclass
class OperatorState:
    """Shared by all pools of the operator; kept in kopf's ``memo``."""

    settings: Settings
    kube: Kube
    worker_defaults: WorkerDefaults
    housekeepers: Housekeepers
    pools: dict[tuple[str, str], PoolRuntime] = field(default_factory=dict)


def parse_spec(spec: Mapping[str, Any]) -> WorkerPoolSpec:
    try:
        return WorkerPoolSpec.model_validate(dict(spec))
    except Exception as exc:  # the API server validated already; this guards older CRDs
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def ensure_secret(kube: Kube, namespace: str, name: str, uid: str) -> str:
    """The pool's channel secret, created (owned by the WorkerPool) when missing."""
    value = await kube.read_secret_key(namespace, secret_name(name), SECRET_KEY)
    if value:
        return value
    await kube.create_secret(namespace, build_secret_spec(name, namespace, uid))
    value = await kube.read_secret_key(namespace, secret_name(name), SECRET_KEY)
    if not value:
        raise kopf.TemporaryError("channel secret not readable yet", delay=2)
    return value


class PoolRuntime:
    def __init__(
        self, op: OperatorState, namespace: str, name: str, uid: str, pods: Callable[[], list[ObservedPod]]
    ) -> None:
        self.op = op
        self.namespace, self.name, self.uid = namespace, name, uid
        self.pods = pods  # the pool's pods as the watch last showed them
        self.wake = asyncio.Event()
        self.scheduler: Scheduler | None = None
        self.config: SchedulerConfig | None = None
        self.config_checked_at = 0.0
        self.config_generation: int | None = None
        self.db_url: str | None = None
        self.expired: set[str] = set()
        self.expectations = Expectations()
        self.last_status: dict[str, Any] | None = None
        self.queued = 0
        self.queued_checked_at = 0.0
        self.queue_depth = QueueDepth()
        self.stats_seen: dict[str, float] = {}
        # the autoscaler: its desired replicas (None: not decided yet), windows' history, last decision
        self.scaled: int | None = None
        self.scale_history: History | None = None
        self.scale_status: AutoscalingStatus | None = None
        self.costs_sent: dict[str, str] = {}  # pod-deletion-cost last patched, per pod

    # --- the scheduler -----------------------------------------------------

    async def _resolve_config(self, spec: WorkerPoolSpec) -> SchedulerConfig:
        kube, settings = self.op.kube, self.op.settings
        secret = await ensure_secret(kube, self.namespace, self.name, self.uid)
        ref = spec.database_secret_ref
        if ref is None:
            if not settings.database_url:
                raise LookupError("no spec.databaseSecretRef and the operator has no DATABASE_URL")
            url = settings.database_url
        else:
            found = await kube.read_secret_key(self.namespace, ref.name, ref.key)
            if not found:
                raise LookupError(f"Secret {self.namespace}/{ref.name} has no key {ref.key!r}")
            url = found
        return SchedulerConfig(url, spec.pool_name(self.name), secret, pool_settings(settings, spec))

    async def ensure_scheduler(self, spec: WorkerPoolSpec, generation: int | None) -> None:
        """(Re)start the scheduler when its configuration changed. The configuration is read
        from the API server only on spec changes, while no scheduler runs, or every CONFIG_RESYNC."""
        now = time.monotonic()
        fresh = generation == self.config_generation and now - self.config_checked_at < CONFIG_RESYNC
        if self.scheduler is not None and fresh:
            return
        config = await self._resolve_config(spec)
        self.config_checked_at, self.config_generation = now, generation
        if self.scheduler is not None and self.config is not None and self.config.key == config.key:
            return
        if self.scheduler is not None:
            log.info("scheduler settings changed: restarting the scheduler of pool %r", config.pool)
            # The sidecars keep what they run; the new scheduler adopts it.
            await self.scheduler.stop(grace=0, release=False)
            self.scheduler = None
        if self.db_url != config.url:
            await asyncio.to_thread(migrate, config.url)
            if self.db_url is not None:
                self.op.housekeepers.release(self.db_url)
            self.op.housekeepers.acquire(config.url)
            self.db_url = config.url

        async def on_expired(worker: str) -> None:
            self.expired.add(worker)
            self.wake.set()

        scheduler = Scheduler(
            config.settings, config.url, pool=config.pool, secret=config.secret, on_worker_expired=on_expired
        )
        await scheduler.start()
        self.scheduler, self.config, self.stats_seen = scheduler, config, {}
        self.scale_history = None  # a new scheduler knows no busy worker yet: restart the windows
        log.info("scheduler of pool %r started", config.pool)

    # --- one round ---------------------------------------------------------

    async def reconcile(self, body: kopf.Body) -> None:
        kube, ns = self.op.kube, self.namespace
        spec = parse_spec(body.get("spec", {}))
        generation = body.get("metadata", {}).get("generation")
        problems: list[str] = []
        try:
            await self.ensure_scheduler(spec, generation)
        except (LookupError, psycopg.Error, OSError, kube.ApiException) as exc:
            problems.append(f"scheduler not running: {_first_line(exc)}")
            self.config_checked_at = 0.0  # try again next round
        scheduler = self.scheduler

        for worker in sorted(self.expired):
            self.expired.discard(worker)
            self._post(body, events.expired(worker))
            metrics.WORKER_RESTARTS.labels(ns, self.name, "expired").inc()
            await kube.delete_pod(ns, worker, grace=EXPIRED_GRACE)
            self.expectations.expect_deleted(worker, time.monotonic())

        observed = self.pods()
        infos = self.expectations.apply([o.info for o in observed], time.monotonic())
        states = {}
        if scheduler is not None:
            known = {n: host for n, (host, _) in scheduler.worker_addresses().items()}
            sync = sync_scheduler(infos, dict(known))
            for worker in sync.remove:
                scheduler.remove_worker(worker)
            for worker, ip in sync.add:
                scheduler.add_worker(worker, ip, SIDECAR_PORT)
            for worker in sync.drain:
                scheduler.drain_worker(worker)
            states = scheduler_states(scheduler.snapshot().workers)

        digest = template_hash(pod_template(self.name, spec, self.op.worker_defaults))
        workers = with_worker_states(infos, states)
        pool = spec.pool_name(self.name)
        try:
            queued = await self._queued(pool)
        except psycopg.Error as exc:
            queued = self.queued
            problems.append(f"database: {_first_line(exc)}")

        desired = self._desired(body, spec, digest, workers, queued)
        decision = plan(desired, digest, workers, spec.rolling_update.max_surge)
        done, errors = await self._carry_out(decision.actions, spec)
        for event in events.summary(done, desired):
            self._post(body, event)
        problems += errors
        problems += [p for o in observed for p in o.problems]
        await self._patch_costs(workers, {a.name for a in done if a.kind is not ActionKind.CREATE})

        obs = Observation(
            desired,
            pool,
            selector_string(self.name),
            digest,
            generation,
            queued,
            tuple(problems),
            self.scale_status if spec.autoscaling is not None else None,
        )
        status = pool_status(decision, obs, (body.get("status") or {}).get("conditions", []), _now())
        if comparable(status) != self.last_status:
            await kube.patch_status(ns, self.name, status)
            self.last_status = comparable(status)

        for state, count in (
            ("pending", decision.pending),
            ("free", decision.free),
            ("active", decision.active),
            ("draining", decision.draining),
        ):
            metrics.WORKERS.labels(ns, self.name, state).set(count)
        metrics.QUEUED.labels(ns, self.name, pool).set(queued)
        metrics.DESIRED.labels(ns, self.name).set(desired)
        metrics.REPLICAS.labels(ns, self.name).set(decision.replicas)
        if scheduler is not None:
            metrics.observe_stats(ns, self.name, scheduler.snapshot().stats, self.stats_seen)
        metrics.ROUNDS.labels(ns, self.name).inc()

    def _desired(self, body: kopf.Body, spec: WorkerPoolSpec, digest: str, workers: list[PodInfo], queued: int) -> int:
        """spec.replicas, or the autoscaler's decision for this round (:func:`~damops.k8s.autoscale.decide`)."""
        auto = spec.autoscaling
        if auto is None:
            self.scaled, self.scale_history, self.scale_status = None, None, None
            return spec.replicas
        ns, now = self.namespace, time.monotonic()
        if self.scaled is None:
            # after an operator restart: carry on from the last decision written to the status
            status = body.get("status") or {}
            previous = status.get("desiredReplicas") if status.get("autoscaling") else None
            self.scaled = previous if isinstance(previous, int) else spec.replicas
            try:
                self.scale_status = AutoscalingStatus.model_validate(status.get("autoscaling") or {})
            except ValueError:
                self.scale_status = AutoscalingStatus()
        current = self.scaled
        if self.scale_history is None:
            self.scale_history = History.fresh(current, now)
        if self.scheduler is None:
            return current  # the workers' states are unknown: no decision on guesses
        figures = plan(current, digest, workers)  # only its counts: they do not depend on the replicas
        load = Load(queued, figures.active - figures.draining, figures.free, figures.pending)
        d = decide(load, current, auto, self.scale_history, now)
        self.scaled, self.scale_history = d.desired, d.history
        last = self.scale_status or AutoscalingStatus()
        if d.changed and d.reason is not None:
            last = last.model_copy(
                update={"last_scale_time": _now(), "last_scale_reason": d.reason, "last_scale_message": d.message}
            )
            self._post(body, events.autoscaled(d.message))
            metrics.AUTOSCALED.labels(ns, self.name, "up" if d.desired > current else "down").inc()
            log.info("WorkerPool %s/%s autoscaled: %s", ns, self.name, d.message)
        self.scale_status = last.model_copy(update={"recommended_replicas": d.recommended, "message": d.message})
        metrics.RECOMMENDED.labels(ns, self.name).set(d.recommended)
        return d.desired

    def _claimed_since(self, name: str) -> bool:
        """The scheduler handed the worker an operation after the snapshot the plan used."""
        scheduler = self.scheduler
        return scheduler is not None and any(
            w.name == name and w.state == WorkerState.ACTIVE for w in scheduler.snapshot().workers
        )

    async def _patch_costs(self, workers: list[PodInfo], skip: set[str]) -> None:
        """pod-deletion-cost follows each worker's state class (pending < idle < busy); patched
        only when the class changes, so a steady pool costs no API request."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        idle = {w.name: w.last_touched_seconds_ago for w in scheduler.snapshot().workers if w.state == WorkerState.FREE}
        live = [p for p in workers if p.name not in skip]
        names = {p.name for p in live}
        self.costs_sent = {n: c for n, c in self.costs_sent.items() if n in names}
        for name, cost in cost_patches(live, idle, self.costs_sent):
            try:
                await self.op.kube.annotate_pod(self.namespace, name, {ANNOTATION_DELETION_COST: cost})
                self.costs_sent[name] = cost
            except self.op.kube.ApiException as exc:  # gone meanwhile: the next round knows
                log.debug("pod-deletion-cost of %s/%s not set: %s", self.namespace, name, exc)

    async def _carry_out(self, actions: list[Action], spec: WorkerPoolSpec) -> tuple[list[Action], list[str]]:
        """Carry out the plan; returns the actions done and one message per API error."""
        kube, ns, scheduler = self.op.kube, self.namespace, self.scheduler
        done: list[Action] = []
        errors: list[str] = []
        for action in actions:
            if (
                action.kind is ActionKind.DELETE
                and not action.reason.pod_finished
                and action.reason is not Reason.DRAINED
            ):
                if self._claimed_since(action.name):
                    # busy since the plan's snapshot: drain it, never cut its operation short
                    busy = Reason.SCALE_DOWN_ACTIVE if action.reason.scale_down else action.reason
                    action = Action(ActionKind.DRAIN, action.name, busy)
            try:
                if action.kind is ActionKind.CREATE:
                    if scheduler is None:
                        continue  # pre-heat only what a running scheduler can use
                    body = build_worker_pod_spec(self.name, ns, self.uid, spec, self.op.worker_defaults)
                    created = await kube.create_pod(ns, body)
                    self.expectations.expect_created(pod_info(created), time.monotonic())
                elif action.kind is ActionKind.DELETE:
                    if scheduler is not None:
                        scheduler.remove_worker(action.name)
                    await kube.delete_pod(ns, action.name)
                    self.expectations.expect_deleted(action.name, time.monotonic())
                    if action.reason.pod_finished:
                        metrics.WORKER_RESTARTS.labels(ns, self.name, "pod-finished").inc()
                else:
                    await kube.annotate_pod(ns, action.name, {ANNOTATION_DRAINING: "true"})
                    self.expectations.expect_drained(action.name, time.monotonic())
                    if scheduler is not None:
                        scheduler.drain_worker(action.name)
                done.append(action)
            except kube.ApiException as exc:
                status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
                errors.append(f"{action.kind.value} {action.name or 'pod'}: {status} {reason}")
        return done, errors

    async def _queued(self, pool: str) -> int:
        if self.db_url is None or time.monotonic() - self.queued_checked_at < QUEUED_INTERVAL:
            return self.queued
        self.queued = await self.queue_depth.read(self.db_url, pool)
        self.queued_checked_at = time.monotonic()
        return self.queued

    def _post(self, body: kopf.Body, event: events.PoolEvent) -> None:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    # --- the end -----------------------------------------------------------

    async def stop(self, deleting: bool) -> None:
        """Stop the scheduler. When the pool is being deleted there is nothing to wait for:
        operations go back to the queue at once and the pods go with a short grace;
        otherwise nothing is given back, so nothing runs twice."""
        if self.scheduler is not None:
            try:
                # Deleted: unfinished operations go back to the queue. Operator shutdown or
                # restart: the sidecars keep them, and the next operator adopts them.
                grace = 0 if deleting else min(self.op.settings.shutdown_grace, 60)
                await self.scheduler.stop(grace=grace, release=deleting)
            except Exception as exc:  # the pods and the housekeeper must still be let go
                log.exception("scheduler of %s/%s did not stop cleanly: %s", self.namespace, self.name, exc)
            self.scheduler = None
        if deleting:
            names = [o.info.name for o in self.pods() if not o.info.terminating]
            results = await asyncio.gather(
                *(self.op.kube.delete_pod(self.namespace, n, grace=DELETED_POOL_GRACE) for n in names),
                return_exceptions=True,
            )
            for n, result in zip(names, results):
                if isinstance(result, Exception):
                    log.warning("could not delete pod %s/%s of the deleted pool: %s", self.namespace, n, result)
        await self.queue_depth.close()
        if self.db_url is not None:
            self.op.housekeepers.release(self.db_url)
            self.db_url = None
        for state in ("pending", "free", "active", "draining"):
            try:
                metrics.WORKERS.remove(self.namespace, self.name, state)
            except KeyError:
                pass
        for gauge in (metrics.ROUNDS, metrics.DESIRED, metrics.REPLICAS, metrics.RECOMMENDED):
            try:
                gauge.remove(self.namespace, self.name)
            except KeyError:
                pass
        for direction in ("up", "down"):
            try:
                metrics.AUTOSCALED.remove(self.namespace, self.name, direction)
            except KeyError:
                pass
