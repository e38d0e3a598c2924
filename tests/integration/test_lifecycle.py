"""The operation lifecycle at the SQL level: backoff, history, MAX_ATTEMPTS,
scheduled and unique operations, cancel (and its races), retry, retention."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from damops import lifecycle, store
from damops.backoff import RetryPolicy, backoff_delay, retry_delay
from damops.housekeeping import recover_expired_operations, retain_finished_operations
from damops.operations import NewOperation, attempts, enqueue, enqueue_many, get
from damops.protocol import StatusUpdate

FAST = RetryPolicy(base=10.0, max=100.0, jitter=0.0)


def claim(conn, workers=("w1",), pool="default", wait_interval=30.0):
    rows = conn.execute(store.CLAIM_SQL, store.claim_params(pool, list(workers), wait_interval)).fetchall()
    return [store.lease_from_claim(r) for r in rows]


def complete(conn, claimed, outcome="failure", *, policy=FAST, default_max_attempts=3, **fields):
    update = StatusUpdate(id=claimed.id, attempt=claimed.attempt, outcome=outcome, **fields)
    params = store.complete_params(
        [store.Completion(update, claimed.worker)], policy=policy, default_max_attempts=default_max_attempts
    )
    return store.completed_rows(conn.execute(store.COMPLETE_SQL, params).fetchall())


def column(conn, op_id, name):
    return conn.execute(f"SELECT {name} FROM damops.operations WHERE id = %s", (op_id,)).fetchone()[0]


def make_claimable(conn, op_id):
    conn.execute("UPDATE damops.operations SET run_after = now() - interval '1 second' WHERE id = %s", (op_id,))


# --- backoff ---------------------------------------------------------------


def test_backoff_grows_exponentially_is_capped_and_jittered():
    policy = RetryPolicy(base=30.0, max=1800.0, jitter=0.0)
    assert [backoff_delay(a, policy) for a in (1, 2, 3, 4)] == [30.0, 60.0, 120.0, 240.0]
    assert backoff_delay(50, policy) == 1800.0
    assert backoff_delay(10**6, policy) == 1800.0  # no overflow
    jittered = RetryPolicy(base=30.0, max=1800.0, jitter=0.2)
    rng = random.Random(1)
    samples = [backoff_delay(2, jittered, rng) for _ in range(500)]
    assert 48.0 <= min(samples) < 52.0 and 68.0 < max(samples) <= 72.0
    assert all(backoff_delay(20, jittered, rng) <= 1800.0 for _ in range(100))


def test_a_trigger_functions_own_delay_wins_over_the_policy():
    assert retry_delay(1, 7.5, FAST) == 7.5
    assert retry_delay(1, None, FAST) == 10.0
    assert retry_delay(3, float("nan"), FAST) == 40.0
    assert retry_delay(1, -1, FAST) == 10.0


# --- COMPLETE_SQL: backoff, history, MAX_ATTEMPTS -------------------------------


def test_one_cycle_writes_failures_whose_delays_come_from_a_policy_given_in_ints(conn):
    # The arrays travel in binary, where psycopg refuses a list mixing int and float.
    ops = [enqueue(conn, "noop") for _ in range(2)]
    conn.execute("UPDATE damops.operations SET attempts = 3, max_attempts = 10 WHERE id = ANY(%s)", (ops,))
    claimed = claim(conn, workers=("w1", "w2"))
    policy = RetryPolicy(base=1, max=5, jitter=0)  # attempt 4: min(5, 1 * 2**3) is the int cap
    updates = [
        StatusUpdate.failure(claimed[0].id, claimed[0].attempt, "E1"),
        StatusUpdate.failure(claimed[1].id, claimed[1].attempt, "E2", retry_after=2.5),
    ]
    params = store.complete_params([store.Completion(u, c.worker) for u, c in zip(updates, claimed)], policy=policy)
    assert all(type(delay) is float for delay in params["delays"])
    done = store.completed_rows(conn.execute(store.COMPLETE_SQL, params).fetchall())
    assert sorted((d.id, d.status) for d in done) == [(ops[0], "NEW"), (ops[1], "NEW")]
    assert backoff_delay(10, policy) == 5.0 and type(backoff_delay(10, policy)) is float


def test_retryable_failure_goes_back_with_a_not_before_time_and_is_not_claimed_early(conn):
    op_id = enqueue(conn, "noop")
    [first] = claim(conn)
    [done] = complete(conn, first, error="RuntimeError: timeout", traceback="Traceback ...\nRuntimeError: timeout")
    assert (done.id, done.status, done.trigger_function, done.attempts) == (op_id, "NEW", "noop", 1)
    assert done.duration is not None and 0 <= done.duration < 5
    delay = conn.execute(
        "SELECT extract(epoch FROM run_after - updated) FROM damops.operations WHERE id = %s", (op_id,)
    ).fetchone()[0]
    assert float(delay) == pytest.approx(10.0, abs=0.01)  # FAST.base for attempt 1
    assert done.describe().startswith(f"operation {op_id} noop: NEW (attempt 1) in ") and not done.final
    assert claim(conn) == []  # not before its time
    make_claimable(conn, op_id)
    [second] = claim(conn)
    assert second.attempt == 2
    [history] = attempts(conn, op_id)
    assert (history.attempt, history.worker, history.outcome, history.status) == (1, "w1", "failure", "NEW")
    assert history.traceback.endswith("RuntimeError: timeout") and history.started <= history.finished


def test_retry_after_from_the_trigger_function_sets_the_delay(conn):
    op_id = enqueue(conn, "noop")
    [held] = claim(conn)
    complete(conn, held, error="Retry: later", retry_after=42.0)
    delay = conn.execute(
        "SELECT extract(epoch FROM run_after - updated) FROM damops.operations WHERE id = %s", (op_id,)
    ).fetchone()[0]
    assert float(delay) == pytest.approx(42.0, abs=0.01)


def test_every_attempt_is_kept_with_its_error_worker_and_times(conn):
    op_id = enqueue(conn, "noop", max_attempts=3)
    for attempt in (1, 2, 3):
        [held] = claim(conn, [f"w{attempt}"])
        complete(conn, held, error=f"E{attempt}", traceback="x" * 50_000)
        make_claimable(conn, op_id)
    row = get(conn, op_id)
    assert row.status == "FAILED" and row.error == "E3" and row.worker is None and row.last_worker == "w3"
    assert row.started is not None and row.finished is not None and row.finished >= row.started
    history = attempts(conn, op_id)
    assert [(h.attempt, h.worker, h.error, h.status) for h in history] == [
        (1, "w1", "E1", "NEW"),
        (2, "w2", "E2", "NEW"),
        (3, "w3", "E3", "FAILED"),
    ]
    assert all(len(h.traceback) <= store.MAX_TRACEBACK_CHARS for h in history)
    assert history[0].traceback.startswith("[... truncated ...]")


def test_a_huge_error_message_is_bounded(conn):
    op_id = enqueue(conn, "noop", max_attempts=1)
    [held] = claim(conn)
    complete(conn, held, error="disk full: " + "x" * 100_000)
    error = column(conn, op_id, "error")
    assert error.startswith("disk full: ") and len(error) <= store.MAX_ERROR_CHARS


def test_max_attempts_setting_is_the_default_and_takes_effect_when_changed(conn):
    default = enqueue(conn, "noop")  # max_attempts NULL: whatever MAX_ATTEMPTS is when it fails
    own = enqueue(conn, "noop", max_attempts=1)
    assert column(conn, default, "max_attempts") is None
    for held in claim(conn, ["a", "b"]):
        complete(conn, held, default_max_attempts=2)
    assert column(conn, own, "status") == "FAILED"
    assert column(conn, default, "status") == "NEW"
    make_claimable(conn, default)
    [held] = claim(conn)
    [done] = complete(conn, held, default_max_attempts=2)
    assert done.status == "FAILED" and done.attempts == 2
    # Raising the setting later lets a retried operation go further.
    lifecycle.retry(conn, [default])
    for _attempt in (1, 2, 3, 4):
        [held] = claim(conn)
        [done] = complete(conn, held, default_max_attempts=5)
        make_claimable(conn, default)
    assert done.status == "NEW" and done.attempts == 4


def test_expired_operations_use_the_max_attempts_setting_and_keep_history(conn):
    op_id = enqueue(conn, "noop")
    [held] = claim(conn)
    conn.execute("UPDATE damops.operations SET updated = now() - interval '1 hour' WHERE id = %s", (op_id,))
    assert recover_expired_operations(conn, 60, default_max_attempts=1) == {op_id: "FAILED"}
    [history] = attempts(conn, op_id)
    assert history.outcome == "expired" and history.worker == held.worker and "expired" in history.error
    assert column(conn, op_id, "finished") is not None


def test_progress_message_and_fraction_are_stored(conn):
    op_id = enqueue(conn, "noop")
    claim(conn)
    conn.execute(store.TOUCH_SQL, store.touch_params({op_id: ("decoding", 0.25)}))
    conn.execute(store.TOUCH_SQL, store.touch_params({op_id: (None, 0.5)}))  # keeps the message
    assert (column(conn, op_id, "progress_message"), column(conn, op_id, "progress_fraction")) == ("decoding", 0.5)
    conn.execute(store.TOUCH_SQL, store.touch_params({op_id: ("x" * 5000, float("nan"))}))
    assert len(column(conn, op_id, "progress_message")) == store.MAX_PROGRESS_MESSAGE_CHARS
    conn.execute(store.TOUCH_SQL, store.touch_params({op_id}))  # a plain touch
    assert column(conn, op_id, "progress_fraction") == 0.5


# --- scheduled operations ----------------------------------------------------


def test_scheduled_operation_is_not_claimed_before_its_time(conn):
    later = enqueue(conn, "noop", delay=timedelta(hours=1))
    at = enqueue(conn, "noop", run_after=datetime.now(UTC) + timedelta(hours=1))
    naive = enqueue(conn, "noop", run_after=datetime.utcnow() + timedelta(hours=1))  # naive = UTC
    now = enqueue(conn, "noop")
    assert [c.id for c in claim(conn, ["a", "b", "c", "d"])] == [now]
    for op_id in (later, at, naive):
        make_claimable(conn, op_id)
    assert sorted(c.id for c in claim(conn, ["a", "b", "c", "d"])) == sorted([later, at, naive])
    with pytest.raises(ValueError, match="not both"):
        enqueue(conn, "noop", delay=1, run_after=datetime.now(UTC))


def test_claim_stays_an_index_scan_with_many_operations_scheduled_for_later(conn):
    conn.execute(
        "INSERT INTO damops.operations (trigger_function, run_after)"
        " SELECT 'noop', now() + interval '1 day' FROM generate_series(1, 100000)"
    )
    ready = enqueue_many(conn, [NewOperation("noop") for _ in range(4)])
    conn.execute("ANALYZE damops.operations")
    sql = (
        store.CLAIM_SQL.replace("%(pool)s", "'default'")
        .replace("%(wait_interval)s", "30")
        .replace("%(limit)s", "4")
        .replace("%(free_workers)b", "ARRAY['a','b','c','d']")
    )
    # EXPLAIN ANALYZE runs the claim: it really takes the 4 ready operations.
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql))
    assert "Seq Scan" not in plan, plan
    assert "operations_claimable_idx" in plan and "operations_delayed_idx" in plan, plan
    assert "Rows Removed by Filter" not in plan, plan  # the future rows are never read
    top = next(line for line in plan.splitlines() if "Buffers:" in line)  # the whole execution's pages
    pages = sum(int(part.split("=")[1]) for part in top.split() if "=" in part)
    assert pages < 100, plan  # a handful of index pages, not 100,000 rows' worth
    assert sorted(ready) == sorted(
        r[0] for r in conn.execute("SELECT id FROM damops.operations WHERE status = 'PROCESSING'")
    )


# --- unique operations -----------------------------------------------------


def test_unique_key_returns_the_existing_operation_while_it_is_not_final(conn):
    first = enqueue(conn, "noop", unique_key="asset-42")
    assert enqueue(conn, "noop", unique_key="asset-42") == first
    ids = enqueue_many(conn, [NewOperation("noop", unique_key=k) for k in ("asset-42", "b", "b", None)])
    assert ids[0] == first and ids[1] == ids[2] and ids[3] not in (first, ids[1])
    [held] = [c for c in claim(conn, ["w1", "w2", "w3"]) if c.id == first]
    assert enqueue(conn, "noop", unique_key="asset-42") == first  # PROCESSING is not final
    complete(conn, held, "success")
    again = enqueue(conn, "noop", unique_key="asset-42")
    assert again != first
    assert conn.execute("SELECT count(*) FROM damops.operations").fetchone()[0] == 4


def test_unique_key_is_safe_under_concurrent_producers(database_url, conn):
    producers, rounds = 16, 5
    barrier = threading.Barrier(producers)
    results: list[int] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with psycopg.connect(database_url) as own:
                for r in range(rounds):
                    barrier.wait()
                    with own.transaction():
                        results.append(enqueue(own, "noop", {"r": r}, unique_key=f"key-{r}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=produce) for _ in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == producers * rounds
    rows = conn.execute("SELECT unique_key, count(*) FROM damops.operations GROUP BY unique_key").fetchall()
    assert sorted(rows) == [(f"key-{r}", 1) for r in range(rounds)]
    assert len(set(results)) == rounds


# --- cancel ------------------------------------------------------------------


def test_cancel_of_new_wait_and_scheduled_operations_is_immediate(conn):
    new = enqueue(conn, "noop")
    scheduled = enqueue(conn, "noop", delay=3600)
    waiting = enqueue(conn, "noop")
    conn.execute("UPDATE damops.operations SET status = 'WAIT' WHERE id = %s", (waiting,))
    done = enqueue(conn, "noop")
    conn.execute("UPDATE damops.operations SET status = 'SUCCESS' WHERE id = %s", (done,))
    result = lifecycle.cancel(conn, [new, scheduled, waiting, done, 999_999])
    assert result.cancelled == sorted([new, scheduled, waiting])
    assert result.already_final == {done: "SUCCESS"} and result.not_found == [999_999] and result.requested == []
    assert {column(conn, i, "status") for i in (new, scheduled, waiting)} == {"CANCELLED"}
    assert column(conn, new, "finished") is not None
    assert claim(conn) == []


def test_cancel_of_a_processing_operation_requests_it_and_notifies_its_pool(database_url, conn):
    op_id = enqueue(conn, "noop", pool="images")
    [held] = claim(conn, pool="images")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {store.CANCEL_NOTIFY_CHANNEL}")
        result = lifecycle.cancel(conn, [op_id])
        payloads = [n.payload for n in listener.notifies(timeout=2.0, stop_after=1)]
    assert result.requested == [op_id] and payloads == ["images"]
    requested = conn.execute(store.CANCEL_REQUESTED_SQL, store.cancel_requested_params("images")).fetchall()
    assert requested == [(op_id, held.attempt, held.worker)]

    async def from_the_scheduler():
        from damops.config import Settings
        from damops.cycle import DispatchCycle
        from damops.dispatch import Stats

        cycle = DispatchCycle(Settings(), database_url, "images", Stats())
        try:
            return await cycle.cancel_requests()
        finally:
            await cycle.close()

    assert asyncio.run(from_the_scheduler()) == [(op_id, held.attempt, held.worker)]
    assert conn.execute(store.CANCEL_REQUESTED_SQL, store.cancel_requested_params("default")).fetchall() == []


@pytest.mark.parametrize(
    ("outcome", "expected"), [("success", "SUCCESS"), ("failure", "CANCELLED"), ("wait", "CANCELLED")]
)
def test_cancel_then_status_update(conn, outcome, expected):
    """The cancel arrives first: success still wins (the work is done); anything else ends CANCELLED."""
    op_id = enqueue(conn, "noop", max_attempts=5)
    [held] = claim(conn)
    lifecycle.cancel(conn, [op_id])
    [done] = complete(conn, held, outcome, result={"ok": True} if outcome == "success" else None, error="stopped")
    assert done.status == expected
    assert column(conn, op_id, "finished") is not None
    assert attempts(conn, op_id)[-1].status == expected
    assert claim(conn) == []  # nothing runs again
    # A duplicate (late) StatusUpdate changes nothing.
    assert complete(conn, held, "success") == []
    assert column(conn, op_id, "status") == expected


def test_status_update_then_cancel_leaves_the_final_state(conn):
    op_id = enqueue(conn, "noop")
    [held] = claim(conn)
    complete(conn, held, "success", result=1)
    result = lifecycle.cancel(conn, [op_id])
    assert result.already_final == {op_id: "SUCCESS"} and result.cancelled == result.requested == []


def test_cancel_waits_for_a_concurrent_completion_holding_the_row(database_url, conn):
    op_id = enqueue(conn, "noop")
    [held] = claim(conn)
    with psycopg.connect(database_url) as scheduler:
        # The scheduler's cycle has written the failure (retry → NEW) but not committed...
        complete(scheduler, held, "failure", error="boom")
        outcome: dict[str, lifecycle.CancelResult] = {}
        canceller = threading.Thread(target=lambda: outcome.update(r=_cancel_in(database_url, op_id)))
        canceller.start()
        canceller.join(0.5)
        assert canceller.is_alive()  # blocked on the row lock
        scheduler.commit()
        canceller.join(10)
    # ...then the cancel sees NEW and cancels it at once: no retry runs.
    assert outcome["r"].cancelled == [op_id]
    assert column(conn, op_id, "status") == "CANCELLED"


def _cancel_in(database_url, op_id):
    with psycopg.connect(database_url, autocommit=True) as other:
        return lifecycle.cancel(other, [op_id])


def test_cancel_requested_operation_that_expires_or_is_released_ends_cancelled(conn):
    expired, released = enqueue(conn, "noop"), enqueue(conn, "noop")
    held = {c.id: c for c in claim(conn, ["a", "b"])}
    lifecycle.cancel(conn, [expired, released])
    conn.execute("UPDATE damops.operations SET updated = now() - interval '1 hour' WHERE id = %s", (expired,))
    assert recover_expired_operations(conn, 60) == {expired: "CANCELLED"}
    h = held[released]
    conn.execute(store.RELEASE_SQL, store.release_params([h], "shutdown"))
    assert column(conn, released, "status") == "CANCELLED"


# --- retry of finished operations ---------------------------------------------


def _finish(conn, op_id, status, error=None, trigger="noop", pool="default", hours_ago=0.0):
    conn.execute(
        "UPDATE damops.operations SET status = %s, error = %s, trigger_function = %s, pool = %s, attempts = 3,"
        " finished = now() - make_interval(secs => %s) WHERE id = %s",
        (status, error, trigger, pool, hours_ago * 3600, op_id),
    )


def test_retry_by_id_keeps_history_and_a_late_status_update_cannot_overwrite_it(conn):
    op_id = enqueue(conn, "noop", max_attempts=1)
    [held] = claim(conn)
    complete(conn, held, error="first run failed")
    assert lifecycle.retry(conn, [op_id]) == [op_id]
    row = get(conn, op_id)
    assert (row.status, row.attempts, row.error, row.finished) == ("NEW", 0, None, None)
    assert complete(conn, held, "success") == []  # the old attempt's late StatusUpdate
    assert get(conn, op_id).status == "NEW"
    [again] = claim(conn)
    complete(conn, again, "success", result={"ok": 1})
    assert [(h.attempt, h.status) for h in attempts(conn, op_id)] == [(1, "FAILED"), (1, "SUCCESS")]
    assert lifecycle.retry(conn, [op_id]) == []  # SUCCESS is not retried


def test_retry_by_filter_in_bounded_batches(conn):
    ids = enqueue_many(conn, [NewOperation("noop") for _ in range(25)])
    for op_id in ids[:10]:
        _finish(conn, op_id, "FAILED", "S3 timeout", trigger="upload")
    for op_id in ids[10:15]:
        _finish(conn, op_id, "FAILED", "bad input", trigger="upload")
    for op_id in ids[15:20]:
        _finish(conn, op_id, "CANCELLED", trigger="upload")
    for op_id in ids[20:]:
        _finish(conn, op_id, "FAILED", "S3 timeout", trigger="upload", hours_ago=48)
    since = datetime.now(UTC) - timedelta(hours=1)
    retried = lifecycle.retry(
        conn, statuses=["FAILED"], trigger_function="upload", error="s3 TIMEOUT", since=since, batch=3
    )
    assert retried == sorted(ids[:10])
    assert lifecycle.retry(conn, statuses=["CANCELLED"], pool="other") == []
    assert lifecycle.retry(conn, statuses=["CANCELLED"], pool="default") == sorted(ids[15:20])
    with pytest.raises(ValueError, match="FAILED or CANCELLED"):
        lifecycle.retry(conn, statuses=["SUCCESS"])


def test_retry_leaves_an_operation_whose_unique_key_is_taken(conn):
    old = enqueue(conn, "noop", unique_key="k")
    _finish(conn, old, "FAILED", "x")
    newer = enqueue(conn, "noop", unique_key="k")
    assert newer != old
    assert lifecycle.retry(conn, [old]) == []


# --- retention and purge ------------------------------------------------------


def test_retention_of_success_and_cancelled_by_age_and_count_summarised(conn, caplog):
    ids = enqueue_many(conn, [NewOperation("noop") for _ in range(12)])
    for op_id in ids[:3]:
        _finish(conn, op_id, "SUCCESS", hours_ago=30)
    for i, op_id in enumerate(ids[3:9]):
        _finish(conn, op_id, "SUCCESS", hours_ago=1 + i * 0.1)
    for op_id in ids[9:11]:
        _finish(conn, op_id, "CANCELLED", hours_ago=30)
    _finish(conn, ids[11], "FAILED", hours_ago=30)  # not theirs: the failed cleanup's
    with caplog.at_level(logging.INFO, logger="damops.housekeeping"):
        result = retain_finished_operations(conn, {"SUCCESS": (24, 4), "CANCELLED": (24, 100)})
    assert result.deleted == {"SUCCESS": (3, 2), "CANCELLED": (2, 0)}
    remaining = sorted(r[0] for r in conn.execute("SELECT id FROM damops.operations"))
    assert remaining == sorted(ids[3:7] + [ids[11]])  # the newest 4 SUCCESS are kept
    summary = [r.getMessage() for r in caplog.records if "retention deleted" in r.getMessage()]
    assert summary == ["retention deleted SUCCESS 3 by age and 2 by count, CANCELLED 2 by age and 0 by count"]


def test_purge_by_hand_deletes_in_batches_with_history(conn):
    conn.execute(
        "INSERT INTO damops.operations (trigger_function, status, finished)"
        " SELECT 'noop', 'SUCCESS', now() - interval '10 days' FROM generate_series(1, 2500)"
    )
    conn.execute(
        "INSERT INTO damops.attempts (operation_id, attempt, outcome, status)"
        " SELECT id, 1, 'success', 'SUCCESS' FROM damops.operations"
    )
    keep = enqueue(conn, "noop")
    _finish(conn, keep, "SUCCESS", hours_ago=1)
    assert lifecycle.purge(conn, ["SUCCESS"], older_than=7 * 86400, batch=1000) == 2500
    assert conn.execute("SELECT count(*) FROM damops.operations").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM damops.attempts").fetchone()[0] == 0
    with pytest.raises(ValueError, match="purge works on"):
        lifecycle.purge(conn, ["NEW"], older_than=1)


def test_lifecycle_functions_work_inside_the_callers_transaction(database_url):
    with psycopg.connect(database_url) as conn:  # not autocommit: one transaction
        op_id = enqueue(conn, "noop")
        assert lifecycle.cancel(conn, [op_id]).cancelled == [op_id]
        assert lifecycle.retry(conn, [op_id]) == [op_id]
        conn.rollback()
        assert get(conn, op_id) is None  # all of it went with the caller's rollback


def test_stats_per_pool_and_status(conn):
    enqueue_many(conn, [NewOperation("noop", pool="a") for _ in range(3)])
    enqueue(conn, "noop", pool="a", delay=3600)
    done = enqueue(conn, "noop", pool="b")
    _finish(conn, done, "SUCCESS", pool="b", hours_ago=0)
    conn.execute("UPDATE damops.operations SET created = now() - interval '90 seconds' WHERE pool = 'a'")
    rows = {(s.pool, s.status): s for s in lifecycle.stats(conn)}
    assert rows[("a", "NEW")].count == 4 and rows[("a", "NEW")].scheduled == 1
    assert rows[("a", "NEW")].oldest_waiting_seconds == pytest.approx(90, abs=5)
    assert rows[("b", "SUCCESS")].finished_recently == 1
    assert [s.pool for s in lifecycle.stats(conn, pool="b")] == ["b"]


# --- enqueue refuses what can never be delivered ----------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inputs": {"x": float("nan")}}, "nan"),
        ({"inputs": {"x": "\x00"}}, "NUL"),
        ({"inputs": {"x": "\ud800"}}, "surrogate"),
        ({"inputs": json.loads("[" * 100 + "]" * 100)}, "nested deeper"),
        ({"inputs": {"x": {1, 2}}}, "set"),
        ({"pool": ""}, "must not be empty"),
        ({"pool": "p" * 64}, "at most 63"),
        ({"pool": "my pool"}, "white space"),
        ({"priority": 2**31}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"unique_key": ""}, "unique_key"),
    ],
)
def test_enqueue_rejects_what_can_never_be_delivered_and_writes_nothing(conn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        enqueue_many(conn, [NewOperation("noop"), NewOperation("noop", **kwargs)])
    assert conn.execute("SELECT count(*) FROM damops.operations").fetchone()[0] == 0
    with pytest.raises(ValueError, match="empty"):
        enqueue(conn, " ")


def test_the_database_refuses_pool_names_no_scheduler_can_serve(conn):
    for bad in ("", "p" * 64, "a b"):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO damops.operations (trigger_function, pool) VALUES ('noop', %s)", (bad,))


def test_cancel_waits_for_a_concurrent_claim_and_then_requests_the_cancel(database_url, conn):
    op_id = enqueue(conn, "noop")
    with psycopg.connect(database_url) as scheduler:
        [held] = claim(scheduler)  # claimed, not yet committed
        outcome: dict[str, lifecycle.CancelResult] = {}
        canceller = threading.Thread(target=lambda: outcome.update(r=_cancel_in(database_url, op_id)))
        canceller.start()
        canceller.join(0.5)
        assert canceller.is_alive()
        scheduler.commit()
        canceller.join(10)
    assert outcome["r"].requested == [op_id] and outcome["r"].cancelled == []
    [done] = complete(conn, held, "failure", error="stopped by its cancel")
    assert done.status == "CANCELLED"


def test_concurrent_claimers_take_ready_and_due_operations_once(database_url, conn):
    ready = enqueue_many(conn, [NewOperation("noop", priority=i % 3) for i in range(100)])
    due = enqueue_many(
        conn, [NewOperation("noop", run_after=datetime.now(UTC) - timedelta(seconds=1)) for _ in range(100)]
    )
    enqueue_many(conn, [NewOperation("noop", run_after=datetime.now(UTC) + timedelta(hours=1)) for _ in range(50)])

    def claimer(name):
        got = []
        with psycopg.connect(database_url, autocommit=True) as own:
            while True:
                batch = claim(own, [f"{name}-{i}" for i in range(7)])
                if not batch:
                    return got
                got.extend(c.id for c in batch)

    results: list[list[int]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=lambda n=n: results[n].extend(claimer(f"s{n}"))) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [i for r in results for i in r]
    assert sorted(claimed) == sorted(ready + due)  # each once; none scheduled for later
