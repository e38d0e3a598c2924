"""kopf wiring of the damops operator (registered on import). The work is in :mod:`damops.k8s.pool`.

* startup/cleanup: the operator-wide state, kept in kopf's ``memo``;
* create/resume/update of a WorkerPool: its channel Secret exists, its daemon wakes;
* an index of worker pods by pool, fed by the pod watch (no LIST per round);
* pod events wake their pool's daemon;
* one daemon per WorkerPool runs :class:`~damops.k8s.pool.PoolRuntime` rounds
  until kopf stops it, and stops the pool's scheduler on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from damops.config import load_settings
from damops.k8s import GROUP, PLURAL, VERSION, metrics
from damops.k8s.housekeepers import Housekeepers
from damops.k8s.kube import Kube
from damops.k8s.pods import ObservedPod, observe_pod
from damops.k8s.pool import OperatorState, PoolRuntime, ensure_secret, parse_spec
from damops.k8s.specs import LABEL_COMPONENT, LABEL_POOL, WORKER_COMPONENT, WorkerDefaults

log = logging.getLogger("damops.operator")

#: a round runs on every pod event of the pool and at least this often
RECONCILE_INTERVAL = float(os.environ.get("DAMOPS_RECONCILE_INTERVAL", "2"))
#: how long kopf waits for a stopping daemon before it looks again later (see startup)
INSTANT_EXIT = 15.0
#: operator exit: a daemon may take SHUTDOWN_GRACE (at most 60 s) to let active operations finish
STOP_BACKOFF = 75.0

WORKER_PODS: dict[str, Any] = {LABEL_COMPONENT: WORKER_COMPONENT, LABEL_POOL: kopf.PRESENT}
Logger = logging.Logger | logging.LoggerAdapter[Any]


def _state(memo: Any) -> OperatorState:
    st = getattr(memo, "damops", None)
    if not isinstance(st, OperatorState):
        raise kopf.TemporaryError("operator not started yet", delay=1)
    return st


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf keeps its bookkeeping in annotations: our status schema is structural and strict.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.damops.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.damops.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # only warnings of handlers become Events; ours are explicit
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
    # A deleted pool's daemon exits in about a second; kopf waits for that much before it looks
    # again only after the daemon's cancellation backoff, and the finalizer stays on until then.
    settings.background.instant_exit_timeout = INSTANT_EXIT
    op_settings = load_settings()
    memo.damops = OperatorState(
        settings=op_settings,
        kube=await asyncio.to_thread(Kube),
        worker_defaults=WorkerDefaults.from_env(os.environ),
        housekeepers=Housekeepers(op_settings),
    )
    metrics.start_server()
    log.info(
        "damops operator started (default worker image %s, pull policy %s, worker env %s)",
        memo.damops.worker_defaults.image,
        memo.damops.worker_defaults.pull_policy,
        ", ".join(e.name for e in memo.damops.worker_defaults.env) or "none",
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    st = getattr(memo, "damops", None)
    if isinstance(st, OperatorState):
        await st.housekeepers.close()


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def workerpool_changed(
    name: str, namespace: str | None, uid: str, spec: kopf.Spec, memo: kopf.Memo, **_: Any
) -> None:
    parse_spec(spec)
    st = _state(memo)
    assert namespace is not None  # WorkerPools are namespaced
    await ensure_secret(st.kube, namespace, name, uid)
    runtime = st.pools.get((namespace, name))
    if runtime is not None:
        runtime.wake.set()


@kopf.index("", "v1", "pods", labels=WORKER_PODS)
def worker_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    """(namespace, pool) -> the observed worker pods; kopf keeps it current from the watch."""
    return {(namespace, labels[LABEL_POOL]): observe_pod(dict(body))}


@kopf.on.event("", "v1", "pods", labels=WORKER_PODS)
async def worker_pod_event(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    st = getattr(memo, "damops", None)
    runtime = st.pools.get((namespace or "", labels.get(LABEL_POOL, ""))) if isinstance(st, OperatorState) else None
    if runtime is not None:
        runtime.wake.set()


@kopf.daemon(
    GROUP,
    VERSION,
    PLURAL,
    initial_delay=0,
    cancellation_backoff=STOP_BACKOFF,
    cancellation_timeout=15,
)
async def workerpool_daemon(
    name: str,
    namespace: str | None,
    uid: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    # kopf passes every index by its function's name; live, updated by the pod watch
    pods: kopf.Index[tuple[str, str], ObservedPod] = kwargs["worker_pods"]
    st = _state(memo)
    assert namespace is not None
    key = (namespace, name)
    runtime = PoolRuntime(st, namespace, name, uid, lambda: list(pods.get(key, [])))
    st.pools[key] = runtime

    async def wake_when_stopped() -> None:
        await stopped.wait()
        runtime.wake.set()

    watcher = asyncio.create_task(wake_when_stopped())
    try:
        while not stopped:
            try:
                await runtime.reconcile(body)
            except kopf.PermanentError as exc:
                log.error("WorkerPool %s/%s: %s", namespace, name, exc)
            except Exception as exc:  # keep the pool alive; report and retry
                log.exception("reconcile of %s/%s failed: %s", namespace, name, exc)
                runtime.last_status = None
            if stopped:
                break
            try:
                await asyncio.wait_for(runtime.wake.wait(), RECONCILE_INTERVAL)
            except TimeoutError:
                pass
            runtime.wake.clear()
            if not stopped:
                await asyncio.sleep(0.2)  # coalesce bursts of pod events
    finally:
        watcher.cancel()
        st.pools.pop(key, None)
        deleting = bool(stopped.reason and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED)
        await runtime.stop(deleting=deleting or bool(body.get("metadata", {}).get("deletionTimestamp")))
        log.info("pool daemon of %s/%s stopped%s", namespace, name, " (pool deleted)" if deleting else "")
