"""Seed glossary: Pre-heating, Pending/Free/Active workers, StatusUpdate, Scheduler heartbeat."""

from __future__ import annotations

import asyncio

import psycopg

from damops.operations import NewOperation, enqueue
from tests.support import blocking
from tests.support.engine import (
    enqueue_in_thread,
    enqueue_many_in_thread,
    fetch_row,
    listener_backend,
    row,
    running_engine,
    settings,
    wait_final,
    wait_until,
    wait_until_db,
)


def test_pre_heating_same_worker_processes_serve_many_operations(database_url):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=2)) as engine:
            # Workers are up and free before any operation exists.
            assert engine.scheduler.snapshot().free == 2
            pids_before = engine.worker_pids()
            ids = await enqueue_many_in_thread(
                database_url, [NewOperation("tests.support.triggers:pid") for _ in range(40)]
            )
            await wait_final(database_url, ids)
            assert engine.worker_pids() == pids_before
            return pids_before, ids

    pids, ids = asyncio.run(scenario())
    with psycopg.connect(database_url) as conn:
        used = {
            r[0] for r in conn.execute("SELECT (result->>'pid')::int FROM damops.operations WHERE id = ANY(%s)", (ids,))
        }
    # 40 operations, only the 2 pre-heated processes ran them.
    assert used <= pids and len(used) >= 1


def test_worker_states_pending_free_active_free(database_url, tmp_path):
    async def scenario():
        config = settings(worker_count=1)
        async with running_engine(database_url, config, wait_ready=False) as engine:
            seen = [engine.scheduler.snapshot().workers[0].state]
            assert seen == ["pending"]
            await wait_until(lambda: engine.scheduler.snapshot().free == 1, 30, "the worker to be free")
            # The operation runs until the test releases it: "still PROCESSING"
            # below cannot race its end, however slow the machine.
            release = tmp_path / "release"
            op_id = await enqueue_in_thread(
                database_url, "tests.support.blocking:hold", {"started_dir": str(tmp_path), "release": str(release)}
            )
            await wait_until(lambda: engine.scheduler.snapshot().active == 1, 10, "the worker to be active")
            view = engine.scheduler.snapshot().workers[0]
            assert view.operation_id == op_id
            held = await fetch_row(database_url, op_id)
            assert held["status"] == "PROCESSING"
            assert held["worker"] == view.name
            blocking.release(release)
            await wait_final(database_url, [op_id])
            await wait_until(lambda: engine.scheduler.snapshot().free == 1, 10, "the worker to be free again")
            assert engine.scheduler.snapshot().workers[0].operation_id is None
            return op_id

    op_id = asyncio.run(scenario())
    assert row(database_url, op_id)["status"] == "SUCCESS"


def test_status_updates_record_result_and_error(database_url):
    async def scenario():
        async with running_engine(database_url):
            with psycopg.connect(database_url) as conn:
                ok = enqueue(conn, "render_rendition", {"width": 64, "height": 64, "scale": 4})
                bad = enqueue(conn, "fail", {"message": "boom"}, max_attempts=1)
            await wait_final(database_url, [ok, bad])
            return ok, bad

    ok, bad = asyncio.run(scenario())
    success = row(database_url, ok)
    assert success["status"] == "SUCCESS"
    assert success["result"]["width"] == 16 and len(success["result"]["sha256"]) == 64
    assert success["worker"] is None and success["attempts"] == 1
    failure = row(database_url, bad)
    assert failure["status"] == "FAILED"
    assert failure["error"] == "RuntimeError: boom"


def test_notify_wakes_the_scheduler_long_before_its_heartbeat(database_url):
    async def scenario():
        # A 60 s heartbeat: only a wake-up can get these operations started in time.
        async with running_engine(database_url, settings(scheduler_heartbeat=60)) as engine:
            listener = await wait_until_db(lambda: listener_backend(database_url), 30, "the scheduler to LISTEN")
            # On connecting, the listener wakes the scheduler once by itself (to
            # catch inserts it missed); a first operation may use that wake-up.
            first = await enqueue_in_thread(database_url, "noop")
            await wait_final(database_url, [first], timeout=10)
            # The scheduler is idle now: nothing but the NOTIFY of this insert can wake it.
            second = await enqueue_in_thread(database_url, "noop")
            await wait_final(database_url, [second], timeout=10)
            # The same LISTEN session throughout: no reconnect's wake-up explains it.
            assert await asyncio.to_thread(listener_backend, database_url) == listener
            return engine.scheduler.stats.claimed

    assert asyncio.run(scenario()) == 2


def test_priority_lower_runs_first(database_url):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)) as engine:
            engine.scheduler.claiming = False
            with psycopg.connect(database_url) as conn:
                low = enqueue(conn, "noop", priority=5)
                high = enqueue(conn, "noop", priority=-5)
            engine.scheduler.claiming = True
            await wait_final(database_url, [low, high])
            return low, high

    low, high = asyncio.run(scenario())
    assert row(database_url, high)["updated"] < row(database_url, low)["updated"]


def test_preloaded_trigger_functions_are_imported_before_ready(tmp_path):
    """DAMOPS_PRELOAD imports trigger functions at start; unknown names are only logged."""
    import sys as _sys

    from damops.worker import WorkerRuntime

    runtime = WorkerRuntime(str(tmp_path / "none.sock"), "s")
    runtime.preload(["render_rendition", "tests.support.triggers:pid", "no_such_function"])
    assert set(runtime._resolved) == {"render_rendition", "tests.support.triggers:pid"}
    assert "tests.support.triggers" in _sys.modules
