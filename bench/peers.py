"""The peers, measured the same way on the same server, each in its own database.

PGQueuer 1.6: one QueueManager in this process (its documented way of running),
a no-op async entrypoint, ``qm.run(batch_size=...)``; a batch enqueued with
``Queries.enqueue`` (lists), done when the ``pgqueuer`` table is empty (a job's
row is deleted when its completion is logged). Latency: single jobs enqueued
one transaction each from a producer thread, the entrypoint records time.time()
when it starts. Drivers: psycopg (what damops uses) and asyncpg (the driver of
PGQueuer's own examples) when it is installed.

Procrastinate 3.x: an App with a PsycopgConnector, a no-op async task, a batch
deferred with ``batch_defer_async``, a worker from ``app.run_worker_async``;
done when every job of the batch is ``succeeded``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from util import Timed, as_uri, latency_block, load, throughput_summary, wait_until

log = logging.getLogger("bench.peers")


# --- PGQueuer -----------------------------------------------------------------


def pgqueuer_drivers(wanted: list[str]) -> tuple[list[str], list[str]]:
    """(drivers to run, notes): asyncpg falls back to psycopg when it is not installed."""
    notes = []
    drivers = []
    for kind in wanted:
        if kind == "asyncpg":
            try:
                import asyncpg  # noqa: F401
            except ImportError:
                notes.append("asyncpg is not installed (pip install asyncpg): PGQueuer ran with psycopg instead")
                kind = "psycopg"
        if kind not in drivers:
            drivers.append(kind)
    return drivers, notes


async def _pgqueuer_driver(kind: str, url: str) -> tuple[Any, Callable[[], Any]]:
    """(driver, async close) for one QueueManager."""
    if kind == "asyncpg":
        import asyncpg
        from pgqueuer.db import AsyncpgDriver

        conn = await asyncpg.connect(as_uri(url))
        return AsyncpgDriver(conn), conn.close
    from pgqueuer.db import PsycopgDriver

    aconn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    return PsycopgDriver(aconn), aconn.close


class PgQueuerRun:
    """One QueueManager running in this process with a given driver and batch size."""

    def __init__(self, url: str, driver_kind: str, batch_size: int) -> None:
        self.url = url
        self.driver_kind = driver_kind
        self.batch_size = batch_size
        self.noops = 0
        self.starts: dict[bytes, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._close: Callable[[], Any] | None = None
        self.qm: Any = None

    async def start(self) -> None:
        from pgqueuer import Queries, QueueManager
        from pgqueuer.models import Job

        driver, self._close = await _pgqueuer_driver(self.driver_kind, self.url)
        self.qm = QueueManager(Queries(driver))

        @self.qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            self.noops += 1

        @self.qm.entrypoint("started_at")
        async def started_at(job: Job) -> None:
            self.starts[job.payload or b""] = time.time()

        self._task = asyncio.create_task(self.qm.run(batch_size=self.batch_size))

    async def stop(self) -> None:
        if self.qm is not None:
            self.qm.shutdown.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 30)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._close is not None:
            await self._close()

    def check(self) -> None:
        if self._task is not None and self._task.done():
            exc = self._task.exception()
            raise RuntimeError(f"the PGQueuer QueueManager stopped: {exc!r}")


def _pgq_enqueue(conn: psycopg.Connection, entrypoints: list[str], payloads: list[bytes | None]) -> tuple[float, float]:
    from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    queries = SyncQueries(SyncPsycopgDriver(conn))
    started = time.perf_counter()
    queries.enqueue(entrypoints, payloads, [0] * len(entrypoints))
    return started, time.perf_counter()


def _pgq_singles(conn: psycopg.Connection, samples: int, pause: float) -> list[tuple[bytes, float, float]]:
    from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    queries = SyncQueries(SyncPsycopgDriver(conn))
    sent = []
    for i in range(samples):
        payload = f"s{i}".encode()
        before = time.time()
        queries.enqueue("started_at", payload)
        sent.append((payload, before, time.time()))
        time.sleep(pause)
    return sent


async def _pgq_remaining(poller: psycopg.AsyncConnection) -> int:
    cur = await poller.execute("SELECT count(*) FROM pgqueuer")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def run_pgqueuer(
    url: str,
    drivers: list[str],
    batch_sizes: list[int],
    n: int,
    repeats: int,
    latency_samples: int,
    latency_pause: float,
    poll_interval: float,
) -> list[dict[str, Any]]:
    import pgqueuer
    from pgqueuer import Queries

    setup = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        from pgqueuer.db import PsycopgDriver

        await Queries(PsycopgDriver(setup)).install()
    finally:
        await setup.close()

    results = []
    producer = await asyncio.to_thread(psycopg.connect, url, autocommit=True)
    poller = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        kinds, notes = pgqueuer_drivers(drivers)
        for note in notes:
            print(f"  pgqueuer: {note}", flush=True)
        for driver_kind in kinds:
            for batch_size in batch_sizes:
                entry: dict[str, Any] = {
                    "system": "pgqueuer",
                    "version": pgqueuer.__version__,
                    "driver": driver_kind,
                    "batch_size": batch_size,
                    "load_before": load(),
                }
                if notes:
                    entry["notes"] = notes
                qrun = PgQueuerRun(url, driver_kind, batch_size)
                label = f"pgqueuer {driver_kind} batch {batch_size}"
                try:
                    await qrun.start()

                    async def empty() -> bool:
                        qrun.check()
                        return await _pgq_remaining(poller) == 0

                    # Warm-up, which also proves the QueueManager is listening.
                    warm = max(2 * batch_size, 50)
                    await asyncio.to_thread(_pgq_enqueue, producer, ["noop"] * warm, [None] * warm)
                    await wait_until(empty, poll_interval, 60, f"{label} warm-up")
                    runs = []
                    for _ in range(repeats):
                        done_before = qrun.noops
                        started, inserted = await asyncio.to_thread(_pgq_enqueue, producer, ["noop"] * n, [None] * n)
                        await wait_until(empty, poll_interval, 600, f"{label}: {n} jobs")
                        timed = Timed(n, time.perf_counter() - started, inserted - started)
                        run = timed.as_dict()
                        run["executed"] = qrun.noops - done_before
                        runs.append(run)
                        print(
                            f"  {label}: {n} jobs in {timed.seconds:.3f}s = {run['ops_per_s']:.0f} jobs/s "
                            f"(insert {timed.insert_seconds * 1000:.0f} ms)",
                            flush=True,
                        )
                    entry["throughput"] = throughput_summary(runs)
                    if latency_samples:
                        sent = await asyncio.to_thread(_pgq_singles, producer, latency_samples, latency_pause)
                        await wait_until(empty, poll_interval, 60, f"{label} latency samples")
                        lat = [(qrun.starts[p] - before) * 1000 for p, before, _ in sent if p in qrun.starts]
                        commit = [(c - before) * 1000 for p, before, c in sent if p in qrun.starts]
                        after = [(qrun.starts[p] - c) * 1000 for p, _, c in sent if p in qrun.starts]
                        entry["latency"] = latency_block(
                            lat, commit, after, pause_ms=round(latency_pause * 1000, 1), missing=len(sent) - len(lat)
                        )
                        s = entry["latency"]
                        print(
                            f"  {label}: enqueue->start p50 {s['p50_ms']:.2f} ms p99 {s['p99_ms']:.2f} ms", flush=True
                        )
                        qrun.starts.clear()
                except Exception as exc:  # noqa: BLE001 - report and keep going
                    log.exception("%s failed", label)
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"  {label}: FAILED: {entry['error']}", flush=True)
                finally:
                    await qrun.stop()
                    entry["load_after"] = load()
                results.append(entry)
    finally:
        await poller.close()
        producer.close()
    return results


# --- Procrastinate --------------------------------------------------------------


async def run_procrastinate(
    url: str, concurrencies: list[int], n: int, repeats: int, poll_interval: float
) -> list[dict[str, Any]]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    results = []
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        poller = await psycopg.AsyncConnection.connect(url, autocommit=True)
        try:
            for concurrency in concurrencies:
                entry: dict[str, Any] = {
                    "system": "procrastinate",
                    "version": procrastinate.__version__,
                    "concurrency": concurrency,
                    "load_before": load(),
                }
                label = f"procrastinate concurrency {concurrency}"
                worker = asyncio.create_task(
                    app.run_worker_async(concurrency=concurrency, install_signal_handlers=False, wait=True)
                )
                try:

                    async def finished(lo: int, hi: int, count: int) -> bool:
                        if worker.done():
                            raise RuntimeError(f"the Procrastinate worker stopped: {worker.exception()!r}")
                        cur = await poller.execute(
                            "SELECT count(*) FROM procrastinate_jobs WHERE id BETWEEN %s AND %s"
                            " AND status IN ('succeeded', 'failed', 'aborted')",
                            (lo, hi),
                        )
                        row = await cur.fetchone()
                        return bool(row) and int(row[0]) >= count

                    ids = await noop.batch_defer_async(*[{} for _ in range(20)])
                    await wait_until(
                        lambda: finished(min(ids), max(ids), len(ids)), poll_interval, 60, f"{label} warm-up"
                    )
                    runs = []
                    for _ in range(repeats):
                        started = time.perf_counter()
                        ids = await noop.batch_defer_async(*[{} for _ in range(n)])
                        inserted = time.perf_counter()
                        await wait_until(
                            lambda: finished(min(ids), max(ids), n), poll_interval, 600, f"{label}: {n} jobs"
                        )
                        timed = Timed(n, time.perf_counter() - started, inserted - started)
                        cur = await poller.execute(
                            "SELECT status::text, count(*) FROM procrastinate_jobs WHERE id BETWEEN %s AND %s"
                            " GROUP BY status",
                            (min(ids), max(ids)),
                        )
                        run = timed.as_dict()
                        run["outcome"] = {s: int(c) for s, c in await cur.fetchall()}
                        runs.append(run)
                        print(
                            f"  {label}: {n} jobs in {timed.seconds:.3f}s = {run['ops_per_s']:.0f} jobs/s "
                            f"(insert {timed.insert_seconds * 1000:.0f} ms)",
                            flush=True,
                        )
                    entry["throughput"] = throughput_summary(runs)
                except Exception as exc:  # noqa: BLE001 - report and keep going
                    log.exception("%s failed", label)
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"  {label}: FAILED: {entry['error']}", flush=True)
                finally:
                    worker.cancel()
                    await asyncio.gather(worker, return_exceptions=True)
                    entry["load_after"] = load()
                results.append(entry)
        finally:
            await poller.close()
    return results


def unavailable(system: str, exc: BaseException) -> dict[str, Any]:
    return {"system": system, "error": f"could not run: {type(exc).__name__}: {exc}"}


async def run_peer_safely(system: str, coro: Any) -> list[dict[str, Any]]:
    try:
        return await coro
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        log.exception("%s could not run", system)
        print(f"  {system}: could not run: {type(exc).__name__}: {exc}", flush=True)
        return [unavailable(system, exc)]
