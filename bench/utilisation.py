"""How well workers are kept busy on operations that take real time (#13).

A pool of W workers (64 by default) gets N = W x k operations of ``d`` seconds
(``bench_triggers:timed_sleep``), all enqueued at once. From each operation's own
start and end (the worker's ``time.time()``):

- *steady-state utilisation*: per worker, operations run x d / (its last end -
  its first start); summed over workers it is achieved throughput / ideal
  (W x 1/d) while the queue is full. Ramp-up (the first claim) and the tail (the
  queue running dry) are left out; they are in the end-to-end figure;
- *end-to-end*: N / (enqueue -> last SUCCESS) against the ideal;
- *dispatch gap*: per worker, next operation's start - previous one's end. It
  includes the StatusUpdate's way to the scheduler, so it is an upper bound of
  "StatusUpdate received -> next operation started";
- *busy*: the share of that same span spent inside the trigger function. The
  steady figure falls short of it by the gaps, and short of 100 % also by the
  runs' overrun (a ``time.sleep(d)`` that wakes late on a busy machine counts
  against the ideal W x 1/d): ``run_ms`` says by how much, and ``ceiling_percent``
  is the steady figure that overrun alone leaves (d / the mean run) with no gap at all.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import psycopg
from damops_suite import DamopsPool, _enqueue_batch
from util import latency_summary, load, prefetch_setting

from damops.db import migrate
from damops.operations import NewOperation

BENCH_DIR = str(Path(__file__).resolve().parent)
TRIGGER = "bench_triggers:timed_sleep"


def workers_see_bench_triggers() -> None:
    """Children get the bench's directory on their path, and may run its trigger
    functions (set before any worker process starts: the zygote keeps the first path)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if BENCH_DIR not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([BENCH_DIR, *parts])
    allowed = [p for p in os.environ.get("DAMOPS_ALLOWED_TRIGGERS", "").split(",") if p]
    if "bench_triggers" not in allowed:
        os.environ["DAMOPS_ALLOWED_TRIGGERS"] = ",".join([*allowed, "bench_triggers"])


def figures(rows: list[tuple[Any, ...]], workers: int, seconds: float, wall: float) -> dict[str, Any]:
    """rows: (status, started, ended, pid) per operation."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for status, started, ended, pid in rows:
        if status == "SUCCESS" and started is not None:
            by_pid.setdefault(int(pid), []).append((float(started), float(ended)))
    rate, busy, spans, gaps, durations = 0.0, 0.0, 0, [], []
    for runs in by_pid.values():
        runs.sort()
        if len(runs) >= 2:
            span = runs[-1][1] - runs[0][0]
            rate += len(runs) / span
            busy += sum(end - start for start, end in runs) / span
            spans += 1
        gaps += [(b[0] - a[1]) * 1000 for a, b in zip(runs, runs[1:])]
        durations += [(end - start) * 1000 for start, end in runs]
    ideal = workers / seconds
    done = sum(len(r) for r in by_pid.values())
    return {
        "ideal_ops_per_s": round(ideal, 1),
        "steady_ops_per_s": round(rate, 1),
        "steady_percent_of_ideal": round(100 * rate / ideal, 2),
        "end_to_end_ops_per_s": round(done / wall, 1),
        "end_to_end_percent_of_ideal": round(100 * done / wall / ideal, 2),
        "workers_used": len(by_pid),
        "busy_percent": round(100 * busy / spans, 2) if spans else None,
        "run_ms": latency_summary(durations),
        "ceiling_percent": round(100 * seconds * 1000 * len(durations) / sum(durations), 2) if durations else None,
        "gap": latency_summary(gaps),
    }


async def run_one(
    url: str, workers: int, seconds: float, per_worker: int, prefetch: int, pool_name: str
) -> dict[str, Any]:
    pool = DamopsPool(url, workers, pool_name, prefetch=prefetch)
    entry: dict[str, Any] = {
        "workers": workers,
        "operation_ms": round(seconds * 1000, 3),
        "operations": workers * per_worker,
        "prefetch": prefetch,
        "load_before": load(),
    }
    try:
        await pool.start()
        entry["preheat_seconds"] = round(pool.preheat_seconds, 2)
        producer = await asyncio.to_thread(psycopg.connect, url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as poller:
            warm = [NewOperation(TRIGGER, {"seconds": 0}, pool=pool_name)] * (2 * workers)
            await asyncio.to_thread(_enqueue_batch, producer, warm)
            await pool.until_finished(pool.finished() + len(warm), 0.02, 120, "warm-up")
            ops = [NewOperation(TRIGGER, {"seconds": seconds}, pool=pool_name)] * (workers * per_worker)
            cpu_before = pool.cpu.snapshot()
            target = pool.finished() + len(ops)
            ids, started, _ = await asyncio.to_thread(_enqueue_batch, producer, ops)
            await pool.until_finished(target, 0.01, 600, f"{len(ops)} operations of {seconds * 1000:g} ms")
            wall = time.perf_counter() - started
            cpu = pool.cpu.delta(cpu_before, pool.cpu.snapshot())
            cur = await poller.execute(
                "SELECT status, (result->>'started')::float8, (result->>'ended')::float8, (result->>'pid')::int"
                " FROM damops.operations WHERE id = ANY(%s)",
                (ids,),
            )
            rows = await cur.fetchall()
        producer.close()
        entry.update(figures(rows, workers, seconds, wall))
        entry["not_success"] = sum(1 for r in rows if r[0] != "SUCCESS")
        from cpu import per_op

        entry["cpu_per_op"] = per_op(cpu, len(ops))
    except Exception as exc:  # noqa: BLE001 - report and keep going
        entry["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await pool.stop()
        entry["load_after"] = load()
    return entry


async def run_utilisation(
    url: str, workers: int, durations_ms: list[float], per_worker: dict[float, int], prefetch: list[int], tag: str
) -> list[dict[str, Any]]:
    """``prefetch``: WORKER_PREFETCH_DEPTH of each run, 0 with WORKER_PREFETCH off."""
    workers_see_bench_triggers()
    await asyncio.to_thread(migrate, url)
    results = []
    for ms in durations_ms:
        for on in prefetch:
            name = f"bench-util-{tag}-{ms:g}ms-{f'prefetch{on}' if on else 'plain'}"
            entry = await run_one(url, workers, ms / 1000, per_worker.get(ms, 10), on, name)
            results.append(entry)
            if "error" in entry:
                print(
                    f"  {workers} workers x {ms:g} ms ops, {prefetch_setting(on)}: ERROR {entry['error']}", flush=True
                )
                continue
            gap = entry["gap"]
            print(
                f"  {workers} workers x {ms:g} ms ops, {prefetch_setting(on)}: "
                f"steady {entry['steady_ops_per_s']:.0f} ops/s = {entry['steady_percent_of_ideal']:.1f}% of "
                f"{entry['ideal_ops_per_s']:.0f}; end to end {entry['end_to_end_percent_of_ideal']:.1f}%; "
                f"gap p50 {gap.get('p50_ms', float('nan')):.2f} ms p99 {gap.get('p99_ms', float('nan')):.2f} ms; "
                f"busy {entry['busy_percent'] or float('nan'):.1f}%, runs of {ms:g} ms took "
                f"{entry['run_ms'].get('mean_ms', float('nan')):.2f} ms on average "
                f"(a ceiling of {entry['ceiling_percent'] or float('nan'):.1f}%) "
                f"(pre-heated in {entry['preheat_seconds']:.1f}s, load {entry['load_before']['loadavg_1m']:.1f})",
                flush=True,
            )
    return results
