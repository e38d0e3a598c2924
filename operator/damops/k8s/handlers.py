"""kopf handlers of the damops operator.

* create/resume/update of a WorkerPool: make sure its channel Secret exists and
  wake its daemon;
* one daemon per WorkerPool: runs that pool's :class:`damops.scheduler.Scheduler`
  and a level-triggered reconcile loop (pods ↔ ``spec.replicas``, scheduler
  channels ↔ pod IPs, status, Events);
* pod events of worker pods wake their pool's daemon at once;
* housekeeping (expired operations, failed-operations cleanup) runs once per
  database, started with the first pool on it and stopped with the last.

Every call to the API server or the database goes through ``asyncio.to_thread``
so kopf's event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import psycopg

from damops.config import Settings, load_settings, parse_duration
from damops.k8s import GROUP, PLURAL, VERSION, metrics
from damops.k8s.models import Condition, WorkerPoolSpec, WorkerPoolStatus
from damops.k8s.reconcile import PodInfo, plan, sync_scheduler
from damops.k8s.specs import (
    ANNOTATION_DRAINING,
    DEFAULT_IMAGE,
    LABEL_COMPONENT,
    LABEL_HASH,
    LABEL_POOL,
    SECRET_KEY,
    SIDECAR_PORT,
    WORKER_COMPONENT,
    build_secret_spec,
    build_worker_pod_spec,
    secret_name,
    selector_string,
)

log = logging.getLogger("damops.operator")

RECONCILE_INTERVAL = float(os.environ.get("DAMOPS_RECONCILE_INTERVAL", "2"))


# --------------------------------------------------------------------------- the API client (sync, in threads)


class Kube:
    """Thin wrapper over the official sync client; every call runs in a worker thread."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.ApiException = client.exceptions.ApiException

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = await self.call(
            self.core.list_namespaced_pod, namespace, label_selector=selector, _preload_content=False
        )
        return json.loads(resp.data)["items"]

    async def create_pod(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.call(self.core.create_namespaced_pod, namespace, body, _preload_content=False)
        return json.loads(resp.data)

    async def delete_pod(self, namespace: str, name: str, grace: int | None = None) -> None:
        try:
            await self.call(self.core.delete_namespaced_pod, name, namespace, grace_period_seconds=grace)
        except self.ApiException as exc:
            if exc.status != 404:
                raise

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        await self.call(self.core.patch_namespaced_pod, name, namespace, {"metadata": {"annotations": annotations}})

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        try:
            secret = await self.call(self.core.read_namespaced_secret, name, namespace)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = (secret.data or {}).get(key)
        return base64.b64decode(data).decode() if data is not None else None

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> None:
        try:
            await self.call(self.core.create_namespaced_secret, namespace, body)
        except self.ApiException as exc:
            if exc.status != 409:
                raise

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
        )


# --------------------------------------------------------------------------- operator-wide state


@dataclass
class OperatorState:
    settings: Settings
    kube: Kube
    default_image: str
    pools: dict[tuple[str, str], PoolRuntime] = field(default_factory=dict)
    housekeepers: dict[str, list[Any]] = field(default_factory=dict)  # url -> [housekeeper, task, refs]


STATE: OperatorState | None = None


def state() -> OperatorState:
    if STATE is None:
        raise kopf.TemporaryError("operator not started yet", delay=1)
    return STATE


@dataclass
class PoolRuntime:
    namespace: str
    name: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    scheduler: Any = None
    scheduler_key: tuple[Any, ...] | None = None
    expired: set[str] = field(default_factory=set)
    last_status: dict[str, Any] | None = None
    last_queued_check: float = 0.0
    queued: int = 0
    db_url: str | None = None
    stats_seen: dict[str, float] = field(default_factory=dict)


async def acquire_housekeeper(st: OperatorState, url: str) -> None:
    from damops.housekeeping import Housekeeper

    entry = st.housekeepers.get(url)
    if entry is None:
        keeper = Housekeeper(st.settings, url)
        task = asyncio.create_task(keeper.run(), name="housekeeping")
        st.housekeepers[url] = [keeper, task, 1]
        log.info("housekeeping started for a database (%d database(s) now)", len(st.housekeepers))
    else:
        entry[2] += 1


async def release_housekeeper(st: OperatorState, url: str) -> None:
    entry = st.housekeepers.get(url)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] <= 0:
        keeper, task, _ = st.housekeepers.pop(url)
        keeper.stop()
        try:
            await asyncio.wait_for(task, 10)
        except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
            task.cancel()


# --------------------------------------------------------------------------- startup / cleanup


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    global STATE
    # kopf keeps its bookkeeping in annotations: our status schema is structural and strict.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.damops.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.damops.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # only warnings of handlers become Events; ours are explicit
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
    op_settings = load_settings()
    kube = await asyncio.to_thread(Kube)
    STATE = OperatorState(
        settings=op_settings,
        kube=kube,
        default_image=os.environ.get("DAMOPS_WORKER_IMAGE", DEFAULT_IMAGE),
    )
    metrics.start_server()
    log.info("damops operator started (default worker image %s)", STATE.default_image)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    st = STATE
    if st is None:
        return
    for url in list(st.housekeepers):
        st.housekeepers[url][2] = 0
        await release_housekeeper(st, url)


# --------------------------------------------------------------------------- WorkerPool handlers


def _spec(spec: Any) -> WorkerPoolSpec:
    try:
        return WorkerPoolSpec.model_validate(dict(spec))
    except Exception as exc:  # the API server validated already; this guards older CRDs
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc


async def ensure_secret(st: OperatorState, namespace: str, name: str, uid: str) -> str:
    value = await st.kube.read_secret_key(namespace, secret_name(name), SECRET_KEY)
    if value:
        return value
    await st.kube.create_secret(namespace, build_secret_spec(name, namespace, uid))
    value = await st.kube.read_secret_key(namespace, secret_name(name), SECRET_KEY)
    if not value:
        raise kopf.TemporaryError("channel secret not readable yet", delay=2)
    return value


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def workerpool_changed(name: str, namespace: str, uid: str, spec: Any, **_: Any) -> None:
    _spec(spec)
    st = state()
    await ensure_secret(st, namespace, name, uid)
    runtime = st.pools.get((namespace, name))
    if runtime is not None:
        runtime.wake.set()


@kopf.on.event("", "v1", "pods", labels={LABEL_COMPONENT: WORKER_COMPONENT, LABEL_POOL: kopf.PRESENT})
async def worker_pod_event(namespace: str, labels: dict[str, str], **_: Any) -> None:
    st = STATE
    if st is None:
        return
    runtime = st.pools.get((namespace, labels.get(LABEL_POOL, "")))
    if runtime is not None:
        runtime.wake.set()


def _pool_settings(base: Settings, spec: WorkerPoolSpec) -> Settings:
    update = {}
    for attr, value in (
        ("scheduler_heartbeat", spec.timings.scheduler_heartbeat),
        ("max_operation_processing_time", spec.timings.max_operation_processing_time),
        ("max_worker_active_time", spec.timings.max_worker_active_time),
        ("operation_wait_interval", spec.timings.operation_wait_interval),
    ):
        if value is not None:
            update[attr] = parse_duration(value)
    return base.model_copy(update=update)


async def _database_url(st: OperatorState, namespace: str, spec: WorkerPoolSpec) -> str:
    ref = spec.database_secret_ref
    if ref is None:
        if not st.settings.database_url:
            raise LookupError("no spec.databaseSecretRef and the operator has no DATABASE_URL")
        return st.settings.database_url
    url = await st.kube.read_secret_key(namespace, ref.name, ref.key)
    if not url:
        raise LookupError(f"Secret {namespace}/{ref.name} has no key {ref.key!r}")
    return url


def _pod_info(pod: dict[str, Any], states: dict[str, str]) -> PodInfo:
    meta = pod.get("metadata", {})
    status = pod.get("status", {})
    name = meta.get("name", "")
    return PodInfo(
        name=name,
        uid=meta.get("uid", ""),
        template_hash=meta.get("labels", {}).get(LABEL_HASH, ""),
        phase=status.get("phase", "Pending"),
        ip=status.get("podIP"),
        terminating=bool(meta.get("deletionTimestamp")),
        draining=meta.get("annotations", {}).get(ANNOTATION_DRAINING) == "true",
        created=meta.get("creationTimestamp", ""),
        worker_state=states.get(name),  # type: ignore[arg-type]
    )


def _restarts(pod: dict[str, Any]) -> int:
    return sum(c.get("restartCount", 0) for c in pod.get("status", {}).get("containerStatuses", []) or [])


def _waiting_reasons(pods: list[dict[str, Any]]) -> list[str]:
    bad = {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "InvalidImageName",
        "CreateContainerError",
    }
    found = []
    for pod in pods:
        for c in pod.get("status", {}).get("containerStatuses", []) or []:
            reason = (c.get("state", {}).get("waiting") or {}).get("reason")
            if reason in bad:
                found.append(f"{pod['metadata']['name']}/{c.get('name')}: {reason}")
    return found


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(previous: list[dict[str, Any]], current: list[Condition]) -> list[dict[str, Any]]:
    """Keep lastTransitionTime when a condition's status did not change."""
    before = {c.get("type"): c for c in previous or []}
    out = []
    for cond in current:
        old = before.get(cond.type)
        if old and old.get("status") == cond.status and old.get("lastTransitionTime"):
            cond.last_transition_time = old["lastTransitionTime"]
        else:
            cond.last_transition_time = _now()
        out.append(cond.to_k8s())
    return out


async def _queued(runtime: PoolRuntime, url: str, pool: str) -> int:
    from damops.operations import count_queued

    def query() -> int:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            return count_queued(conn, pool)

    if time.monotonic() - runtime.last_queued_check >= RECONCILE_INTERVAL:
        runtime.queued = await asyncio.to_thread(query)
        runtime.last_queued_check = time.monotonic()
    return runtime.queued


async def _ensure_scheduler(
    st: OperatorState, runtime: PoolRuntime, namespace: str, name: str, uid: str, spec: WorkerPoolSpec, logger: Any
) -> None:
    from damops.db import migrate
    from damops.scheduler import Scheduler

    secret = await ensure_secret(st, namespace, name, uid)
    url = await _database_url(st, namespace, spec)
    settings = _pool_settings(st.settings, spec)
    pool = spec.pool_name(name)
    key = (
        url,
        pool,
        secret,
        settings.scheduler_heartbeat,
        settings.max_operation_processing_time,
        settings.max_worker_active_time,
        settings.operation_wait_interval,
    )
    if runtime.scheduler is not None and runtime.scheduler_key == key:
        return
    if runtime.scheduler is not None:
        log.info("scheduler settings changed: restarting the scheduler of pool %r", pool)
        await runtime.scheduler.stop(grace=0)
        runtime.scheduler = None
    if runtime.db_url != url:
        await asyncio.to_thread(migrate, url)
        if runtime.db_url is not None:
            await release_housekeeper(st, runtime.db_url)
        await acquire_housekeeper(st, url)
        runtime.db_url = url

    async def on_expired(worker: str) -> None:
        runtime.expired.add(worker)
        runtime.wake.set()

    scheduler = Scheduler(settings, url, pool=pool, secret=secret, on_worker_expired=on_expired)
    await scheduler.start()
    runtime.scheduler, runtime.scheduler_key = scheduler, key
    runtime.stats_seen = {}
    log.info("scheduler of pool %r started", pool)


async def reconcile_once(
    st: OperatorState, runtime: PoolRuntime, name: str, namespace: str, uid: str, body: Any, logger: Any
) -> None:
    spec = _spec(body.get("spec", {}))
    meta = body.get("metadata", {})
    generation = meta.get("generation")
    degraded: list[str] = []
    try:
        await _ensure_scheduler(st, runtime, namespace, name, uid, spec, logger)
    except (LookupError, psycopg.Error, OSError) as exc:
        degraded.append(f"scheduler not running: {exc}")
    scheduler = runtime.scheduler

    # expired workers: delete the pod, a new one (new UID) replaces it
    for worker in sorted(runtime.expired):
        runtime.expired.discard(worker)
        kopf.event(
            body,
            type="Warning",
            reason="WorkerExpired",
            message=f"worker {worker} was active longer than MAX_WORKER_ACTIVE_TIME: pod deleted and replaced, "
            f"its operation recovered",
        )
        metrics.WORKER_RESTARTS.labels(namespace, name, "expired").inc()
        await st.kube.delete_pod(namespace, worker, grace=5)

    raw_pods = await st.kube.list_pods(namespace, selector_string(name))
    states: dict[str, str] = {}
    if scheduler is not None:
        known = {n: host for n, (host, _) in scheduler.worker_addresses().items()}
        sync = sync_scheduler([_pod_info(p, {}) for p in raw_pods], known)
        for worker in sync.remove:
            scheduler.remove_worker(worker)
        for worker, ip in sync.add:
            scheduler.add_worker(worker, ip, SIDECAR_PORT)
        for worker in sync.drain:
            scheduler.drain_worker(worker)
        for view in scheduler.snapshot().workers:
            if not view.draining or view.state == "active":
                states[view.name] = view.state
    pods = [_pod_info(p, states) for p in raw_pods]

    from damops.k8s.specs import pod_template, template_hash

    digest = template_hash(pod_template(name, spec, st.default_image))
    decision = plan(spec.replicas, digest, pods, max_surge=spec.rolling_update.max_surge)
    created = deleted = drained = 0
    errors: list[str] = []
    # a pod that finished (Failed/Succeeded) mid-operation: recover through the scheduler first
    for action in decision.actions:
        try:
            if action.kind == "create":
                if scheduler is None:
                    continue  # pre-heat only what a running scheduler can use
                await st.kube.create_pod(namespace, build_worker_pod_spec(name, namespace, uid, spec, st.default_image))
                created += 1
            elif action.kind == "delete":
                if scheduler is not None:
                    scheduler.remove_worker(action.name)
                await st.kube.delete_pod(namespace, action.name)
                deleted += 1
                if action.reason.startswith("pod "):
                    metrics.WORKER_RESTARTS.labels(namespace, name, "pod-finished").inc()
                    kopf.event(
                        body,
                        type="Warning",
                        reason="WorkerRestarted",
                        message=f"worker pod {action.name}: {action.reason}",
                    )
            elif action.kind == "drain":
                await st.kube.annotate_pod(namespace, action.name, {ANNOTATION_DRAINING: "true"})
                if scheduler is not None:
                    scheduler.drain_worker(action.name)
                drained += 1
        except st.kube.ApiException as exc:
            errors.append(f"{action.kind} {action.name or 'pod'}: {exc.status} {exc.reason}")
    if created:
        kopf.event(
            body,
            type="Normal",
            reason="ScalingUp",
            message=f"created {created} worker pod(s) (desired {spec.replicas})",
        )
    if deleted:
        kopf.event(
            body,
            type="Normal",
            reason="ScalingDown",
            message=f"deleted {deleted} worker pod(s): {', '.join(sorted({a.reason for a in decision.actions if a.kind == 'delete'}))}",
        )
    if drained:
        kopf.event(
            body,
            type="Normal",
            reason="Draining",
            message=f"draining {drained} active worker(s): no new work, removed when their operation ends",
        )
    degraded.extend(errors)
    degraded.extend(_waiting_reasons(raw_pods))

    queued = runtime.queued
    pool = spec.pool_name(name)
    if runtime.db_url:
        try:
            queued = await _queued(runtime, runtime.db_url, pool)
        except psycopg.Error as exc:
            degraded.append(f"database: {str(exc).strip().splitlines()[0] if str(exc) else exc}")

    # ----- status
    progressing = bool(decision.actions) or decision.updated < decision.replicas or decision.pending > 0
    ready = decision.ready >= spec.replicas and decision.replicas - decision.draining <= spec.replicas
    if decision.creates or decision.replicas - decision.draining < spec.replicas:
        p_reason = "ScalingUp"
    elif any(a.kind in ("delete", "drain") and "scale down" in a.reason for a in decision.actions) or decision.draining:
        p_reason = "ScalingDown"
    elif decision.updated < decision.replicas:
        p_reason = "RollingUpdate"
    elif decision.pending:
        p_reason = "WorkersStarting"
    else:
        p_reason = "Stable"
    conds = [
        Condition(
            type="Ready",
            status="True" if ready else "False",
            reason="AllWorkersReady" if ready else "WorkersNotReady",
            message=f"{decision.ready}/{spec.replicas} workers ready",
            observed_generation=generation,
        ),
        Condition(
            type="Progressing",
            status="True" if progressing else "False",
            reason=p_reason,
            message=f"{decision.replicas} pods, {decision.updated} of the current template, "
            f"{decision.pending} pending, {decision.draining} draining",
            observed_generation=generation,
        ),
        Condition(
            type="Degraded",
            status="True" if degraded else "False",
            reason="Problems" if degraded else "AsExpected",
            message="; ".join(degraded)[:4000] if degraded else "",
            observed_generation=generation,
        ),
    ]
    status = WorkerPoolStatus(
        observed_generation=generation,
        replicas=decision.replicas,
        ready_replicas=decision.ready,
        updated_replicas=decision.updated,
        pending_workers=decision.pending,
        free_workers=decision.free,
        active_workers=decision.active,
        draining_workers=decision.draining,
        queued_operations=queued,
        pool=pool,
        selector=selector_string(name),
        template_hash=digest,
    ).to_k8s()
    status["conditions"] = _conditions((body.get("status") or {}).get("conditions", []), conds)
    comparable = {
        **status,
        "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status["conditions"]],
    }
    if comparable != runtime.last_status:
        await st.kube.patch_status(namespace, name, status)
        runtime.last_status = comparable

    # ----- metrics
    for worker_state, count in (
        ("pending", decision.pending),
        ("free", decision.free),
        ("active", decision.active),
        ("draining", decision.draining),
    ):
        metrics.WORKERS.labels(namespace, name, worker_state).set(count)
    metrics.QUEUED.labels(namespace, name, pool).set(queued)
    if scheduler is not None:
        metrics.observe_stats(namespace, name, scheduler.snapshot().stats, runtime.stats_seen)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=90, initial_delay=0)
async def workerpool_daemon(
    name: str, namespace: str, uid: str, body: Any, stopped: Any, logger: logging.Logger, **_: Any
) -> None:
    st = state()
    runtime = PoolRuntime(namespace, name)
    st.pools[(namespace, name)] = runtime
    try:
        while not stopped:
            try:
                await reconcile_once(st, runtime, name, namespace, uid, body, logger)
            except kopf.PermanentError as exc:
                log.error("WorkerPool %s/%s: %s", namespace, name, exc)
            except Exception as exc:  # noqa: BLE001 - keep the pool alive; report and retry
                log.exception("reconcile of %s/%s failed: %s", namespace, name, exc)
                runtime.last_status = None
            try:
                await asyncio.wait_for(runtime.wake.wait(), RECONCILE_INTERVAL)
            except TimeoutError:
                pass
            runtime.wake.clear()
            await asyncio.sleep(0.2)  # coalesce bursts of pod events
    finally:
        st.pools.pop((namespace, name), None)
        if runtime.scheduler is not None:
            deleting = bool(body.get("metadata", {}).get("deletionTimestamp"))
            await runtime.scheduler.stop(grace=0 if deleting else min(st.settings.shutdown_grace, 60))
        if runtime.db_url:
            await release_housekeeper(st, runtime.db_url)
        for worker_state in ("pending", "free", "active", "draining"):
            try:
                metrics.WORKERS.remove(namespace, name, worker_state)
            except KeyError:
                pass
        log.info("pool daemon of %s/%s stopped", namespace, name)
