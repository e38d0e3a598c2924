"""Short operations queued with long ones: what prefetch costs them, and what
WORKER_PREFETCH_MAX_WAIT gives back.

A pool of W workers (16) gets, in one enqueue, L long operations (4 x 3 s) and
then S short ones (200 x 10 ms), all ``bench_triggers:timed_sleep``. With
prefetch at depth 4 the one claim puts short operations ahead of the workers
that run a long one too; without a max wait they start only when the long one
ends. Figures, per setting, from each short operation's start (the worker's
clock) and the producer's clock just before the INSERT:

- *wait*: enqueue -> start of the short operations, p50 / p99 / max;
- *done*: enqueue -> the last short operation's end (they are 200 x 10 ms over
  12 or more free workers: about 0.2 s of work);
- *handed back*: held operations withdrawn from behind an overdue one.

Settings: prefetch off; depth 4 with the max wait effectively off (1 hour); depth
4 with the default max wait (1 s).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from damops_suite import DamopsPool, _enqueue_batch
from util import latency_summary, load
from utilisation import TRIGGER, workers_see_bench_triggers

from damops.db import migrate
from damops.operations import NewOperation

LONG_SECONDS, SHORT_SECONDS = 3.0, 0.01
SETTINGS = [("prefetch off", 0, 1.0), ("depth 4, no max wait", 4, 3600.0), ("depth 4, max wait 1s", 4, 1.0)]


async def run_one(url: str, workers: int, longs: int, shorts: int, label: str, depth: int, max_wait: float, name: str):
    pool = DamopsPool(url, workers, name, prefetch=depth, prefetch_max_wait=max_wait)
    entry: dict[str, Any] = {"setting": label, "workers": workers, "prefetch": depth, "max_wait_s": max_wait}
    entry |= {"long": longs, "long_s": LONG_SECONDS, "short": shorts, "short_s": SHORT_SECONDS, "load_before": load()}
    try:
        await pool.start()
        producer = await asyncio.to_thread(psycopg.connect, url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as poller:
            ops = [NewOperation(TRIGGER, {"seconds": LONG_SECONDS}, pool=name)] * longs
            ops += [NewOperation(TRIGGER, {"seconds": SHORT_SECONDS}, pool=name)] * shorts
            target = pool.finished() + len(ops)
            before = time.time()
            ids, _, _ = await asyncio.to_thread(_enqueue_batch, producer, ops)
            await pool.until_finished(target, 0.01, 120, f"{len(ops)} mixed operations")
            cur = await poller.execute(
                "SELECT status, (result->>'started')::float8, (result->>'ended')::float8 FROM damops.operations"
                " WHERE id = ANY(%s) ORDER BY id",
                (ids[longs:],),
            )
            rows = await cur.fetchall()
        producer.close()
        waits = [(started - before) * 1000 for status, started, _ in rows if status == "SUCCESS"]
        entry["wait"] = latency_summary(waits)
        entry["short_done_s"] = round(max(ended for _, _, ended in rows) - before, 3)
        entry["not_success"] = sum(1 for r in rows if r[0] != "SUCCESS")
        entry["handed_back"] = pool.scheduler.stats.overdue_handed_back
    except Exception as exc:  # noqa: BLE001 - report and keep going
        entry["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await pool.stop()
    return entry


async def run_head_of_line(url: str, workers: int, tag: str, longs: int = 4, shorts: int = 200) -> list[dict[str, Any]]:
    workers_see_bench_triggers()
    await asyncio.to_thread(migrate, url)
    results = []
    for index, (label, depth, max_wait) in enumerate(SETTINGS):
        entry = await run_one(url, workers, longs, shorts, label, depth, max_wait, f"bench-hol-{tag}-{index}")
        results.append(entry)
        if "error" in entry:
            print(f"  {label}: ERROR {entry['error']}", flush=True)
            continue
        wait = entry["wait"]
        print(
            f"  {workers} workers, {longs} x {LONG_SECONDS:g} s then {shorts} x {SHORT_SECONDS * 1000:g} ms, {label}: "
            f"short ones wait p50 {wait.get('p50_ms', float('nan')):.0f} ms p99 {wait.get('p99_ms', float('nan')):.0f}"
            f" ms max {wait.get('max_ms', float('nan')):.0f} ms; all short ones done after {entry['short_done_s']:.2f}"
            f" s; handed back {entry['handed_back']}",
            flush=True,
        )
    return results
