"""JSON log lines about an operation carry its id, trigger function, attempt and
pool, whichever process wrote them: read from a real `damops run` (scheduler,
sidecars and workers share its stderr) and from housekeeping."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter

import psycopg

from damops.housekeeping import cleanup_failed_operations, recover_expired_operations
from damops.operations import NewOperation, enqueue, enqueue_many
from tests.integration.observed import TRIGGERS, DamopsRun
from tests.support.engine import wait_final

POOL = "logs-pool"
FIELDS = ("operation_id", "trigger_function", "attempt", "pool")


def test_every_line_about_an_operation_names_it_in_every_process(database_url):
    with DamopsRun(database_url, POOL) as run:
        run.wait_ready()
        with psycopg.connect(database_url) as conn:
            ok, chatty, failing, flaky, crashing = enqueue_many(
                conn,
                [
                    NewOperation("noop", pool=POOL),
                    NewOperation(f"{TRIGGERS}:chatty", {"what": "logs"}, pool=POOL),
                    NewOperation("fail", {"message": "broken on purpose"}, pool=POOL, max_attempts=1),
                    NewOperation("flaky", {"succeed_on": 2}, pool=POOL, max_attempts=3),
                    NewOperation(f"{TRIGGERS}:crash_once", pool=POOL, max_attempts=3),
                ],
            )
        found = asyncio.run(wait_final(database_url, [ok, chatty, failing, flaky, crashing], timeout=120))
        assert found == {ok: "SUCCESS", chatty: "SUCCESS", failing: "FAILED", flaky: "SUCCESS", crashing: "SUCCESS"}
        # Each final line is logged right after the commit that made the status visible.
        for op_id, status in found.items():
            run.wait_for_line(
                lambda line, op_id=op_id, status=status: (
                    line.get("operation_id") == op_id and line.get("outcome") == status
                ),
                30,
                f"saying operation {op_id} ended {status}",
            )
    lines = run.json_lines()

    def about(op_id: int) -> list[dict]:
        return [line for line in lines if line.get("operation_id") == op_id]

    # Any line whose message names an operation carries that operation's id.
    for line in lines:
        named = re.search(r"\boperation (\d+)\b", line["message"])
        if named:
            assert line.get("operation_id") == int(named.group(1)), line

    # One line per finished run, with its outcome and duration, all fields set.
    finished = [line for line in lines if line["logger"] == "damops.operations"]
    runs = Counter((line["operation_id"], line["attempt"]) for line in finished)
    assert set(runs.values()) == {1}, runs
    outcomes = {(line["operation_id"], line["attempt"]): line["outcome"] for line in finished}
    assert outcomes == {
        (ok, 1): "SUCCESS",
        (chatty, 1): "SUCCESS",
        (failing, 1): "FAILED",
        (flaky, 1): "NEW",
        (flaky, 2): "SUCCESS",
        (crashing, 1): "NEW",
        (crashing, 2): "SUCCESS",
    }
    for line in finished:
        assert line["pool"] == POOL and line["duration_seconds"] >= 0 and line["trigger_function"], line

    # The worker: what the trigger function logs, through its context's logger or any other.
    chatty_lines = {line["logger"]: line for line in about(chatty) if line["logger"] != "damops.operations"}
    assert set(chatty_lines) == {f"damops.trigger.{TRIGGERS}:chatty", "some.library"}, about(chatty)
    for line in chatty_lines.values():
        assert [line[f] for f in FIELDS] == [chatty, f"{TRIGGERS}:chatty", 1, POOL], line
        assert line["worker"].endswith(("-w1", "-w2")), line

    # The worker's own line about an attempt that raised: the failing one, and the retried one's first attempt.
    for op_id, name, attempt in ((failing, "fail", 1), (flaky, "flaky", 1)):
        [raised] = [line for line in about(op_id) if line["logger"] == "damops.worker"]
        assert "raised" in raised["message"]
        assert [raised[f] for f in FIELDS] == [op_id, name, attempt, POOL] and raised["worker"]

    # The sidecar whose worker died during the operation says so, naming it.
    [dropped] = [line for line in about(crashing) if line["logger"] == "damops.sidecar"]
    assert "worker connection dropped" in dropped["message"] and dropped["level"] == "WARNING"
    assert [dropped[f] for f in FIELDS] == [crashing, f"{TRIGGERS}:crash_once", 1, POOL] and dropped["worker"]


def test_housekeeping_lines_name_the_operation(conn, caplog):
    expired = enqueue(conn, "noop", pool="hk-pool", max_attempts=1)
    failed = enqueue(conn, "fail", pool="hk-pool")
    conn.execute(
        "UPDATE damops.operations SET status = 'PROCESSING', attempts = 1, worker = 'w-9',"
        " updated = now() - interval '2 minutes' WHERE id = %s",
        (expired,),
    )
    conn.execute(
        "UPDATE damops.operations SET status = 'FAILED', attempts = 3, created = now() - interval '3 days'"
        " WHERE id = %s",
        (failed,),
    )
    with caplog.at_level(logging.INFO, logger="damops.housekeeping"):
        assert recover_expired_operations(conn, 60) == {expired: "FAILED"}
        assert cleanup_failed_operations(conn, 24, 20000) is not None
    [recovered] = [r for r in caplog.records if "expired operation" in r.getMessage()]
    assert (recovered.operation_id, recovered.trigger_function, recovered.attempt, recovered.pool) == (
        expired,
        "noop",
        1,
        "hk-pool",
    )
    assert recovered.worker == "w-9"
    deleted = [r for r in caplog.records if r.name == "damops.housekeeping.failed_cleanup"]
    assert [(r.operation_id, r.trigger_function, r.attempt, r.pool) for r in deleted] == [
        (failed, "fail", 3, "hk-pool")
    ]
