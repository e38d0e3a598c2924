"""``damops run``: the main job on one machine.

Starts the database (embedded unless DATABASE_URL is set), migrates, starts
the scheduler and housekeeping, pre-heats the workers, and runs until Ctrl-C
(or, with --demo, until the sample batch is done). The first Ctrl-C stops
claiming and lets active operations finish within SHUTDOWN_GRACE; unfinished
ones go back to NEW. A second Ctrl-C ends the grace period at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import signal
import sys
import time

import psycopg

from damops.config import Settings
from damops.db import migrate
from damops.embedded import resolve_database_url
from damops.housekeeping import Housekeeper
from damops.local import LocalSupervisor
from damops.loop import run as run_loop
from damops.operations import NewOperation, count_by_status, enqueue_many
from damops.scheduler import Scheduler

log = logging.getLogger("damops.run")


def demo_batch(count: int, pool: str) -> list[NewOperation]:
    """A mix of the example trigger functions, failures and waits included."""
    kinds = [
        ("render_rendition", lambda i: {"width": 192, "height": 192, "scale": 4, "seed": i}),
        ("sleep", lambda i: {"seconds": round(random.uniform(0.05, 0.4), 2)}),
        ("noop", lambda i: {}),
        ("flaky", lambda i: {"succeed_on": 2}),
    ]
    ops = []
    for i in range(count):
        name, make_inputs = kinds[i % len(kinds)]
        ops.append(NewOperation(name, make_inputs(i), pool=pool))
    ops.append(NewOperation("fail", {"message": "a demo failure"}, pool=pool, max_attempts=2))
    ops.append(NewOperation("no_such_function", {}, pool=pool))
    return ops


async def _progress(scheduler: Scheduler, url: str, pool: str, total: int, done: asyncio.Event) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT status, count(*) FROM damops.operations WHERE pool = %s GROUP BY status", (pool,)
            )
            counts = dict(await cur.fetchall())
            finished = counts.get("SUCCESS", 0) + counts.get("FAILED", 0)
            snap = scheduler.snapshot()
            width = 30
            filled = int(width * finished / total) if total else width
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} "
                f"SUCCESS {counts.get('SUCCESS', 0)} FAILED {counts.get('FAILED', 0)} "
                f"queued {counts.get('NEW', 0) + counts.get('WAIT', 0)} | workers pending {snap.pending} "
                f"free {snap.free} active {snap.active}"
            )
            print(("\r" if sys.stdout.isatty() else "") + line, end="" if sys.stdout.isatty() else "\n", flush=True)
            if finished >= total:
                print()
                done.set()
                return
            await asyncio.sleep(0.5 if sys.stdout.isatty() else 2.0)


async def run_async(
    settings: Settings, *, demo: bool = False, demo_count: int = 200, exit_when_done: bool = False
) -> None:
    url = resolve_database_url(settings.database_url, settings.damops_home)
    applied = await asyncio.to_thread(migrate, url)
    if applied:
        log.info("database migrated: %s", ", ".join(applied))
    secret = settings.secret or secrets.token_hex(16)
    scheduler = Scheduler(settings, url, secret=secret)
    supervisor = LocalSupervisor(scheduler, settings.worker_count, secret)
    housekeeper = Housekeeper(settings, url)

    stop = asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            force.set()
        else:
            print(
                "\nstopping: no new operations are claimed; waiting for active ones "
                f"(up to {settings.shutdown_grace:g}s, Ctrl-C again to stop now)",
                file=sys.stderr,
            )
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    await scheduler.start()
    started = time.monotonic()
    await supervisor.start()
    housekeeping = asyncio.create_task(housekeeper.run())
    while scheduler.snapshot().pending and time.monotonic() - started < 60:
        await asyncio.sleep(0.05)
    log.info(
        "%d workers pre-heated in %.2fs (pool %r)", settings.worker_count, time.monotonic() - started, scheduler.pool
    )

    watchers: list[asyncio.Task[object]] = [asyncio.create_task(stop.wait())]
    if demo:
        done = asyncio.Event()
        batch = demo_batch(demo_count, scheduler.pool)
        with psycopg.connect(url) as conn:
            before = count_by_status(conn, scheduler.pool)
            enqueue_many(conn, batch)
        already = before["SUCCESS"] + before["FAILED"]
        progress = asyncio.create_task(_progress(scheduler, url, scheduler.pool, already + len(batch), done))
        watchers.append(asyncio.create_task(done.wait()))
        if not exit_when_done:
            watchers.pop()
    await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)

    grace_task = asyncio.create_task(scheduler.stop())
    force_task = asyncio.create_task(force.wait())
    await asyncio.wait([grace_task, force_task], return_when=asyncio.FIRST_COMPLETED)
    if not grace_task.done():
        grace_task.cancel()
        await asyncio.gather(grace_task, return_exceptions=True)
        await scheduler.stop(grace=0)
    force_task.cancel()
    housekeeper.stop()
    await housekeeping
    await supervisor.stop()
    if demo:
        progress.cancel()
        with psycopg.connect(url) as conn:
            counts = count_by_status(conn, scheduler.pool)
        print(f"done: {counts}")
        with psycopg.connect(url) as conn:
            failed = conn.execute(
                "SELECT id, trigger_function, attempts, error FROM damops.operations"
                " WHERE pool = %s AND status = 'FAILED' ORDER BY id DESC LIMIT 5",
                (scheduler.pool,),
            ).fetchall()
        for op_id, trigger_function, attempts, error in failed:
            print(f"  FAILED #{op_id} {trigger_function} after {attempts} attempt(s): {error}")


def run(settings: Settings, **kwargs: object) -> None:
    run_loop(run_async(settings, **kwargs))  # type: ignore[arg-type]
