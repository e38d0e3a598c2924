"""``damops run``: the main job on one machine.

Starts the database (embedded unless DATABASE_URL is set), migrates, starts
the scheduler and housekeeping, pre-heats the workers, and runs until Ctrl-C
or SIGTERM (or, with --demo, until the sample batch is done). The first signal
stops claiming and lets active operations finish within SHUTDOWN_GRACE;
unfinished ones go back to NEW. A second one ends the grace period at once.
Signals are honoured in every phase, pre-heating included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from damops import metrics
from damops.config import ConfigError, Settings
from damops.db import migrate
from damops.embedded import resolve_database_url
from damops.housekeeping import Housekeeper
from damops.local import LocalSupervisor
from damops.loop import run as run_loop
from damops.operations import FINAL_STATUSES, NewOperation, enqueue_many
from damops.scheduler import Scheduler

log = logging.getLogger("damops.run")

PREHEAT_TIMEOUT = 60.0


def say(text: str, *, stream: Any = None) -> None:
    """Write a line for the person watching; never fails. `damops run | head -1`
    closes the pipe under us, and a signal handler that raised would leave
    the signal unhandled."""
    try:
        print(text, file=stream or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def describe_database(settings: Settings, url: str) -> str:
    from damops.cli import redacted

    if settings.database_url:
        return f"database {redacted(url)} (DATABASE_URL)"
    return f"embedded PostgreSQL with data in {settings.damops_home}/pgdata (DAMOPS_HOME={settings.damops_home})"


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


BATCH_COUNTS_SQL = "SELECT status, count(*) FROM damops.operations WHERE id = ANY(%s::bigint[]) GROUP BY status"
BATCH_FAILURES_SQL = """
SELECT id, trigger_function, attempts, error FROM damops.operations
WHERE id = ANY(%s::bigint[]) AND status = 'FAILED' ORDER BY id LIMIT 5
"""


def finished_count(counts: dict[str, int]) -> int:
    return sum(counts.get(status, 0) for status in FINAL_STATUSES)


def progress_line(counts: dict[str, int], total: int, free: int, active: int, rate: float | None) -> str:
    """The plain-text progress line (no terminal): the current batch only."""
    done = finished_count(counts)
    eta = f" eta {(total - done) / rate:.0f}s" if rate and done < total else ""
    return (
        f"{done}/{total} SUCCESS {counts.get('SUCCESS', 0)} FAILED {counts.get('FAILED', 0)}"
        f" queued {counts.get('NEW', 0) + counts.get('WAIT', 0)} | workers free {free} active {active}"
        + (f" | {rate:.1f} ops/s{eta}" if rate else "")
    )


async def _batch_counts(conn: psycopg.AsyncConnection, ids: Sequence[int]) -> dict[str, int]:
    cur = await conn.execute(BATCH_COUNTS_SQL, (list(ids),))
    return {status: count for status, count in await cur.fetchall()}


async def _progress(scheduler: Scheduler, url: str, ids: Sequence[int], done: asyncio.Event) -> None:
    """Live progress of the demo batch: a rich progress bar on a terminal, a line every 2 s otherwise."""
    total = len(ids)
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if sys.stdout.isatty():
            await _rich_progress(scheduler, conn, ids, total)
        else:
            while True:
                counts = await _batch_counts(conn, ids)
                finished = finished_count(counts)
                elapsed = time.monotonic() - started
                snap = scheduler.snapshot()
                say(progress_line(counts, total, snap.free, snap.active, finished / elapsed if finished else None))
                if finished >= total:
                    break
                await asyncio.sleep(2.0)
    done.set()


async def _rich_progress(scheduler: Scheduler, conn: psycopg.AsyncConnection, ids: Sequence[int], total: int) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed:.1f} ops/s" if task.speed else "", style="progress.data.speed")

    columns = (
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, refresh_per_second=4) as progress:
        task = progress.add_task("", total=total)
        while True:
            counts = await _batch_counts(conn, ids)
            snap = scheduler.snapshot()
            description = (
                f"ok {counts.get('SUCCESS', 0)} failed {counts.get('FAILED', 0)} "
                f"queued {counts.get('NEW', 0) + counts.get('WAIT', 0)} · workers {snap.free} free {snap.active} busy"
            )
            progress.update(task, completed=finished_count(counts), description=description)
            if finished_count(counts) >= total:
                return
            await asyncio.sleep(0.25)


class Signals:
    """SIGINT/SIGTERM: the first asks to stop, the second to stop now. The
    handler only sets events and writes through :func:`say`: it cannot fail."""

    def __init__(self, grace: float) -> None:
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.grace = grace

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle)

    def handle(self) -> None:
        if self.stop.is_set():
            self.force.set()
            return
        self.stop.set()
        say(
            "stopping: no new operations are claimed; waiting for active ones "
            f"(up to {self.grace:g}s, Ctrl-C again to stop now)"
        )


async def _until_stopped(signals: Signals, work: asyncio.Future[Any]) -> bool:
    """Await ``work`` unless a stop signal comes first; True when it finished."""
    stopper = asyncio.ensure_future(signals.stop.wait())
    done, _ = await asyncio.wait([work, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    return work in done


async def run_async(
    settings: Settings,
    *,
    demo: bool = False,
    demo_count: int = 200,
    exit_when_done: bool = False,
    ui: tuple[str, int] | None = None,
) -> None:
    signals = Signals(settings.shutdown_grace)
    signals.install(asyncio.get_running_loop())  # first: every phase below can be interrupted

    # Starting the embedded server and migrating run in threads so that a
    # signal is handled at once; the thread itself finishes in the background.
    start = asyncio.ensure_future(asyncio.to_thread(resolve_database_url, settings.database_url, settings.damops_home))
    if not await _until_stopped(signals, start):
        return
    url = start.result()
    say(f"damops run: {describe_database(settings, url)}")
    migrating = asyncio.ensure_future(asyncio.to_thread(migrate, url))
    if not await _until_stopped(signals, migrating):
        return
    if isinstance(migrating.exception(), psycopg.OperationalError):
        from damops.cli import redacted

        first = str(migrating.exception()).strip().splitlines() or ["unreachable"]
        # One line naming the database (printed by the CLI, exit code 2), not a traceback.
        raise ConfigError(f"cannot connect to the database at {redacted(url)}: {first[0]}")
    if migrating.result():
        log.info("database migrated: %s", ", ".join(migrating.result()))

    secret = settings.secret or secrets.token_hex(16)
    scheduler = Scheduler(settings, url, secret=secret)
    supervisor = LocalSupervisor(scheduler, settings.worker_count, secret)
    housekeeper = Housekeeper(settings, url)
    if settings.metrics_port:
        served = metrics.serve(settings.metrics_port, scheduler.pool, scheduler.snapshot, settings.metrics_host)
        say(f"damops run: metrics on http://{settings.metrics_host}:{served.port}/metrics")
    await scheduler.start()
    started = time.monotonic()
    await supervisor.start()
    housekeeping = asyncio.create_task(housekeeper.run())
    progress: asyncio.Task[None] | None = None
    batch_ids: list[int] = []
    dashboard = None
    try:
        if ui:  # the dashboard beside the main job, on this loop: it reads the scheduler's own worker states
            from damops.ui.server import start_local

            dashboard = await start_local(settings, url, scheduler, *ui)
            say(f"damops run: dashboard at http://{ui[0]}:{ui[1]}/")
        while (
            scheduler.snapshot().pending and time.monotonic() - started < PREHEAT_TIMEOUT and not signals.stop.is_set()
        ):
            await asyncio.sleep(0.05)
        if not signals.stop.is_set():
            log.info(
                "%d workers pre-heated in %.2fs (pool %r)",
                settings.worker_count,
                time.monotonic() - started,
                scheduler.pool,
            )
            watchers: list[asyncio.Future[Any]] = [asyncio.ensure_future(signals.stop.wait())]
            if demo:
                done = asyncio.Event()
                if "DAMOPS_LOG_LEVEL" not in os.environ:
                    # The progress bar is the demo's screen; a line per operation would bury it.
                    logging.getLogger("damops.operations").setLevel(logging.WARNING)
                with psycopg.connect(url) as conn:
                    batch_ids = enqueue_many(conn, demo_batch(demo_count, scheduler.pool))
                progress = asyncio.create_task(_progress(scheduler, url, batch_ids, done))
                if exit_when_done:
                    watchers.append(asyncio.ensure_future(done.wait()))
            await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
            for watcher in watchers:
                watcher.cancel()
    finally:
        await _shut_down(scheduler, supervisor, housekeeper, housekeeping, signals)
        if dashboard is not None:
            from damops.ui.server import stop_beside

            await stop_beside(*dashboard)
        if progress is not None:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
    if batch_ids:
        _report(url, batch_ids)


async def _shut_down(
    scheduler: Scheduler,
    supervisor: LocalSupervisor,
    housekeeper: Housekeeper,
    housekeeping: asyncio.Task[None],
    signals: Signals,
) -> None:
    grace_task = asyncio.create_task(scheduler.stop())
    force_task = asyncio.create_task(signals.force.wait())
    await asyncio.wait([grace_task, force_task], return_when=asyncio.FIRST_COMPLETED)
    if not grace_task.done():
        grace_task.cancel()
        await asyncio.gather(grace_task, return_exceptions=True)
        await scheduler.stop(grace=0)
    force_task.cancel()
    housekeeper.stop()
    await housekeeping
    await supervisor.stop()


def _report(url: str, ids: Sequence[int]) -> None:
    """The demo batch's outcome: this batch only, not the pool's history."""
    with psycopg.connect(url) as conn:
        counts: dict[str, int] = dict(conn.execute(BATCH_COUNTS_SQL, (list(ids),)).fetchall())
        failed = conn.execute(BATCH_FAILURES_SQL, (list(ids),)).fetchall()
    say("done: " + ", ".join(f"{status} {count}" for status, count in sorted(counts.items())), stream=sys.stdout)
    for op_id, trigger_function, attempts, error in failed:
        say(f"  FAILED #{op_id} {trigger_function} after {attempts} attempt(s): {error}", stream=sys.stdout)


def run(settings: Settings, **kwargs: Any) -> None:
    run_loop(run_async(settings, **kwargs))
