"""WORKER_PREFETCH with real processes: a busy worker's sidecar holds the next operation
and starts it when the running one ends; one operation executes per worker at a time;
a held operation goes back unrun on drain, on cancel and when its worker is lost."""

from __future__ import annotations

import asyncio
import os
import signal

import psycopg

from damops import lifecycle
from damops.operations import NewOperation, enqueue, enqueue_many
from tests.support.engine import row, running_engine, settings, wait_final, wait_until

EXCLUSIVE = "tests.support.exclusive:run"
# Longer than any test here: what is held ahead stays held, however slowly the machine runs
# (except in the test of WORKER_PREFETCH_MAX_WAIT itself).
KEEP_HELD = 600.0


def _enqueue(database_url: str, inputs: dict) -> int:
    with psycopg.connect(database_url) as conn:
        return enqueue(conn, EXCLUSIVE, inputs)


def _held(engine) -> dict[str, int]:
    """worker name -> id of the operation its sidecar holds prefetched."""
    return {w.name: w.next.id for w in engine.scheduler.table.workers.values() if w.next is not None}


async def _one_running_one_held(database_url, engine, tmp_path):
    release = tmp_path / "release"
    first = await asyncio.to_thread(_enqueue, database_url, {"dir": str(tmp_path), "release": str(release)})
    await wait_until(lambda: (tmp_path / f"started-{first}").exists(), 30, "the first operation to start")
    second = await asyncio.to_thread(_enqueue, database_url, {"dir": str(tmp_path), "seconds": 0})
    await wait_until(lambda: second in _held(engine).values(), 30, "the second to be held by the busy sidecar")
    return first, second, release


def test_a_held_operation_starts_when_the_running_one_ends_never_alongside_it(database_url, tmp_path):
    config = settings(worker_count=1, worker_prefetch=True, worker_prefetch_max_wait=KEEP_HELD)

    async def scenario():
        async with running_engine(database_url, config) as engine:
            first, second, release = await _one_running_one_held(database_url, engine, tmp_path)
            assert row(database_url, second)["status"] == "PROCESSING"  # claimed for this worker...
            assert not (tmp_path / f"started-{second}").exists()  # ...but not executing
            assert engine.scheduler.snapshot().active == 1
            release.touch()
            await wait_final(database_url, [first, second])
            return first, second, engine.scheduler.snapshot().stats

    first, second, stats = asyncio.run(scenario())
    a, b = row(database_url, first), row(database_url, second)
    assert a["status"] == b["status"] == "SUCCESS" and a["attempts"] == b["attempts"] == 1
    assert not a["result"]["overlap"] and not b["result"]["overlap"]
    assert a["result"]["pid"] == b["result"]["pid"] and b["result"]["started"] >= a["result"]["ended"]
    assert stats["prefetched"] >= 1


def test_drain_hands_the_held_operation_back_unrun(database_url, tmp_path):
    config = settings(worker_count=1, worker_prefetch=True, worker_prefetch_max_wait=KEEP_HELD)

    async def scenario():
        async with running_engine(database_url, config) as engine:
            first, second, release = await _one_running_one_held(database_url, engine, tmp_path)
            (name,) = _held(engine)
            engine.scheduler.drain_worker(name)
            await wait_until(lambda: row(database_url, second)["status"] == "NEW", 30, "the held one to go back")
            assert row(database_url, second)["attempts"] == 0  # handed back: no attempt used
            assert not (tmp_path / f"started-{second}").exists()
            release.touch()
            await wait_final(database_url, [first])
            return first, second

    first, second = asyncio.run(scenario())
    assert row(database_url, first)["status"] == "SUCCESS"
    assert not (tmp_path / f"started-{second}").exists()  # the drained worker never ran it


def test_a_cancelled_held_operation_ends_cancelled_without_running(database_url, tmp_path):
    config = settings(worker_count=1, worker_prefetch=True, worker_prefetch_max_wait=KEEP_HELD)

    async def scenario():
        async with running_engine(database_url, config) as engine:
            first, second, release = await _one_running_one_held(database_url, engine, tmp_path)
            with psycopg.connect(database_url) as conn:
                lifecycle.cancel(conn, [second])
            await wait_final(database_url, [second], timeout=30)
            assert row(database_url, first)["status"] == "PROCESSING"  # the running one goes on
            release.touch()
            await wait_final(database_url, [first])
            return first, second

    first, second = asyncio.run(scenario())
    assert row(database_url, second)["status"] == "CANCELLED"
    assert not (tmp_path / f"started-{second}").exists()
    assert row(database_url, first)["status"] == "SUCCESS"


def test_a_lost_worker_hands_its_held_operation_back_and_it_runs_once(database_url, tmp_path):
    config = settings(worker_count=1, worker_prefetch=True, worker_prefetch_max_wait=KEEP_HELD)

    async def scenario():
        async with running_engine(database_url, config) as engine:
            first, second, release = await _one_running_one_held(database_url, engine, tmp_path)
            (pid,) = engine.worker_pids()
            os.kill(pid, signal.SIGKILL)
            release.touch()  # the retry of the first ends at once
            await wait_final(database_url, [first, second])
            return first, second

    first, second = asyncio.run(scenario())
    a, b = row(database_url, first), row(database_url, second)
    assert a["status"] == "SUCCESS" and a["attempts"] == 2  # it may have run: an attempt counted
    assert b["status"] == "SUCCESS" and b["attempts"] == 1  # handed back unrun: its one run
    assert not b["result"]["overlap"]


def test_deeper_prefetch_runs_every_operation_once_one_at_a_time_per_worker(database_url, tmp_path):
    """WORKER_PREFETCH_DEPTH 4 with two workers: up to five operations per worker are
    claimed at once, yet each runs once, alone on its worker, and a worker killed
    while it holds several loses none of them."""
    config = settings(worker_count=2, worker_prefetch=True, worker_prefetch_depth=4, worker_prefetch_max_wait=KEEP_HELD)
    release = tmp_path / "release"

    def enqueue_batch(count: int, inputs: dict) -> list[int]:
        with psycopg.connect(database_url) as conn:
            return enqueue_many(conn, [NewOperation(EXCLUSIVE, inputs) for _ in range(count)])

    async def scenario():
        async with running_engine(database_url, config) as engine:
            held = await asyncio.to_thread(enqueue_batch, 10, {"dir": str(tmp_path), "release": str(release)})
            await wait_until(
                lambda: sum(len(w.ahead) for w in engine.scheduler.table.workers.values()) == 8,
                30,
                "each busy worker to hold four ahead",
            )
            assert engine.scheduler.snapshot().active == 2
            # Sent is not yet started: wait for the two to start; none of those held has.
            started = lambda: sum(1 for op_id in held if (tmp_path / f"started-{op_id}").exists())  # noqa: E731
            await wait_until(lambda: started() >= 2, 30, "the two sent to start")
            assert started() == 2
            os.kill(min(engine.worker_pids()), signal.SIGKILL)  # a worker lost with four held
            release.touch()
            quick = await asyncio.to_thread(enqueue_batch, 40, {"dir": str(tmp_path), "seconds": 0})
            await wait_final(database_url, held + quick, timeout=60)
            return held, quick, engine.scheduler.snapshot().stats

    held, quick, stats = asyncio.run(scenario())
    rows = [row(database_url, op_id) for op_id in held + quick]
    assert [r["status"] for r in rows] == ["SUCCESS"] * 50
    assert not any(r["result"]["overlap"] for r in rows)
    runs_by_pid: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        runs_by_pid.setdefault(r["result"]["pid"], []).append((r["result"]["started"], r["result"]["ended"]))
    for runs in runs_by_pid.values():
        runs.sort()
        assert all(later[0] >= earlier[1] for earlier, later in zip(runs, runs[1:])), "two ran at once"
    assert stats["prefetched"] >= 8


def test_an_operation_held_behind_a_long_one_is_handed_back_and_run_by_a_free_worker(database_url, tmp_path):
    """WORKER_PREFETCH_MAX_WAIT: the short operation held behind a long one does not wait
    for it. It is handed back unrun, and the worker that frees up first runs it."""
    config = settings(worker_count=2, worker_prefetch=True, worker_prefetch_max_wait=0.5)
    first_release, long_release = tmp_path / "release-first", tmp_path / "release-long"

    def enqueue_batch(*inputs: dict) -> list[int]:
        with psycopg.connect(database_url) as conn:
            return enqueue_many(conn, [NewOperation(EXCLUSIVE, i) for i in inputs])

    async def scenario():
        async with running_engine(database_url, config) as engine:
            (first,) = await asyncio.to_thread(enqueue_batch, {"dir": str(tmp_path), "release": str(first_release)})
            await wait_until(lambda: (tmp_path / f"started-{first}").exists(), 30, "the first operation to start")
            # One claim: the long one for the free worker, the short one ahead of it.
            long, short = await asyncio.to_thread(
                enqueue_batch, {"dir": str(tmp_path), "release": str(long_release)}, {"dir": str(tmp_path)}
            )
            await wait_until(lambda: _held(engine).get(_running(engine, long)) == short, 30, "short held behind long")
            first_release.touch()
            await wait_final(database_url, [first, short], timeout=30)
            assert row(database_url, long)["status"] == "PROCESSING"  # still running: short did not wait for it
            long_release.touch()
            await wait_final(database_url, [long])
            return first, long, short, engine.scheduler.snapshot().stats

    first, long, short, stats = asyncio.run(scenario())
    a, b, c = row(database_url, first), row(database_url, long), row(database_url, short)
    assert a["status"] == b["status"] == c["status"] == "SUCCESS"
    assert c["attempts"] == 1  # handed back unrun: no attempt used
    assert c["result"]["pid"] == a["result"]["pid"] != b["result"]["pid"]  # run by the worker that freed up
    assert stats["overdue_handed_back"] >= 1


def _running(engine, operation_id: int) -> str | None:
    """The worker running ``operation_id``."""
    return next(
        (w.name for w in engine.scheduler.table.workers.values() if w.lease and w.lease.id == operation_id), None
    )
