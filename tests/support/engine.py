"""Run the real engine (scheduler, local sidecar+worker processes, housekeeping)
inside a test's event loop, and wait on the database for outcomes.

The scheduler shares the test's event loop, so nothing here blocks it: every
database read made while waiting runs in a thread (``wait_until_db``,
``fetch_row``, ``wait_final``). A blocking connect on the loop would stall the
scheduler's heartbeats and dispatch, the very timing the tests check."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Iterable

import psycopg

from damops.config import Settings
from damops.housekeeping import Housekeeper
from damops.local import LocalSupervisor
from damops.operations import NewOperation, enqueue, enqueue_many
from damops.scheduler import Scheduler

SECRET = "test-secret"
# The channel the schema's insert trigger notifies (migrations/0001_operations.sql).
NOTIFY_CHANNEL = "damops_operations"


def settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "worker_count": 2,
        "scheduler_heartbeat": 0.2,
        "housekeeping_interval": 0.2,
        "shutdown_grace": 5.0,
        "secret": SECRET,
        # Retries come back at once in tests that are not about the backoff.
        "retry_backoff_base": 0.05,
    }
    base.update(overrides)
    return Settings(**base)


class Engine:
    def __init__(self, scheduler: Scheduler, supervisor: LocalSupervisor, housekeeper: Housekeeper | None):
        self.scheduler = scheduler
        self.supervisor = supervisor
        self.housekeeper = housekeeper

    def worker_pids(self) -> set[int]:
        return {pair.worker.pid for pair in self.supervisor.pairs.values() if pair.worker}


@contextlib.asynccontextmanager
async def running_engine(
    database_url: str, config: Settings | None = None, *, housekeeping: bool = True, wait_ready: bool = True
) -> AsyncIterator[Engine]:
    config = config or settings()
    scheduler = Scheduler(config, database_url, secret=SECRET)
    supervisor = LocalSupervisor(scheduler, config.worker_count, SECRET, name_prefix=f"t{id(scheduler) % 10000}")
    housekeeper = Housekeeper(config, database_url) if housekeeping else None
    await scheduler.start()
    await supervisor.start()
    hk_task = asyncio.create_task(housekeeper.run()) if housekeeper else None
    engine = Engine(scheduler, supervisor, housekeeper)
    try:
        if wait_ready:
            await wait_until(lambda: scheduler.snapshot().free == config.worker_count, 30, "workers to be free")
        yield engine
    finally:
        await scheduler.stop()
        if housekeeper:
            housekeeper.stop()
            await hk_task
        await supervisor.stop()


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` (plain or returning an awaitable) on the event loop
    until it returns something true, which is returned. For predicates that
    read the scheduler's state; use :func:`wait_until_db` for the database."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_until_db(predicate, timeout: float, what: str, interval: float = 0.05):
    """Like :func:`wait_until`, but the (blocking) predicate runs in a thread."""
    return await wait_until(lambda: asyncio.to_thread(predicate), timeout, what, interval)


def statuses(database_url: str, ids: Iterable[int]) -> dict[int, str]:
    with psycopg.connect(database_url) as conn:
        return dict(conn.execute("SELECT id, status FROM damops.operations WHERE id = ANY(%s)", (list(ids),)))


async def wait_final(database_url: str, ids: list[int], timeout: float = 60) -> dict[int, str]:
    """Wait until every operation in ids is final (SUCCESS, FAILED or CANCELLED); return their statuses."""

    def check():
        found = statuses(database_url, ids)
        final = all(s in ("SUCCESS", "FAILED", "CANCELLED") for s in found.values())
        return found if final and len(found) == len(ids) else None

    return await wait_until_db(check, timeout, f"{len(ids)} operations to reach a final state", interval=0.1)


def row(database_url: str, op_id: int) -> dict:
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("SELECT * FROM damops.operations WHERE id = %s", (op_id,))
        names = [d.name for d in cur.description]
        return dict(zip(names, cur.fetchone()))


async def fetch_row(database_url: str, op_id: int) -> dict:
    """:func:`row` from a coroutine that shares the scheduler's loop."""
    return await asyncio.to_thread(row, database_url, op_id)


async def enqueue_in_thread(database_url: str, *args, **kwargs) -> int:
    """damops.operations.enqueue in its own committed transaction, off the loop."""

    def run() -> int:
        with psycopg.connect(database_url) as conn:
            return enqueue(conn, *args, **kwargs)

    return await asyncio.to_thread(run)


async def enqueue_many_in_thread(database_url: str, operations: list[NewOperation]) -> list[int]:
    def run() -> list[int]:
        with psycopg.connect(database_url) as conn:
            return enqueue_many(conn, operations)

    return await asyncio.to_thread(run)


def listener_backend(database_url: str) -> tuple[int, object] | None:
    """(pid, backend_start) of a session of this database whose last statement
    was a LISTEN on the operations channel and has completed: the scheduler's
    listener is subscribed. None while there is none."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT pid, backend_start FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND state = 'idle' AND query ILIKE %s",
            (f"LISTEN {NOTIFY_CHANNEL}%",),
        ).fetchall()
    return found[0] if len(found) == 1 else None
