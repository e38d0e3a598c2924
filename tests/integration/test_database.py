"""Schema, migrations, the producer API and the claim's query plan."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import subprocess
import sys
import uuid

import psycopg
import pytest

from damops import store
from damops.db import migrate, migration_files
from damops.operations import NewOperation, attempts, count_queued, enqueue, enqueue_many, get, list_operations
from damops.protocol import StatusUpdate


def test_migrate_is_idempotent_and_safe_to_run_concurrently(server_url):
    name = f"t_concurrent_migrate_{uuid.uuid4().hex[:8]}"  # unique: the server may be shared (DAMOPS_TEST_DATABASE_URL)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: migrate(url), range(4)))
        applied = [r for r in results if r]
        assert len(applied) == 1  # exactly one instance applied, the others waited and found nothing to do
        assert applied[0] == [name for _, name, _ in migration_files()]
        assert migrate(url) == []
        with psycopg.connect(url) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM damops.schema_migrations ORDER BY 1")]
        assert versions == [v for v, _, _ in migration_files()]
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_enqueue_joins_the_callers_transaction(database_url):
    with psycopg.connect(database_url) as conn:
        op_id = enqueue(conn, "noop", {"a": 1})
        conn.rollback()
        assert get(conn, op_id) is None
        op_id = enqueue(conn, "noop", {"a": 1}, pool="images", priority=3, max_attempts=5)
        conn.commit()
        row = get(conn, op_id)
    assert (row.status, row.pool, row.priority, row.max_attempts, row.inputs) == ("NEW", "images", 3, 5, {"a": 1})


def test_enqueue_many_inserts_in_one_call_and_keeps_order(conn):
    ops = [NewOperation("noop", {"i": i}, pool="p1" if i % 2 else "p2") for i in range(100)]
    ids = enqueue_many(conn, ops)
    assert ids == sorted(ids) and len(ids) == 100
    assert [get(conn, i).inputs["i"] for i in ids[:3]] == [0, 1, 2]
    assert count_queued(conn, "p1") == 50
    assert {r.pool for r in list_operations(conn, status="NEW", pool="p2")} == {"p2"}


def test_insert_notifies_the_pool_once_per_statement(database_url):
    """PostgreSQL folds identical notifications within a transaction, so what
    a listener receives cannot tell a per-row trigger from a per-statement one:
    count the trigger function's calls too (this transaction's function stats)."""
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN damops_operations")
        with psycopg.connect(database_url) as producer:
            if not producer.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
                pytest.skip("counting trigger calls needs SET track_functions, which only a superuser may do")
            producer.execute("SET track_functions = 'all'")
            calls = lambda: producer.execute(  # noqa: E731
                "SELECT pg_stat_get_xact_function_calls('damops.notify_new_operations'::regproc)"
            ).fetchone()[0]
            enqueue_many(
                producer, [NewOperation("noop", pool="a") for _ in range(50)] + [NewOperation("noop", pool="b")]
            )
            assert calls() == 1  # 51 rows, one call
            enqueue_many(producer, [NewOperation("noop", pool="c") for _ in range(20)])
            assert calls() == 2  # a second statement, a second call
        # Notifications arrive in commit order: read up to a sentinel sent
        # afterwards, so "nothing else came" needs no fixed wait.
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("NOTIFY damops_operations, 'sentinel'")
        payloads = []
        for notify in listener.notifies(timeout=30):
            if notify.payload == "sentinel":
                break
            payloads.append(notify.payload)
        else:
            pytest.fail(f"no sentinel notification within 30 s; got {payloads}")
    assert sorted(payloads) == ["a", "b", "c"]  # one per pool
    with psycopg.connect(database_url) as conn:
        (tgtype,) = conn.execute(
            "SELECT tgtype FROM pg_trigger WHERE tgrelid = 'damops.operations'::regclass AND tgname = 'operations_notify'"
        ).fetchone()
    assert tgtype & 1 == 0  # TRIGGER_TYPE_ROW unset: a statement-level trigger


def test_claim_is_an_index_scan_on_the_claimable_rows(conn):
    conn.execute(
        "INSERT INTO damops.operations (trigger_function, status) "
        "SELECT 'noop', 'SUCCESS' FROM generate_series(1, 20000)"
    )
    enqueue_many(conn, [NewOperation("noop") for _ in range(10)])
    conn.execute("ANALYZE damops.operations")
    plan = "\n".join(
        r[0]
        for r in conn.execute(
            "EXPLAIN "
            + store.CLAIM_SQL.replace("%(pool)s", "'default'")
            .replace("%(wait_interval)s", "30")
            .replace("%(limit)s", "4")
            .replace("%(free_workers)b", "ARRAY['a','b','c','d']")
        )
    )
    assert "operations_claimable_idx" in plan, plan
    assert "Seq Scan on operations" not in plan, plan


def _generic_plan(conn: psycopg.Connection, sql: str) -> str:
    """The plan the scheduler's connection makes of ``sql``: once, for any parameters."""
    numbers: dict[str, int] = {}

    def placeholder(match: re.Match[str]) -> str:
        return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

    text = re.sub(r"%\((\w+)\)[sb]", placeholder, sql)
    with conn.transaction(force_rollback=True):
        conn.execute(store.SET_PLANNER_SETTINGS_SQL, store.planner_settings_params(local=True))
        return "\n".join(row[0] for row in conn.execute("EXPLAIN (GENERIC_PLAN) " + text))


# Each statement of the scheduler's connection, and the index it must read.
_CYCLE_STATEMENTS = {
    "COMPLETE_SQL": "operations_pkey",
    "COMPLETE_AND_CLAIM_SQL": "operations_pkey",
    "TOUCH_SQL": "operations_pkey",
    "RELEASE_SQL": "operations_pkey",
    "CLAIM_SQL": "operations_claimable_idx",
    "RESOLVE_CLAIMS_SQL": "operations_processing_idx",
    "CANCEL_REQUESTED_SQL": "operations_cancel_requested_idx",
}


@pytest.mark.parametrize("table", ["empty", "analyzed", "backlog"])
@pytest.mark.parametrize("name", sorted(_CYCLE_STATEMENTS))
def test_the_cycle_statements_generic_plans_read_only_their_index(conn, name, table):
    """A generic plan is kept until the next ANALYZE, whatever the table holds by then.
    Made on an empty table, one that read it sequentially scanned the whole table
    every cycle once it filled up; made from statistics taken while nothing was
    PROCESSING, one that trusted the partial index of PROCESSING rows (one row, by
    its statistics) scanned all of them once per StatusUpdate."""
    if conn.info.server_version < 160000:
        pytest.skip("EXPLAIN (GENERIC_PLAN) needs PostgreSQL 16 or later")
    if table == "analyzed":
        conn.execute(
            "INSERT INTO damops.operations (trigger_function, status) "
            "SELECT 'noop', 'SUCCESS' FROM generate_series(1, 20000)"
        )
        conn.execute("ANALYZE damops.operations")
        enqueue_many(conn, [NewOperation("noop") for _ in range(300)])
        conn.execute(store.CLAIM_SQL, store.claim_params("default", [f"w{i}" for i in range(300)], 30))
    elif table == "backlog":  # the claim's LIMIT $n is estimated at a tenth of these
        enqueue_many(conn, [NewOperation("noop") for _ in range(20000)])
        conn.execute("ANALYZE damops.operations")
    plan = _generic_plan(conn, getattr(store, name))
    assert _CYCLE_STATEMENTS[name] in plan, plan
    assert "Seq Scan" not in plan, plan
    if _CYCLE_STATEMENTS[name] == "operations_pkey":
        assert "operations_processing_idx" not in plan, plan
    if name.endswith("CLAIM_SQL"):
        assert "operations_claimable_idx" in plan and "operations_delayed_idx" in plan, plan


def test_the_scheduler_plans_its_cycle_once(database_url):
    """The cycle's statement is prepared and run as a generic plan: re-planning it
    for each cycle (PostgreSQL's default here) cost ~0.5 ms of server CPU a cycle."""
    from damops.config import Settings
    from damops.cycle import DispatchCycle
    from damops.dispatch import PendingWrites, Stats

    async def cycles() -> tuple[int, int]:
        cycle = DispatchCycle(Settings(), database_url, "default", Stats())
        try:
            for _ in range(8):
                await cycle.run(PendingWrites(), ["w1", "w2"])
            conn = await cycle._connection()
            cur = await conn.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE '%%leased AS%%'"
            )
            row = await cur.fetchone()
            assert row is not None, "the cycle's statement was not prepared"
            return row
        finally:
            await cycle.close()

    generic, custom = asyncio.run(cycles())
    assert (generic, custom) == (8, 0)


def test_claim_takes_each_operation_once_across_concurrent_claimers(conn):
    ids = enqueue_many(conn, [NewOperation("noop") for _ in range(200)])

    async def claimer(name):
        got = []
        async with await psycopg.AsyncConnection.connect(conn.info.dsn, autocommit=True) as aconn:
            params = store.claim_params("default", [f"{name}-{i}" for i in range(7)], 30)
            while batch := await (await aconn.execute(store.CLAIM_SQL, params)).fetchall():
                got += [store.lease_from_claim(row).id for row in batch]
        return got

    async def race():
        return await asyncio.gather(*(claimer(f"s{n}") for n in range(4)))

    claimed = [i for batch in asyncio.run(race()) for i in batch]
    assert sorted(claimed) == ids  # every operation once, none twice


def test_autovacuum_settings_suit_a_queue(conn):
    options = conn.execute("SELECT reloptions FROM pg_class WHERE oid = 'damops.operations'::regclass").fetchone()[0]
    assert "autovacuum_vacuum_scale_factor=0.01" in options


def _cli(database_url, *args, check=True):
    env = dict(os.environ, DATABASE_URL=database_url)
    result = subprocess.run(
        [sys.executable, "-m", "damops", *args], env=env, capture_output=True, text=True, timeout=60
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_enqueue_status_list_and_migrate(database_url):
    op_id = int(
        _cli(database_url, "enqueue", "sleep", "--inputs", '{"seconds": 2}', "--pool", "p9", "--priority", "4").stdout
    )
    shown = _cli(database_url, "status", str(op_id), "--json").stdout
    assert '"trigger_function": "sleep"' in shown and '"pool": "p9"' in shown and '"priority": 4' in shown
    listed = _cli(database_url, "list", "--status", "new", "--pool", "p9").stdout
    assert str(op_id) in listed and "sleep" in listed
    assert "schema is up to date" in _cli(database_url, "db", "migrate").stdout
    missing = _cli(database_url, "status", "999999", check=False)
    assert missing.returncode != 0 and "no operation with id 999999" in missing.stderr
    bad_status = _cli(database_url, "list", "--status", "DONE", check=False)
    assert bad_status.returncode != 0 and "unknown status" in bad_status.stderr


def test_cli_hands_operator_and_crd_options_to_their_own_parsers(database_url):
    crd = _cli(database_url, "crd").stdout
    assert "kind: CustomResourceDefinition" in crd and "workerpools.damops.dev" in crd
    assert "--standalone" in _cli(database_url, "operator", "--help").stdout


def test_one_statement_writes_the_status_updates_and_claims_for_the_free_workers(conn):
    """COMPLETE_AND_CLAIM_SQL, the usual dispatch cycle: the StatusUpdates are
    written exactly as COMPLETE_SQL writes them, the claim takes what CLAIM_SQL
    would, and the claim does not take an operation the same statement put back."""
    running, retried, waiting = enqueue_many(conn, [NewOperation("noop") for _ in range(3)])
    leases = {
        lease.id: lease
        for lease in map(
            store.lease_from_claim, conn.execute(store.CLAIM_SQL, store.claim_params("default", ["a", "b"], 30.0))
        )
    }
    assert set(leases) == {running, retried}
    updates = [
        StatusUpdate(id=running, attempt=1, outcome="success", result={"ok": 1}),
        StatusUpdate.failure(retried, 1, "Retry: now", retry_after=0.0),
    ]
    completion = store.complete_params([store.Completion(u, leases[u.id].worker) for u in updates])
    params = store.complete_and_claim_params(completion, store.claim_params("default", ["a", "c"], 30.0))
    completed, claimed = store.split_cycle_rows(conn.execute(store.COMPLETE_AND_CLAIM_SQL, params))
    assert {(row[0], row[1]) for row in completed} == {(running, "SUCCESS"), (retried, "NEW")}
    assert [(lease.id, lease.worker, lease.attempt) for lease in claimed] == [(waiting, "a", 1)]
    assert get(conn, running).result == {"ok": 1}
    assert [a.outcome for a in attempts(conn, retried)] == ["failure"]  # its history is written too
    # The retry is due now: the next cycle claims it.
    [again] = store.split_cycle_rows(
        conn.execute(
            store.COMPLETE_AND_CLAIM_SQL,
            store.complete_and_claim_params(store.complete_params([]), store.claim_params("default", ["c"], 30.0)),
        )
    )[1]
    assert (again.id, again.attempt) == (retried, 2)


def test_status_updates_reach_the_row_exactly_as_the_worker_sent_them(conn):
    """What COMPLETE_SQL stores is what the worker sent: a null result stays a JSON
    null (not SQL NULL); nested results, quotes and non-ASCII text arrive intact."""
    ids = enqueue_many(conn, [NewOperation("noop", max_attempts=1) for _ in range(3)])
    leases = {
        lease.id: lease
        for lease in map(
            store.lease_from_claim, conn.execute(store.CLAIM_SQL, store.claim_params("default", ["a", "b", "c"], 30.0))
        )
    }
    nested = {"list": [1, 2.5, None, "x"], "deep": {"é": '"quoted" \\ back'}}
    error = 'ValueError: "bad" input \\ ünïcödé ✓\nsecond line'
    updates = [
        StatusUpdate(id=ids[0], attempt=1, outcome="success", result=None),
        StatusUpdate(id=ids[1], attempt=1, outcome="success", result=nested),
        StatusUpdate.failure(ids[2], 1, error, traceback="Traceback: 'x'\n  ✗"),
    ]
    conn.execute(store.COMPLETE_SQL, store.complete_params([store.Completion(u, leases[u.id].worker) for u in updates]))
    stored = dict(conn.execute("SELECT id, result IS NULL FROM damops.operations WHERE id = ANY(%s)", [ids]).fetchall())
    assert stored[ids[0]] is False  # JSON null, as the worker sent it
    assert get(conn, ids[0]).status == "SUCCESS" and get(conn, ids[0]).result is None
    assert get(conn, ids[1]).result == nested
    failed = get(conn, ids[2])
    assert (failed.status, failed.error) == ("FAILED", error)
    assert attempts(conn, ids[2])[0].traceback == "Traceback: 'x'\n  ✗"


def test_the_two_statements_of_a_cycle_name_their_parameters_apart():
    with pytest.raises(ValueError, match="free_workers"):
        store.complete_and_claim_params({"free_workers": []}, store.claim_params("default", ["a"], 30.0))
