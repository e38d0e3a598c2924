"""End-to-end: the damops operator on a real Kubernetes cluster.

Runs against whatever cluster ``KUBECONFIG`` points at (the local single-node
cluster of ``hack/local-cluster`` in CI, kind on a laptop) and a real
PostgreSQL:

* ``DAMOPS_E2E_DATABASE_URL``      – the database as the test process reaches it
* ``DAMOPS_E2E_POD_DATABASE_URL``  – the same database as pods reach it
* ``DAMOPS_E2E_IMAGE_WORKER`` / ``DAMOPS_E2E_IMAGE_OPERATOR`` (default ``localhost/damops-{worker,operator}:dev``)
* ``DAMOPS_E2E_PULL_POLICY`` (default ``IfNotPresent``)

Without them (or without kubectl/helm, or with an unreachable cluster) the
module is skipped and the reason printed. No mocks: the chart is installed
with helm, pods run the real images, operations go through PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest


def _skip(reason: str) -> None:
    print(f"\n[e2e skipped] {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)


def _preflight() -> None:
    for tool in ("kubectl", "helm"):
        if shutil.which(tool) is None:
            _skip(f'{tool} is not on PATH (run `eval "$(hack/local-cluster env)"` or install kind + {tool})')
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if not any(Path(p).exists() for p in kubeconfig.split(os.pathsep)):
        _skip(f"no kubeconfig at {kubeconfig}: no cluster to test against (hack/local-cluster up, or make kind-up)")
    for var in ("DAMOPS_E2E_DATABASE_URL", "DAMOPS_E2E_POD_DATABASE_URL"):
        if not os.environ.get(var):
            _skip(f'{var} is not set (eval "$(hack/local-cluster env)" sets it)')
    try:
        probe = subprocess.run(["kubectl", "get", "--raw", "/readyz"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        _skip("the cluster in KUBECONFIG did not answer within 15 s")
    if probe.returncode != 0:
        _skip(f"the cluster in KUBECONFIG is not reachable: {probe.stderr.strip()[:300]}")


_preflight()

import psycopg  # noqa: E402

from damops.db import migrate  # noqa: E402
from damops.operations import NewOperation, enqueue_many  # noqa: E402
from tests.support.k8s import (  # noqa: E402
    CHART,
    Images,
    Namespace,
    condition,
    install_operator,
    pod_ready,
    uninstall_operator,
)

DB_URL = os.environ["DAMOPS_E2E_DATABASE_URL"]
POD_DB_URL = os.environ["DAMOPS_E2E_POD_DATABASE_URL"]
IMAGES = Images.from_env()
WORKER_IMAGE, PULL_POLICY = IMAGES.worker, IMAGES.pull_policy
RUN = uuid.uuid4().hex[:6]
NS = f"damops-e2e-{RUN}"
RELEASE = f"damops-e2e-{RUN}"


# --------------------------------------------------------------------------- helpers


CLUSTER = Namespace(NS)
kubectl, kjson, wait_for = CLUSTER.kubectl, CLUSTER.kjson, CLUSTER.wait_for
pods, live_pods, workerpool = CLUSTER.pods, CLUSTER.live_pods, CLUSTER.workerpool
operator_pod, operator_metrics = CLUSTER.operator_pod, CLUSTER.operator_metrics


_APPLIED: set[str] = set()  # pools created by the running test; deleted when it ends, pass or fail


def apply_pool(name: str, replicas: int, **spec: Any) -> None:
    _APPLIED.add(name)
    body = {
        "apiVersion": "damops.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"replicas": replicas, "pool": name, "image": WORKER_IMAGE, "imagePullPolicy": PULL_POLICY, **spec},
    }
    kubectl("apply", "-f", "-", stdin=json.dumps(body))


def wait_ready(name: str, replicas: int, timeout: float = 240) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        wp = workerpool(name)
        st = wp.get("status") or {}
        running = [p for p in live_pods(name) if pod_ready(p)]
        if (
            condition(wp, "Ready") == "True"
            and st.get("readyReplicas") == replicas
            and len(running) == replicas
            and len(live_pods(name)) == replicas
        ):
            return wp
        return None

    return wait_for(f"WorkerPool {name} Ready with {replicas} pods", ready, timeout=timeout)


def enqueue(pool: str, trigger: str, count: int, inputs: dict | None = None, max_attempts: int = 3) -> list[int]:
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        return enqueue_many(
            conn, [NewOperation(trigger, inputs or {}, pool=pool, max_attempts=max_attempts) for _ in range(count)]
        )


def rows(ids: list[int]) -> list[dict[str, Any]]:
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT id, status, attempts, worker, error FROM damops.operations WHERE id = ANY(%s) ORDER BY id", (ids,)
        )
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def statuses(ids: list[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows(ids):
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def wait_all_final(ids: list[int], timeout: float = 300) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        rs = rows(ids)
        return rs if all(r["status"] in ("SUCCESS", "FAILED") for r in rs) else None

    try:
        return wait_for(f"{len(ids)} operations final", done, timeout=timeout, interval=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstatuses: {statuses(ids)}") from None


def runs_of(ids: list[int]) -> dict[int, list[tuple[int, str]]]:
    """The attempts history: (attempt, outcome) of every run the operations had, in order."""
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        out: dict[int, list[tuple[int, str]]] = {}
        for op_id, attempt, outcome in conn.execute(
            "SELECT operation_id, attempt, outcome FROM damops.attempts WHERE operation_id = ANY(%s) ORDER BY id",
            (ids,),
        ):
            out.setdefault(op_id, []).append((attempt, outcome))
        return out


def delete_pool(name: str) -> None:
    kubectl("delete", "workerpool", name, "--ignore-not-found", "--wait=false", check=False)
    _APPLIED.discard(name)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def operator_release() -> Any:
    migrate(DB_URL)
    proc = install_operator(
        CLUSTER,
        RELEASE,
        POD_DB_URL,
        IMAGES,
        sets={"operator.resources.requests.cpu": "50m"},
        strings={
            "configuration.digitalAssetManagement.schedulerHeartbeat": "500ms",
            "configuration.digitalAssetManagement.maxOperationProcessingTime": "60s",
            "configuration.digitalAssetManagement.housekeepingInterval": "2s",
            "configuration.digitalAssetManagement.shutdownGrace": "5s",
        },
    )
    if proc.returncode != 0:
        logs = kubectl("logs", "-l", "app.kubernetes.io/component=operator", "--tail=80", check=False).stdout
        pods_out = kubectl("get", "pods", "-o", "wide", check=False).stdout
        pytest.fail(f"helm install failed: {proc.stderr}\n{pods_out}\n{logs}")
    yield RELEASE
    if os.environ.get("DAMOPS_E2E_KEEP"):
        return
    uninstall_operator(CLUSTER, RELEASE)


@pytest.fixture(autouse=True)
def pools_deleted_when_the_test_ends() -> Any:
    yield
    for name in sorted(_APPLIED):
        delete_pool(name)


# --------------------------------------------------------------------------- tests


def test_invalid_workerpool_is_rejected_by_the_api_server() -> None:
    bad = {
        "apiVersion": "damops.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": "invalid", "namespace": NS},
        "spec": {"replicas": -2, "imagePullPolicy": "Sometimes", "timings": {"schedulerHeartbeat": "soon"}},
    }
    proc = kubectl("apply", "-f", "-", stdin=json.dumps(bad), check=False)
    assert proc.returncode != 0, "the API server accepted an invalid WorkerPool"
    message = proc.stderr
    assert "spec.replicas" in message and "greater than or equal to 0" in message, message
    assert "Sometimes" in message and "IfNotPresent" in message, message
    assert "schedulerHeartbeat" in message, message
    assert kubectl("get", "workerpool", "invalid", check=False).returncode != 0


def test_pool_becomes_ready_with_n_pods_and_processes_500_operations() -> None:
    name = f"ready-{RUN}"
    apply_pool(name, 3)
    wp = wait_ready(name, 3)
    st = wp["status"]
    assert st["replicas"] == 3 and st["freeWorkers"] + st["activeWorkers"] == 3
    assert st["selector"] == f"app.kubernetes.io/component=worker,damops.dev/workerpool={name}"
    for pod in live_pods(name):
        owner = pod["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "WorkerPool" and owner["name"] == name and owner["uid"] == wp["metadata"]["uid"]
        assert {c["name"] for c in pod["spec"]["containers"]} == {"sidecar", "worker"}
    table = kubectl("get", "workerpools", name).stdout
    for column in ("DESIRED", "READY", "FREE", "ACTIVE", "QUEUED", "AGE"):
        assert column in table, table

    uids_before = {p["metadata"]["uid"] for p in live_pods(name)}
    ids = enqueue(name, "noop", 500)
    final = wait_all_final(ids, timeout=300)
    assert all(r["status"] == "SUCCESS" for r in final), statuses(ids)
    # pre-heated: the same pods (same UIDs) served every operation, none was restarted
    assert {p["metadata"]["uid"] for p in live_pods(name)} == uids_before
    assert all(p["status"]["containerStatuses"][i]["restartCount"] == 0 for p in live_pods(name) for i in (0, 1))
    wait_for("queuedOperations back to 0", lambda: workerpool(name)["status"].get("queuedOperations") == 0, 30)


@pytest.fixture
def claim_log() -> Any:
    """Every claim of an operation of a ``scale-*`` or ``restart-*`` pool, recorded by a trigger in the real database:
    an operation claimed twice was interrupted (its worker killed) and run again."""
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS public.damops_e2e_claims (id bigint, worker text, at timestamptz DEFAULT now())"
        )
        conn.execute(
            "CREATE OR REPLACE FUNCTION public.damops_e2e_claim() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN INSERT INTO public.damops_e2e_claims (id, worker) VALUES (NEW.id, NEW.worker); RETURN NULL; END $$"
        )
        conn.execute("DROP TRIGGER IF EXISTS damops_e2e_claims ON damops.operations")
        conn.execute(
            "CREATE TRIGGER damops_e2e_claims AFTER UPDATE ON damops.operations FOR EACH ROW"
            " WHEN (NEW.status = 'PROCESSING' AND OLD.status <> 'PROCESSING'"
            " AND (NEW.pool LIKE 'scale-%' OR NEW.pool LIKE 'restart-%'))"
            " EXECUTE FUNCTION public.damops_e2e_claim()"
        )

    def claims(ids: list[int]) -> dict[int, list[str]]:
        with psycopg.connect(DB_URL, autocommit=True) as conn:
            out: dict[int, list[str]] = {}
            for op_id, worker in conn.execute(
                "SELECT id, worker FROM public.damops_e2e_claims WHERE id = ANY(%s) ORDER BY at", (ids,)
            ):
                out.setdefault(op_id, []).append(worker)
            return out

    yield claims
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS damops_e2e_claims ON damops.operations")


def test_scale_up_and_down_loses_no_active_operation(claim_log: Any) -> None:
    name = f"scale-{RUN}"
    apply_pool(name, 2)
    wait_ready(name, 2)
    # enough work to keep 5 workers busy through the scale down, little enough for one to finish it soon
    ids = enqueue(name, "sleep", 24, {"seconds": 3})
    kubectl("scale", f"workerpool/{name}", "--replicas=5")
    wait_ready(name, 5)
    wait_for("4+ active workers", lambda: (workerpool(name)["status"].get("activeWorkers") or 0) >= 4, 60)
    kubectl("scale", f"workerpool/{name}", "--replicas=1")
    wait_for(
        "active workers draining",
        lambda: (workerpool(name)["status"].get("drainingWorkers") or 0) >= 1,
        30,
        interval=0.3,
    )
    final = wait_all_final(ids, timeout=300)
    assert all(r["status"] == "SUCCESS" for r in final), statuses(ids)
    # active workers were drained, never killed: every operation ran exactly once. (A hand-over to a
    # worker that was being removed may be given back unrun and claimed again: no attempt, no run.)
    claimed = claim_log(ids)
    assert set(claimed) == set(ids)
    assert all(r["attempts"] == 1 for r in final), final
    assert runs_of(ids) == {op_id: [(1, "success")] for op_id in ids}
    wait_ready(name, 1, timeout=120)
    events = kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    assert "ScalingUp" in events and "Draining" in events


def test_prefetching_pool_hands_back_held_operations_when_scaled_down() -> None:
    """spec.workerPrefetch with workerPrefetchDepth 3: busy workers' sidecars hold the next
    three operations. Scaling down drains them; what they held goes back to the queue unrun:
    every operation ends SUCCESS after exactly one counted attempt."""
    name = f"prefetch-{RUN}"
    # Held ones stay held behind 2 s operations: a max wait longer than they run.
    apply_pool(name, 3, workerPrefetch=True, workerPrefetchDepth=3, workerPrefetchMaxWait="1m")
    wait_ready(name, 3)
    ids = enqueue(name, "sleep", 18, {"seconds": 2})  # more than 6 stay claimed for about 6 s
    # Depth 1 claims at most 2 per worker (6 here): more means the depth reached the pool.
    wait_for("more than 2 claimed per worker", lambda: statuses(ids).get("PROCESSING", 0) > 6, 60, 0.3)
    wait_for("3 active workers", lambda: (workerpool(name)["status"].get("activeWorkers") or 0) >= 3, 60, 0.3)
    kubectl("scale", f"workerpool/{name}", "--replicas=1")
    final = wait_all_final(ids, timeout=240)
    assert all(r["status"] == "SUCCESS" and r["attempts"] == 1 for r in final), final
    prefetched = operator_metrics().get(
        f'damops_operations_prefetched_total{{namespace="{NS}",workerpool="{name}"}}', 0.0
    )
    assert prefetched > 0, "the pool never sent an operation ahead: prefetch was not on"
    wait_ready(name, 1, timeout=120)


def test_expired_worker_pod_is_replaced_and_its_operation_recovered() -> None:
    name = f"expire-{RUN}"
    apply_pool(name, 2, timings={"maxWorkerActiveTime": "6s"})
    wait_ready(name, 2)
    [op] = enqueue(name, "damops.examples:hang", 1, max_attempts=2)

    def holder() -> str | None:
        [r] = rows([op])
        return r["worker"] if r["status"] == "PROCESSING" else None

    first = wait_for("the hanging operation to start", holder, 60)
    first_uid = [p["metadata"]["uid"] for p in live_pods(name) if p["metadata"]["name"] == first][0]
    # expired: the pod is deleted and replaced (new pod, new UID); the operation is recovered (retried)
    wait_for("the expired worker's pod to go", lambda: first not in {p["metadata"]["name"] for p in pods(name)}, 120)
    [final] = wait_all_final([op], timeout=180)
    assert final["attempts"] == 2, final
    assert final["status"] == "FAILED" and "expired" in (final["error"] or ""), final
    wp = wait_ready(name, 2)
    assert first_uid not in {p["metadata"]["uid"] for p in live_pods(name)}
    events = kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    assert "WorkerExpired" in events
    assert wp["status"]["readyReplicas"] == 2


def test_worker_pod_deleted_mid_operation_is_recovered() -> None:
    name = f"kill-{RUN}"
    apply_pool(name, 1)
    wait_ready(name, 1)
    [op] = enqueue(name, "sleep", 1, {"seconds": 15})

    def holder() -> str | None:
        [r] = rows([op])
        return r["worker"] if r["status"] == "PROCESSING" else None

    victim = wait_for("the operation to start", holder, 60)
    victim_uid = [p["metadata"]["uid"] for p in live_pods(name) if p["metadata"]["name"] == victim][0]
    time.sleep(4)  # the operation is well under way: had it survived, it would end < 11 s after the kill
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        killed_at = conn.execute("SELECT now()").fetchone()[0]
    kubectl("delete", "pod", victim, "--grace-period=0", "--force", check=False)
    [final] = wait_all_final([op], timeout=240)
    assert final["status"] == "SUCCESS", final
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        finished = conn.execute("SELECT updated FROM damops.operations WHERE id = %s", (op,)).fetchone()[0]
    # recovered = run again from the start on the replacement pod: 15 s after the kill at the earliest
    assert (finished - killed_at).total_seconds() >= 14, (killed_at, finished)
    wait_ready(name, 1)
    assert victim_uid not in {p["metadata"]["uid"] for p in live_pods(name)}


def test_operator_restart_adopts_operations_in_flight(claim_log: Any) -> None:
    """The operator is restarted while every worker runs a long operation. The old one gives
    them SHUTDOWN_GRACE (5 s here), then puts them back in the queue; the new one adopts the
    running pods and their busy workers: no pod is replaced, no busy worker is handed a second
    operation while it still runs the first, and every operation ends SUCCESS on its first
    counted attempt."""
    name = f"restart-{RUN}"
    seconds = 45  # outlasts the grace and the new operator's start-up
    apply_pool(name, 3)
    wait_ready(name, 3)
    uids = {p["metadata"]["uid"] for p in live_pods(name)}
    ids = enqueue(name, "sleep", 3, {"seconds": seconds})
    wait_for("an operation on every worker", lambda: statuses(ids).get("PROCESSING") == 3, 60, interval=0.5)
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        started = dict(
            conn.execute(
                "SELECT worker, min(at) FROM public.damops_e2e_claims WHERE id = ANY(%s) GROUP BY worker", (ids,)
            )
        )
    assert len(started) == 3, started
    old = operator_pod()
    assert old is not None
    # A restart as an upgrade does it: the Deployment's Recreate strategy stops the old operator before
    # the new one starts. (Deleting the pod instead lets its ReplicaSet start the new one at once, and
    # the two schedulers take the sidecars' channels from each other during the old one's grace.)
    kubectl("rollout", "restart", f"deployment/{RELEASE}-operator")
    new = wait_for(
        "the new operator pod Ready",
        lambda: (p := operator_pod()) and p["metadata"]["name"] != old["metadata"]["name"] and p,
        120,
    )
    up_at = max(c["state"]["running"]["startedAt"] for c in new["status"]["containerStatuses"])
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        up = conn.execute("SELECT %s::timestamptz", (up_at,)).fetchone()[0]
    assert (up - min(started.values())).total_seconds() < seconds - 10, (
        f"the new operator started {up} only, too late to find the operations of {min(started.values())} in flight"
    )
    final = wait_all_final(ids, timeout=seconds * 4 + 60)
    # nothing lost, and the interrupted attempt was given back, not counted
    assert all(r["status"] == "SUCCESS" and r["attempts"] == 1 for r in final), final
    # adopted, not replaced: the same pods, no container restarted
    assert {p["metadata"]["uid"] for p in live_pods(name)} == uids
    assert all(c["restartCount"] == 0 for p in live_pods(name) for c in p["status"]["containerStatuses"])
    # adopted, not run again: each operation was claimed exactly once, and the new operator
    # wrote the result its sidecar kept.
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        claims = dict(
            conn.execute(
                "SELECT id, count(*) FROM public.damops_e2e_claims WHERE id = ANY(%s) GROUP BY id", (ids,)
            ).fetchall()
        )
    assert claims == {op_id: 1 for op_id in ids}, claims


def test_template_change_replaces_free_workers_in_rolling_fashion() -> None:
    name = f"roll-{RUN}"
    apply_pool(name, 2)
    wait_ready(name, 2)
    old_uids = {p["metadata"]["uid"] for p in live_pods(name)}
    old_hash = workerpool(name)["status"]["templateHash"]
    kubectl(
        "patch",
        "workerpool",
        name,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"env": [{"name": "E2E", "value": "2"}]}}),
    )
    min_ready = 2

    def rolled() -> bool:
        nonlocal min_ready
        wp = workerpool(name)
        st = wp.get("status") or {}
        current = [
            p
            for p in live_pods(name)
            if p["metadata"]["labels"].get("damops.dev/template-hash") == st.get("templateHash")
        ]
        min_ready = min(min_ready, sum(1 for p in live_pods(name) if pod_ready(p)))
        return (
            st.get("templateHash") != old_hash
            and len(current) == 2
            and all(pod_ready(p) for p in current)
            and len(live_pods(name)) == 2
            and st.get("updatedReplicas") == 2
        )

    wait_for("both workers replaced by the new template", rolled, 180, interval=0.5)
    assert not old_uids & {p["metadata"]["uid"] for p in live_pods(name)}
    assert min_ready >= 2, "capacity dropped below replicas during the rolling replacement"


def test_an_idle_pool_asks_the_api_server_nothing_per_round() -> None:
    """Rounds read the pods from the watch (a kopf index), not from a LIST."""
    name = f"idle-{RUN}"
    apply_pool(name, 1)
    wait_ready(name, 1)
    rounds_key = f'damops_reconcile_rounds_total{{namespace="{NS}",workerpool="{name}"}}'

    def counts() -> tuple[float, float]:
        m = operator_metrics()
        return m.get(rounds_key, 0.0), sum(v for k, v in m.items() if k.startswith("damops_api_requests_total"))

    rounds0, requests0 = counts()
    rounds, requests = wait_for("10 more rounds", lambda: (c := counts())[0] >= rounds0 + 10 and c, 120, interval=2)
    # allowed: one status patch and one re-read of the channel secret (CONFIG_RESYNC) in the window
    assert requests - requests0 <= 2, f"{requests - requests0:.0f} API requests in {rounds - rounds0:.0f} rounds"


def test_deleting_the_pool_deletes_its_pods() -> None:
    name = f"delete-{RUN}"
    apply_pool(name, 2)
    wait_ready(name, 2)
    assert len(live_pods(name)) == 2
    began = time.monotonic()
    kubectl("delete", "workerpool", name, "--timeout=120s", timeout=150)
    deleted = time.monotonic() - began
    wait_for("the pool's pods to be gone", lambda: pods(name) == [], 120, interval=0.5)
    gone = time.monotonic() - began
    print(f"\n[e2e] idle pool deleted in {deleted:.1f}s, its pods gone after {gone:.1f}s", file=sys.stderr)
    # an idle pool has nothing to wait for: its daemon stops at once, its pods get a short grace
    assert deleted < 30 and gone < 45, (deleted, gone)
    assert kubectl("get", "secret", f"{name}-damops-channel", check=False).returncode != 0 or wait_for(
        "the channel secret to be collected",
        lambda: kubectl("get", "secret", f"{name}-damops-channel", check=False).returncode != 0,
        60,
    )


TRIGGER_MODULE = """
def shout(inputs):
    return {"text": inputs["text"].upper()}
"""


def test_trigger_code_from_a_configmap_volume_runs_with_the_pools_security_context() -> None:
    """spec.volumes/volumeMounts bring trigger-function code into the worker (on extraPythonPath);
    spec.podSecurityContext/securityContext replace the pod's defaults."""
    name = f"volume-{RUN}"
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-code", "namespace": NS},
        "data": {"e2e_thumbs.py": TRIGGER_MODULE},
    }
    kubectl("apply", "-f", "-", stdin=json.dumps(configmap))
    apply_pool(
        name,
        1,
        volumes=[{"name": "code", "configMap": {"name": f"{name}-code"}}],
        volumeMounts=[{"name": "code", "mountPath": "/opt/damops-code", "readOnly": True}],
        triggerFunctions={"extraPythonPath": ["/opt/damops-code"]},
        env=[{"name": "DAMOPS_ALLOWED_TRIGGERS", "value": "e2e_thumbs"}],
        podSecurityContext={"runAsNonRoot": True, "runAsUser": 10002, "runAsGroup": 10002, "fsGroup": 10002},
        securityContext={"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
    )
    wait_ready(name, 1)
    pod = live_pods(name)[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10002
    [op_id] = enqueue(name, "e2e_thumbs:shout", 1, {"text": "from a volume"})
    [row] = wait_all_final([op_id], timeout=120)
    assert row["status"] == "SUCCESS", row
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        result = conn.execute("SELECT result FROM damops.operations WHERE id = %s", (op_id,)).fetchone()[0]
    assert result == {"text": "FROM A VOLUME"}, result
    kubectl("delete", "configmap", f"{name}-code", check=False)


def test_helm_test_enqueues_an_operation_and_sees_it_succeed() -> None:
    # no --logs: the hooks are deleted when they succeed, and one of them is a WorkerPool, not a pod
    proc = subprocess.run(
        ["helm", "test", RELEASE, "-n", NS, "--timeout", "240s"], capture_output=True, text=True, timeout=300
    )
    pool = f"{RELEASE}-helm-test"
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        done = conn.execute(
            "SELECT id, status, attempts, worker, error FROM damops.operations"
            " WHERE pool = %s AND inputs @> '{\"helm_test\": true}'",
            (pool,),
        ).fetchall()
    if proc.returncode != 0:
        # a failed hook keeps its pod and its pool: say what they saw
        test_pod = kubectl("logs", f"pod/{RELEASE}-test-operation", check=False)
        pool_status = kubectl("get", "workerpool", pool, "-o", "jsonpath={.status}", check=False)
        operator_logs = kubectl("logs", f"deploy/{RELEASE}-operator", "--tail=60", check=False)
        raise AssertionError(
            f"{proc.stdout}{proc.stderr}\n--- test pod\n{test_pod.stdout}{test_pod.stderr}"
            f"\n--- operations of pool {pool}: {done}\n--- WorkerPool status: {pool_status.stdout}"
            f"\n--- operator\n{operator_logs.stdout}"
        )
    assert f"TEST SUITE:     {RELEASE}-test-operation" in proc.stdout and "Phase:          Succeeded" in proc.stdout
    assert [row[1] for row in done] == ["SUCCESS"], f"the helm test's operation: {done}"


def helm_upgrade(*options: str) -> dict[str, Any]:
    """`helm upgrade --reuse-values` of this module's release with ``options``; returns the new
    operator pod once it, not the one before, is Ready."""
    old = operator_pod()
    assert old is not None
    proc = subprocess.run(
        ["helm", "upgrade", RELEASE, str(CHART), "-n", NS, "--reuse-values", "--wait", "--timeout", "240s", *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return wait_for(
        "the upgraded operator pod Ready",
        lambda: (p := operator_pod()) and p["metadata"]["name"] != old["metadata"]["name"] and p,
        120,
    )


def test_helm_upgrade_after_applying_the_crds_keeps_pools_and_their_pods() -> None:
    """The documented upgrade: CRDs first (server-side apply), then `helm upgrade --reuse-values`.
    The operator is replaced; the pool's pods are adopted, not recreated, and keep working."""
    name = f"upgrade-{RUN}"
    apply_pool(name, 2)
    wait_ready(name, 2)
    uids = {p["metadata"]["uid"] for p in live_pods(name)}
    crds = subprocess.run(
        ["kubectl", "apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crds.returncode == 0, crds.stderr
    assert "workerpools.damops.dev serverside-applied" in crds.stdout, crds.stdout
    schema = json.loads(
        subprocess.run(
            ["kubectl", "get", "crd", "workerpools.damops.dev", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert "volumeMounts" in schema and "topologySpreadConstraints" in schema
    # --set-string: a run id of six digits would otherwise be a number, which the schema refuses.
    new = helm_upgrade("--set-string", f"operator.podAnnotations.damops-e2e/upgraded={RUN}")
    history = json.loads(
        subprocess.run(
            ["helm", "history", RELEASE, "-n", NS, "-o", "json"], capture_output=True, text=True, timeout=60
        ).stdout
    )
    assert history[-1]["status"] == "deployed" and history[-1]["revision"] >= 2, history
    assert new["metadata"]["annotations"].get("damops-e2e/upgraded") == RUN
    wait_ready(name, 2)
    assert {p["metadata"]["uid"] for p in live_pods(name)} == uids, "the upgrade recreated the pool's pods"
    ids = enqueue(name, "noop", 20)
    assert all(r["status"] == "SUCCESS" for r in wait_all_final(ids, timeout=120)), statuses(ids)


# An OTLP/HTTP endpoint as a collector has one, run from the worker image (it has
# opentelemetry-proto): one line per span received, for `kubectl logs`.
OTLP_RECEIVER = """
import http.server
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get("service.name")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    ids = [a.value.string_value for a in span.attributes if a.key == "messaging.message.id"]
                    print("SPAN", self.path, service, repr(span.name), *ids, flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

print("listening", flush=True)
http.server.HTTPServer(("0.0.0.0", 4318), Handler).serve_forever()
"""


def test_tracing_values_send_claim_and_run_spans_to_an_otlp_collector() -> None:
    """`helm upgrade --set tracing.enabled=true --set tracing.endpoint=...` and nothing else: the
    operator sends its claim spans, and a pool without any env of its own its run spans, to the
    collector (the images carry the otel extra and its OTLP/HTTP exporter)."""
    name = f"traced-{RUN}"
    receiver = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-collector", "namespace": NS},
        "spec": {
            "containers": [
                {
                    "name": "collector",
                    "image": WORKER_IMAGE,
                    "imagePullPolicy": PULL_POLICY,
                    "command": ["python", "-u", "-c", OTLP_RECEIVER],
                    "ports": [{"containerPort": 4318}],
                }
            ]
        },
    }
    kubectl("apply", "-f", "-", stdin=json.dumps(receiver))
    try:

        def receiver_ip() -> str | None:
            pod = kjson("get", "pod", f"{name}-collector")
            listening = "listening" in kubectl("logs", f"{name}-collector", check=False).stdout
            return pod["status"].get("podIP") if listening else None

        ip = wait_for("the collector pod listening", receiver_ip, timeout=120)
        quick_export = [{"name": "OTEL_BSP_SCHEDULE_DELAY", "value": "200"}]  # spans leave in 0.2 s, not 5
        helm_upgrade(
            *("--set", "tracing.enabled=true", "--set", f"tracing.endpoint=http://{ip}:4318"),
            *("--set-json", f"workers.env={json.dumps(quick_export)}"),
            *("--set-json", f"operator.extraEnv={json.dumps(quick_export)}"),
        )
        apply_pool(name, 1)
        wait_ready(name, 1)
        worker = {c["name"]: c for c in live_pods(name)[0]["spec"]["containers"]}["worker"]
        assert {"name": "DAMOPS_TRACING", "value": "true"} in worker["env"], worker["env"]
        [op_id] = enqueue(name, "noop", 1)
        [row] = wait_all_final([op_id], timeout=120)
        assert row["status"] == "SUCCESS", row
        wanted = {
            f"SPAN /v1/traces damops-operator 'claim {name}' {op_id}",
            f"SPAN /v1/traces damops-worker 'run noop' {op_id}",
        }
        try:
            wait_for(
                f"the claim and run spans of operation {op_id} at the collector",
                lambda: wanted <= set(kubectl("logs", f"{name}-collector", check=False).stdout.splitlines()),
                timeout=60,
            )
        except AssertionError as exc:
            received = kubectl("logs", f"{name}-collector", check=False).stdout
            operator_log = kubectl("logs", f"deploy/{RELEASE}-operator", "--tail=30", check=False).stdout
            raise AssertionError(
                f"{exc}\n--- the collector received\n{received}\n--- operator\n{operator_log}"
            ) from None
    finally:
        kubectl("delete", "pod", f"{name}-collector", "--wait=false", check=False)
