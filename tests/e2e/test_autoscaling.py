"""End-to-end: WorkerPools that scale themselves on the queue depth (spec.autoscaling).

Same cluster, database and environment as ``test_kubernetes.py`` (whose preflight
skips this module where there is no cluster); its own namespace and release.

* a burst of ~200 ms operations on a pool with min 1, max 4: the pool grows to 4,
  drains the queue, shrinks back to 1 after its 5 s scale-down window, and a
  trigger in the database that logs every claim proves no operation was run twice
  (no scale decision interrupted one);
* min 0: no pods while the queue is empty; one operation brings a worker up
  (the cold start is printed) and the pool goes back to zero afterwards.

The figures (burst → max replicas, time to drain, operations per second at max,
cold start) are printed to stderr; run with ``-s`` or ``-ra`` to see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg
import pytest

from damops.db import migrate
from damops.operations import NewOperation, enqueue_many
from tests.e2e import test_kubernetes as base  # its preflight skips us where there is no cluster
from tests.support.k8s import ROOT, Images, Namespace, install_operator, uninstall_operator

DB_URL, POD_DB_URL = base.DB_URL, base.POD_DB_URL
RUN = uuid.uuid4().hex[:6]
NS = f"damops-e2e-auto-{RUN}"
RELEASE = f"damops-e2e-auto-{RUN}"
WINDOW = 5  # scale-down stabilisation window of the pools here, seconds


CLUSTER = Namespace(NS)
kubectl, kjson, wait_for, live_pods = CLUSTER.kubectl, CLUSTER.kjson, CLUSTER.wait_for, CLUSTER.live_pods


def status(name: str) -> dict[str, Any]:
    return kjson("get", "workerpool", name).get("status") or {}


def apply_pool(name: str, autoscaling: dict[str, Any], replicas: int = 1) -> None:
    body = {
        "apiVersion": "damops.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "pool": name,
            "image": base.WORKER_IMAGE,
            "imagePullPolicy": base.PULL_POLICY,
            "terminationGracePeriodSeconds": 10,
            "autoscaling": autoscaling,
        },
    }
    kubectl("apply", "-f", "-", stdin=json.dumps(body))


def enqueue(pool: str, trigger: str, count: int, inputs: dict | None = None) -> list[int]:
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        return enqueue_many(conn, [NewOperation(trigger, inputs or {}, pool=pool) for _ in range(count)])


def rows(ids: list[int]) -> list[dict[str, Any]]:
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        cur = conn.execute("SELECT id, status, attempts, worker FROM damops.operations WHERE id = ANY(%s)", (ids,))
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def finished(ids: list[int]) -> int:
    return sum(1 for r in rows(ids) if r["status"] in ("SUCCESS", "FAILED"))


def autoscaled_events(name: str) -> list[str]:
    items = kjson("get", "events", "--field-selector", f"involvedObject.name={name},reason=Autoscaled")["items"]
    return [e["message"] for e in items]


@pytest.fixture(scope="module", autouse=True)
def operator_release() -> Any:
    migrate(DB_URL)
    # helm installs a chart's CRDs only when they are missing: bring an older one up to this schema
    crd = ROOT / "crds" / "workerpools.damops.dev.yaml"
    subprocess.run(["kubectl", "apply", "--server-side", "--force-conflicts", "-f", str(crd)], check=True, timeout=60)
    proc = install_operator(
        CLUSTER,
        RELEASE,
        POD_DB_URL,
        Images.from_env(),
        sets={"operator.resources.requests.cpu": "50m"},
        strings={
            "configuration.digitalAssetManagement.schedulerHeartbeat": "500ms",
            "configuration.digitalAssetManagement.maxOperationProcessingTime": "60s",
            "configuration.digitalAssetManagement.shutdownGrace": "5s",
        },
    )
    if proc.returncode != 0:
        logs = kubectl("logs", "-l", "app.kubernetes.io/component=operator", "--tail=80", check=False).stdout
        pytest.fail(f"helm install failed: {proc.stderr}\n{logs}")
    yield RELEASE
    if os.environ.get("DAMOPS_E2E_KEEP"):
        return
    uninstall_operator(CLUSTER, RELEASE)


@pytest.fixture
def claim_log() -> Any:
    """Every claim of an operation of an ``auto-*`` pool, written by a trigger in the database:
    an operation claimed twice was given back or interrupted and run again."""
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS public.damops_e2e_auto_claims"
            " (id bigint, worker text, attempts int, at timestamptz DEFAULT clock_timestamp())"
        )
        conn.execute(
            "CREATE OR REPLACE FUNCTION public.damops_e2e_auto_claim() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN INSERT INTO public.damops_e2e_auto_claims (id, worker, attempts)"
            " VALUES (NEW.id, NEW.worker, NEW.attempts); RETURN NULL; END $$"
        )
        conn.execute("DROP TRIGGER IF EXISTS damops_e2e_auto_claims ON damops.operations")
        conn.execute(
            "CREATE TRIGGER damops_e2e_auto_claims AFTER UPDATE ON damops.operations FOR EACH ROW"
            " WHEN (NEW.status = 'PROCESSING' AND OLD.status <> 'PROCESSING' AND NEW.pool LIKE 'auto-%')"
            " EXECUTE FUNCTION public.damops_e2e_auto_claim()"
        )

    def claims(ids: list[int]) -> dict[int, list[str]]:
        with psycopg.connect(DB_URL, autocommit=True) as conn:
            out: dict[int, list[str]] = {}
            for op_id, worker in conn.execute(
                "SELECT id, worker FROM public.damops_e2e_auto_claims WHERE id = ANY(%s) ORDER BY at", (ids,)
            ):
                out.setdefault(op_id, []).append(worker)
            return out

    yield claims
    with psycopg.connect(DB_URL, autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS damops_e2e_auto_claims ON damops.operations")


def test_a_burst_grows_the_pool_to_max_drains_and_shrinks_back_without_interrupting_any_operation(
    claim_log: Any,
) -> None:
    name = f"auto-burst-{RUN}"
    apply_pool(
        name,
        {
            "minReplicas": 1,
            "maxReplicas": 4,
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0},
                "scaleDown": {"stabilizationWindowSeconds": WINDOW},
            },
        },
    )
    wait_for("1 ready worker", lambda: status(name).get("readyReplicas") == 1 and len(live_pods(name)) == 1, 180)

    ids = enqueue(name, "sleep", 240, {"seconds": 0.2})
    t0 = time.monotonic()
    at_max: float | None = None
    done_at_max = 0
    most = 0
    while finished(ids) < len(ids):
        assert time.monotonic() - t0 < 120, f"burst not drained in 120 s: {finished(ids)}/{len(ids)} done"
        st = status(name)
        most = max(most, st.get("readyReplicas") or 0)
        if at_max is None and (st.get("readyReplicas") or 0) >= 4:
            at_max, done_at_max = time.monotonic(), finished(ids)
        time.sleep(0.5)
    drained = time.monotonic()
    assert most == 4, f"the pool grew to {most} ready workers only"
    assert at_max is not None
    rate = (len(ids) - done_at_max) / max(drained - at_max, 0.001)

    wait_for(
        "the pool back to 1 worker",
        lambda: status(name).get("desiredReplicas") == 1 and len(live_pods(name)) == 1,
        WINDOW + 60,
    )
    shrunk = time.monotonic()
    print(
        f"\n[e2e autoscaling] {len(ids)} x 200 ms: burst -> 4 ready workers {at_max - t0:.1f}s, "
        f"queue drained {drained - t0:.1f}s, {rate:.1f} ops/s at 4 workers, "
        f"back to 1 worker {shrunk - drained:.1f}s after the drain (window {WINDOW}s)",
        file=sys.stderr,
    )
    final = rows(ids)
    assert all(r["status"] == "SUCCESS" and r["attempts"] == 1 for r in final), [
        r for r in final if r["status"] != "SUCCESS" or r["attempts"] != 1
    ][:5]
    # no scale decision interrupted an operation: each ran exactly once (a hand-over given back
    # unrun by a worker being removed is claimed again, but never ran)
    claimed = claim_log(ids)
    assert set(claimed) == set(ids)
    assert base.runs_of(ids) == {op_id: [(1, "success")] for op_id in ids}
    st = status(name)
    assert st["autoscaling"]["lastScaleReason"] == "ScaleDown" and st["autoscaling"]["lastScaleTime"]
    messages = autoscaled_events(name)
    assert any("1 → 4" in m for m in messages) and any("→ 1" in m for m in messages), messages
    # the worker left is idle, and its pod says so to anything that picks pods to delete
    wait_for(
        "the idle worker's pod-deletion-cost",
        lambda: (
            [p["metadata"]["annotations"].get("controller.kubernetes.io/pod-deletion-cost") for p in live_pods(name)]
            == ["100"]
        ),
        30,
    )
    kubectl("delete", "workerpool", name, "--wait=false", check=False)


def test_min_zero_has_no_pods_while_the_queue_is_empty_and_one_operation_wakes_it(claim_log: Any) -> None:
    name = f"auto-zero-{RUN}"
    apply_pool(
        name,
        {"minReplicas": 0, "maxReplicas": 2, "behavior": {"scaleDown": {"stabilizationWindowSeconds": WINDOW}}},
        replicas=1,
    )
    wait_for("no pods", lambda: status(name).get("desiredReplicas") == 0 and live_pods(name) == [], 60)
    [op] = enqueue(name, "noop", 1)
    t0 = time.monotonic()
    created = wait_for("a pod", lambda: live_pods(name) and time.monotonic(), 60, interval=0.25)
    done = wait_for("the operation", lambda: finished([op]) and time.monotonic(), 120, interval=0.25)
    [row] = rows([op])
    assert row["status"] == "SUCCESS" and row["attempts"] == 1, row
    print(
        f"\n[e2e autoscaling] cold start from zero: pod created {created - t0:.1f}s, "
        f"operation done {done - t0:.1f}s after the enqueue",
        file=sys.stderr,
    )
    wait_for("back to no pods", lambda: status(name).get("desiredReplicas") == 0 and live_pods(name) == [], WINDOW + 60)
    assert len(claim_log([op])[op]) == 1
    kubectl("delete", "workerpool", name, "--wait=false", check=False)


def test_a_worker_pod_deleted_while_active_finishes_its_operation_and_an_idle_one_exits_at_once(
    claim_log: Any,
) -> None:
    """kubectl delete pod (SIGTERM, 10 s grace): the busy worker takes no new work, finishes its
    operation and hands the result over; nothing is retried and no attempt is counted."""
    name = f"auto-term-{RUN}"
    apply_pool(name, {"minReplicas": 1, "maxReplicas": 1})
    wait_for("1 ready worker", lambda: status(name).get("readyReplicas") == 1 and len(live_pods(name)) == 1, 180)
    [op] = enqueue(name, "sleep", 1, {"seconds": 4})

    def holder() -> str | None:
        [r] = rows([op])
        return r["worker"] if r["status"] == "PROCESSING" else None

    victim = wait_for("the operation to start", holder, 60, interval=0.25)
    kubectl("delete", "pod", victim, "--wait=false")
    wait_for("the operation to end", lambda: finished([op]), 60)
    [row] = rows([op])
    assert row["status"] == "SUCCESS" and row["attempts"] == 1, row
    assert claim_log([op]) == {op: [victim]}

    # the replacement is idle: deleted, it exits at once instead of taking its whole grace
    spare = wait_for(
        "a ready replacement",
        lambda: (
            status(name).get("readyReplicas") == 1
            and [p["metadata"]["name"] for p in live_pods(name) if p["metadata"]["name"] != victim]
        ),
        120,
    )[0]
    began = time.monotonic()
    kubectl("delete", "pod", spare, "--timeout=30s", timeout=40)
    gone = time.monotonic() - began
    print(f"\n[e2e autoscaling] an idle worker pod deleted in {gone:.1f}s (grace 10 s)", file=sys.stderr)
    assert gone < 8, gone
    kubectl("delete", "workerpool", name, "--wait=false", check=False)
