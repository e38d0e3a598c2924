"""damops measured end to end: Scheduler + LocalSupervisor in this process, wired as
``damops.runner.run_async`` wires them, workers and sidecars as child processes.

For each worker count:
1. start the scheduler, housekeeping and the supervisor; wait until every worker
   is free (pre-heated); run a small warm-up batch;
2. throughput: enqueue N ``noop`` operations with ``enqueue_many`` in one
   transaction, time from just before the enqueue to the moment the scheduler
   has committed the end of all of them (its counters, read every
   ``poll_interval``), then check in the database that all are SUCCESS;
3. latency: enqueue single ``started_at`` operations one transaction each, with a
   pause between them; latency = result.started_at (worker's clock) minus
   time.time() taken just before the INSERT (same machine clock).

The producers use a blocking psycopg connection in a thread, so the event loop
that runs the scheduler is never blocked by them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import psycopg
from cpu import CpuMeter, brief, per_op, postmaster_pid
from util import Timed, latency_block, load, prefetch_label, throughput_summary, wait_until

from damops.config import Settings
from damops.db import migrate
from damops.housekeeping import Housekeeper
from damops.local import LocalSupervisor
from damops.operations import NewOperation, enqueue_many
from damops.scheduler import Scheduler

log = logging.getLogger("bench.damops")

OUTCOME_SQL = """
SELECT status, count(*) FROM damops.operations
WHERE pool = %(pool)s AND id BETWEEN %(lo)s AND %(hi)s GROUP BY status
"""


def _enqueue_batch(conn: psycopg.Connection, ops: list[NewOperation]) -> tuple[list[int], float, float]:
    started = time.perf_counter()
    with conn.transaction():
        ids = enqueue_many(conn, ops)
    return ids, started, time.perf_counter()


def _produce_singles(conn: psycopg.Connection, pool: str, samples: int, pause: float) -> list[tuple[int, float, float]]:
    """One operation per statement on an autocommit connection, as PGQueuer's producer
    does (peers.py); (id, wall-clock time just before its INSERT, after its COMMIT)."""
    assert conn.autocommit, "one statement, its own transaction: no BEGIN round trip"
    sent = []
    for i in range(samples):
        before = time.time()
        (op_id,) = enqueue_many(conn, [NewOperation("started_at", {"sample": i}, pool=pool)])
        sent.append((op_id, before, time.time()))
        time.sleep(pause)
    return sent


class ExperimentSupervisor(LocalSupervisor):
    """LocalSupervisor whose children get extra environment variables (``--child-env``)."""

    extra_env: dict[str, str] = {}

    def _env(self) -> dict[str, str]:
        return {**super()._env(), **self.extra_env}


def supervisor_class(child_env: dict[str, str]) -> type[LocalSupervisor]:
    if not child_env:
        return LocalSupervisor
    return type("Supervisor", (ExperimentSupervisor,), {"extra_env": dict(child_env)})


class DamopsPool:
    """One pool of pre-heated workers with its scheduler, as ``damops run`` starts them."""

    def __init__(
        self,
        url: str,
        workers: int,
        pool: str,
        child_env: dict[str, str] | None = None,
        prefetch: int = 0,
        prefetch_max_wait: float = 1.0,
    ) -> None:
        self.url = url
        self.workers = workers
        self.pool = pool
        self.secret = secrets.token_hex(16)
        self.settings = Settings(
            database_url=url,
            worker_count=workers,
            pool=pool,
            secret=self.secret,
            worker_prefetch=prefetch > 0,
            worker_prefetch_depth=max(prefetch, 1),
            worker_prefetch_max_wait=prefetch_max_wait,
        )
        self.scheduler = Scheduler(self.settings, url, secret=self.secret)
        self.supervisor = supervisor_class(child_env or {})(self.scheduler, workers, self.secret)
        self.housekeeper = Housekeeper(self.settings, url)
        self._housekeeping: asyncio.Task[None] | None = None
        self.preheat_seconds = 0.0
        self.cpu = CpuMeter(None, [], [])
        self.last_cpu: dict[str, Any] = {}

    def finished(self) -> int:
        """Operations of this pool the scheduler has seen end (counted once their row is committed)."""
        stats = self.scheduler.stats
        return stats.succeeded + stats.failed + stats.cancelled

    async def until_finished(self, count: int, poll_interval: float, timeout: float, what: str) -> None:
        """Wait until ``finished()`` reaches ``count``. Read from the scheduler in this
        process, not by counting rows: a count over the operations table every few
        milliseconds cost PostgreSQL more than the work measured (a parallel seq scan
        of every earlier batch's rows), which peers' cheaper polls did not pay."""

        async def reached() -> bool:
            return self.finished() >= count

        await wait_until(reached, poll_interval, timeout, what)

    async def start(self, timeout: float = 180.0, poll_interval: float = 0.02) -> None:
        await self.scheduler.start()
        started = time.monotonic()
        await self.supervisor.start()
        self._housekeeping = asyncio.create_task(self.housekeeper.run())

        async def all_free() -> bool:
            return self.scheduler.snapshot().free == self.workers

        await wait_until(all_free, poll_interval, timeout, f"{self.workers} workers to be pre-heated")
        self.preheat_seconds = time.monotonic() - started
        with psycopg.connect(self.url) as conn:
            data_directory = str(conn.execute("SHOW data_directory").fetchone()[0])  # type: ignore[index]
        pairs = list(self.supervisor.pairs.values())
        self.cpu = CpuMeter(
            postmaster_pid(data_directory),
            [p.sidecar.pid for p in pairs if p.sidecar is not None],
            [p.worker.pid for p in pairs if p.worker is not None],
        )

    async def stop(self) -> None:
        await self.scheduler.stop(grace=5)
        self.housekeeper.stop()
        if self._housekeeping is not None:
            await self._housekeeping
        await self.supervisor.stop()


async def _xid(conn: psycopg.AsyncConnection) -> int:
    """The next transaction id (consumes one): the difference counts write transactions."""
    cur = await conn.execute("SELECT pg_current_xact_id()::text::bigint")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def run_batch(
    pool: DamopsPool,
    producer: psycopg.Connection,
    poller: psycopg.AsyncConnection,
    n: int,
    poll_interval: float,
    timeout: float = 600.0,
) -> tuple[Timed, dict[str, int]]:
    ops = [NewOperation("noop", {}, pool=pool.pool)] * n
    xid_before = await _xid(poller)
    cpu_before = pool.cpu.snapshot()
    target = pool.finished() + n
    ids, started, inserted = await asyncio.to_thread(_enqueue_batch, producer, ops)
    await pool.until_finished(target, poll_interval, timeout, f"{n} damops operations")
    finished = time.perf_counter()
    cpu = CpuMeter.delta(cpu_before, pool.cpu.snapshot())
    # Write transactions (each commit is a WAL flush with synchronous_commit on), less
    # the producer's one and our two xid probes.
    transactions = await _xid(poller) - xid_before - 3
    cur = await poller.execute(OUTCOME_SQL, {"pool": pool.pool, "lo": min(ids), "hi": max(ids)})
    outcome = {status: int(count) for status, count in await cur.fetchall()}
    pool.last_cpu = {
        "cpu_per_op": per_op(cpu, n),
        "write_transactions": transactions,
        "write_transactions_per_op": round(transactions / n, 3),
    }
    return Timed(n, finished - started, inserted - started), outcome


async def run_latency(
    pool: DamopsPool,
    producer: psycopg.Connection,
    poller: psycopg.AsyncConnection,
    samples: int,
    pause: float,
    poll_interval: float,
) -> dict[str, Any]:
    target = pool.finished() + samples
    sent = await asyncio.to_thread(_produce_singles, producer, pool.pool, samples, pause)
    await pool.until_finished(target, poll_interval, 120, "latency samples")
    cur = await poller.execute(
        "SELECT id, status, (result->>'started_at')::float8, extract(epoch FROM updated)::float8"
        " FROM damops.operations WHERE id = ANY(%s)",
        ([op_id for op_id, _, _ in sent],),
    )
    rows = {row[0]: row[1:] for row in await cur.fetchall()}
    start_ms, done_ms, commit_ms, after_commit_ms, bad = [], [], [], [], 0
    for op_id, before, committed in sent:
        status, started_at, updated = rows.get(op_id, (None, None, None))
        if status != "SUCCESS" or started_at is None:
            bad += 1
            continue
        start_ms.append((started_at - before) * 1000)
        done_ms.append((updated - before) * 1000)
        commit_ms.append((committed - before) * 1000)
        after_commit_ms.append((started_at - committed) * 1000)
    summary = latency_block(
        start_ms, commit_ms, after_commit_ms, done_ms, pause_ms=round(pause * 1000, 1), not_success=bad
    )
    return summary


async def run_damops(
    url: str,
    worker_counts: list[int],
    ops: dict[int, int],
    repeats: int,
    latency_samples: int,
    latency_pause: float,
    poll_interval: float,
    run_tag: str,
    child_env: dict[str, str] | None = None,
    prefetch_workers: list[int] | None = None,
    prefetch_depths: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Each worker count with the default settings, then those of ``prefetch_workers``
    again with WORKER_PREFETCH on, at each of ``prefetch_depths`` (WORKER_PREFETCH_DEPTH)."""
    applied = await asyncio.to_thread(migrate, url)
    log.info("migrated: %s", applied)
    results = []
    producer = await asyncio.to_thread(psycopg.connect, url)
    single_producer = await asyncio.to_thread(psycopg.connect, url, autocommit=True)
    poller = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        configs = [(w, 0) for w in worker_counts]
        configs += [(w, depth) for w in prefetch_workers or [] for depth in prefetch_depths or [1]]
        for workers, prefetch in configs:
            name = f"bench-{run_tag}-{workers}w" + (f"-prefetch{prefetch}" if prefetch else "")
            pool = DamopsPool(url, workers, name, child_env=child_env, prefetch=prefetch)
            label = f"damops {workers:>2} workers" + prefetch_label(prefetch)
            entry: dict[str, Any] = {"system": "damops", "workers": workers, "prefetch": prefetch, "pool": pool.pool}
            if child_env:
                entry["experiment"] = (
                    "children's environment: "
                    + " ".join(f"{k}={v}" for k, v in child_env.items())
                    + " (not how damops runs by default)"
                )
            try:
                entry["load_before"] = load()
                await pool.start()
                entry["preheat_seconds"] = round(pool.preheat_seconds, 2)
                print(f"  {label}: pre-heated in {pool.preheat_seconds:.1f}s", flush=True)
                # Warm-up: every worker resolves both trigger functions once.
                await run_batch(pool, producer, poller, max(4 * workers, 50), poll_interval)
                await run_latency(pool, single_producer, poller, min(workers, 10), latency_pause, poll_interval)
                runs = []
                for _ in range(repeats):
                    timed, outcome = await run_batch(pool, producer, poller, ops[workers], poll_interval)
                    run = timed.as_dict()
                    run["outcome"] = outcome
                    run.update(pool.last_cpu)
                    runs.append(run)
                    print(
                        f"  {label}: {timed.ops} ops in {timed.seconds:.3f}s = "
                        f"{run['ops_per_s']:.0f} ops/s (insert {timed.insert_seconds * 1000:.0f} ms) {outcome}; "
                        f"write transactions/op {run['write_transactions_per_op']}; CPU us/op: {brief(run['cpu_per_op'])}",
                        flush=True,
                    )
                entry["throughput"] = throughput_summary(runs)
                entry["latency"] = await run_latency(
                    pool, single_producer, poller, latency_samples, latency_pause, poll_interval
                )
                lat = entry["latency"]
                print(
                    f"  {label}: enqueue->start p50 {lat['p50_ms']:.2f} ms "
                    f"p99 {lat['p99_ms']:.2f} ms ({lat['samples']} samples)",
                    flush=True,
                )
                entry["scheduler_stats"] = pool.scheduler.snapshot().stats
                restarts = sum(p.restarts for p in pool.supervisor.pairs.values())
                entry["worker_restarts"] = restarts
            except Exception as exc:  # noqa: BLE001 - report and keep going
                log.exception("damops with %d workers failed", workers)
                entry["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                await pool.stop()
                entry["load_after"] = load()
            results.append(entry)
    finally:
        await poller.close()
        producer.close()
        single_producer.close()
    return results
