"""damops on a real cluster: start-up, throughput through pods, operator CPU, API load.

    eval "$(hack/local-cluster env)"          # or a kind cluster and the DAMOPS_E2E_* variables
    .venv/bin/python bench/k8s.py             # make bench-k8s

Installs the chart (the images under test, chart defaults otherwise) into a
namespace of its own and measures:

* start-up: seconds from ``kubectl apply`` of a WorkerPool of ``--max-workers``
  until 10 and until all of its worker pods are Ready (a pod is Ready when its
  worker is pre-heated and connected);
* throughput through pods: ``--ops`` no-op operations enqueued in one
  transaction with ``--workers`` workers (after the start-up pool's extra pods
  are gone and one small warm-up batch), until none is left unfinished;
  ``--rounds`` times, median and range;
* operator CPU: ``process_cpu_seconds_total`` of the operator pod over each
  round, as CPU per operation and as cores per 1,000 operations/s;
* API requests per minute (``damops_api_requests_total``, the operator's own
  client) while the pool is busy and while it is idle at steady state.

Figures go to stdout and to ``bench/results/k8s-<UTC timestamp>.json``. Nothing
here asserts a time; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from damops.db import migrate  # noqa: E402
from damops.operations import NewOperation, enqueue_many  # noqa: E402
from tests.support.k8s import Images, Namespace, install_operator, pod_ready, uninstall_operator  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def preflight() -> tuple[str, str]:
    missing = [v for v in ("DAMOPS_E2E_DATABASE_URL", "DAMOPS_E2E_POD_DATABASE_URL") if not os.environ.get(v)]
    if missing:
        sys.exit(f'bench/k8s.py: {", ".join(missing)} not set (eval "$(hack/local-cluster env)" sets them)')
    probe = subprocess.run(["kubectl", "get", "--raw", "/readyz"], capture_output=True, text=True, timeout=15)
    if probe.returncode != 0:
        sys.exit(f"bench/k8s.py: no cluster in KUBECONFIG answers: {probe.stderr.strip()[:200]}")
    return os.environ["DAMOPS_E2E_DATABASE_URL"], os.environ["DAMOPS_E2E_POD_DATABASE_URL"]


def ready_pods(ns: Namespace, pool: str) -> int:
    return sum(1 for p in ns.live_pods(pool) if pod_ready(p))


def time_to_ready(
    ns: Namespace, pool: str, images: Images, replicas: int, marks: list[int], prefetch_depth: int
) -> dict[str, float]:
    """Apply a WorkerPool of ``replicas`` and time each mark of Ready pods from the apply."""
    spec: dict[str, Any] = {
        "replicas": replicas,
        "pool": pool,
        "image": images.worker,
        "imagePullPolicy": images.pull_policy,
    }
    if prefetch_depth:
        spec |= {"workerPrefetch": True, "workerPrefetchDepth": prefetch_depth}
    body = {
        "apiVersion": "damops.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": pool, "namespace": ns.name},
        "spec": spec,
    }
    began = time.monotonic()
    ns.apply(body)
    reached: dict[str, float] = {}
    deadline = began + 900
    while len(reached) < len(marks) and time.monotonic() < deadline:
        count = ready_pods(ns, pool)
        for mark in marks:
            if count >= mark and str(mark) not in reached:
                reached[str(mark)] = round(time.monotonic() - began, 2)
        time.sleep(0.25)
    return reached


def scale(ns: Namespace, pool: str, replicas: int) -> None:
    ns.kubectl("patch", "workerpool", pool, "--type=merge", "-p", json.dumps({"spec": {"replicas": replicas}}))
    ns.wait_for(
        f"{replicas} Ready workers",
        # Terminating pods gone too: their teardown would share the CPU with the rounds.
        lambda: len(ns.pods(pool)) == replicas == len(ns.live_pods(pool)) and ready_pods(ns, pool) == replicas,
        timeout=600,
        interval=1,
    )


def unfinished(db_url: str, pool: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM damops.operations WHERE pool = %s AND status IN ('NEW', 'WAIT', 'PROCESSING')",
            (pool,),
        ).fetchone()
        return int(row[0]) if row else 0


def operator_counters(ns: Namespace) -> tuple[float, float]:
    """(operator CPU seconds, API requests) so far."""
    m = ns.operator_metrics()
    requests = sum(v for k, v in m.items() if k.startswith("damops_api_requests_total"))
    return m.get("process_cpu_seconds_total", float("nan")), requests


def throughput_round(ns: Namespace, db_url: str, pool: str, ops: int) -> dict[str, float]:
    cpu0, req0 = operator_counters(ns)
    began = time.monotonic()
    with psycopg.connect(db_url) as conn:
        enqueue_many(conn, [NewOperation("noop", {}, pool=pool) for _ in range(ops)])
    while unfinished(db_url, pool):
        time.sleep(0.1)
    wall = time.monotonic() - began
    cpu1, req1 = operator_counters(ns)
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'SUCCESS'), count(*) FROM damops.operations WHERE pool = %s",
            (pool,),
        ).fetchone()
        conn.execute("DELETE FROM damops.operations WHERE pool = %s", (pool,))
    assert row is not None and row[0] == row[1] == ops, f"not every operation succeeded: {row}"
    rate = ops / wall
    cpu = cpu1 - cpu0
    return {
        "ops": ops,
        "seconds": round(wall, 3),
        "ops_per_s": round(rate, 1),
        "operator_cpu_us_per_op": round(cpu / ops * 1e6, 1),
        "operator_cores_per_1000_ops_s": round(cpu / wall / (rate / 1000), 3),
        "api_requests_per_min": round((req1 - req0) / wall * 60, 1),
    }


def idle_api_rate(ns: Namespace, seconds: float, settle: float = 20) -> float:
    """Requests per minute of an idle pool, after ``settle`` s: a pod free for 10 s after its last
    operation gets one pod-deletion-cost patch (busy → idle); that is the load's tail, not steady state."""
    time.sleep(settle)
    _, req0 = operator_counters(ns)
    time.sleep(seconds)
    _, req1 = operator_counters(ns)
    return round((req1 - req0) / seconds * 60, 1)


def helm_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-workers", type=int, default=50, help="workers of the start-up figure")
    p.add_argument("--workers", type=int, default=16, help="workers of the throughput figure")
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle-seconds", type=float, default=60)
    p.add_argument(
        "--prefetch-depth",
        type=int,
        default=0,
        help="the WorkerPool's workerPrefetchDepth (0: prefetch off, the default)",
    )
    p.add_argument(
        "--set",
        dest="helm_sets",
        action="append",
        default=[],
        type=helm_value,
        metavar="KEY=VALUE",
        help="a Helm value of the operator's release (repeatable), e.g. operator.operationLog=false",
    )
    args = p.parse_args()
    db_url, pod_db_url = preflight()
    migrate(db_url)
    images = Images.from_env()
    run = uuid.uuid4().hex[:6]
    ns, release, pool = Namespace(f"damops-bench-{run}"), f"damops-bench-{run}", f"bench-{run}"
    proc = install_operator(
        ns,
        release,
        pod_db_url,
        images,
        sets={"operator.resources.requests.cpu": "50m", **dict(args.helm_sets)},
    )
    if proc.returncode != 0:
        sys.exit(f"helm install failed: {proc.stderr.strip()[:2000]}")
    result: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "nodes": len(json.loads(subprocess.check_output(["kubectl", "get", "nodes", "-o", "json"]))["items"]),
        "images": vars(images),
        "prefetch_depth": args.prefetch_depth,
        "helm_sets": [f"{k}={v}" for k, v in args.helm_sets],
    }
    try:
        marks = sorted({m for m in (10, args.max_workers) if m <= args.max_workers})
        result["startup_seconds_to_ready"] = time_to_ready(
            ns, pool, images, args.max_workers, marks, args.prefetch_depth
        )
        result["uptime_after_startup"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(f"start-up: {args.max_workers} workers, seconds to N Ready: {result['startup_seconds_to_ready']}")
        scale(ns, pool, args.workers)
        throughput_round(ns, db_url, pool, min(200, args.ops))  # warm-up
        throughput_round(ns, db_url, pool, max(args.ops // 10, 100))  # warm-up: connections, first claims
        rounds = [throughput_round(ns, db_url, pool, args.ops) for _ in range(args.rounds)]
        for r in rounds:
            print(f"  round: {r}")
        result["throughput_rounds"] = rounds
        rates = [r["ops_per_s"] for r in rounds]
        result["throughput"] = {
            "workers": args.workers,
            "ops_per_s_median": statistics.median(rates),
            "ops_per_s_range": [min(rates), max(rates)],
            "operator_cpu_us_per_op_median": statistics.median(r["operator_cpu_us_per_op"] for r in rounds),
            "operator_cores_per_1000_ops_s_median": statistics.median(
                r["operator_cores_per_1000_ops_s"] for r in rounds
            ),
            "api_requests_per_min_busy_median": statistics.median(r["api_requests_per_min"] for r in rounds),
        }
        result["api_requests_per_min_idle"] = idle_api_rate(ns, args.idle_seconds)
        result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    finally:
        uninstall_operator(ns, release)
    t = result["throughput"]
    print(
        f"through pods, {t['workers']} workers, prefetch depth {args.prefetch_depth or 'off'}: {t['ops_per_s_median']} ops/s (range {t['ops_per_s_range']}); "
        f"operator CPU {t['operator_cpu_us_per_op_median']} µs/op = {t['operator_cores_per_1000_ops_s_median']} "
        f"cores per 1,000 ops/s; API requests/min busy {t['api_requests_per_min_busy_median']}, "
        f"idle {result['api_requests_per_min_idle']}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"k8s-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
