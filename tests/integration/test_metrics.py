"""The engine's Prometheus metrics, scraped over HTTP and read with the client's own parser."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from damops import metrics
from damops.operations import NewOperation, enqueue_many
from tests.support.engine import running_engine, settings, wait_final


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_runs_durations_queue_times_and_workers_are_exported(database_url):
    pool = "metrics-pool"

    def runs(samples) -> float:
        """Runs of this test's two kinds of operation counted so far."""
        return sum(
            value(samples, "damops_operation_runs_total", pool=pool, trigger_function=t, status=s)
            for t, s in (("noop", "SUCCESS"), ("fail", "FAILED"))
        )

    async def scenario():
        async with running_engine(database_url, settings(worker_count=2, pool=pool)) as engine:
            served = metrics.serve(0, pool, engine.scheduler.snapshot)
            try:
                before = scrape(served.port)
                with psycopg.connect(database_url) as conn:
                    ids = enqueue_many(
                        conn,
                        [NewOperation("noop", pool=pool) for _ in range(5)]
                        + [NewOperation("fail", {"message": "x"}, pool=pool, max_attempts=1)],
                    )
                await wait_final(database_url, ids)
                # a run is counted just after its row is stored: wait for the last one to show
                deadline = time.monotonic() + 30
                while True:
                    after = scrape(served.port)
                    if runs(after) - runs(before) >= len(ids) or time.monotonic() > deadline:
                        return before, after
                    await asyncio.sleep(0.05)
            finally:
                served.close()

    before, after = asyncio.run(scenario())
    ok = {"pool": pool, "trigger_function": "noop"}
    assert (
        value(after, "damops_operation_runs_total", status="SUCCESS", **ok)
        - value(before, "damops_operation_runs_total", status="SUCCESS", **ok)
        == 5
    )
    assert value(after, "damops_operation_runs_total", pool=pool, trigger_function="fail", status="FAILED") >= 1
    assert (
        value(after, "damops_operation_duration_seconds_count", **ok)
        - value(before, "damops_operation_duration_seconds_count", **ok)
        == 5
    )
    assert (
        value(after, "damops_operation_queue_seconds_count", **ok)
        - value(before, "damops_operation_queue_seconds_count", **ok)
        == 5
    )
    assert value(after, "damops_operation_queue_seconds_bucket", le="+Inf", **ok) >= 5
    assert value(after, "damops_scheduler_workers", pool=pool, state="free") == 2
    assert ("damops_scheduler_released_total", (("pool", pool),)) in after
    assert ("damops_scheduler_overdue_handed_back_total", (("pool", pool),)) in after


def test_one_log_line_per_finished_run_names_the_operation(database_url, caplog):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)):
            with psycopg.connect(database_url) as conn:
                ids = enqueue_many(conn, [NewOperation("noop"), NewOperation("fail", {"message": "x"}, max_attempts=1)])
            await wait_final(database_url, ids)
            return ids

    with caplog.at_level("INFO", logger="damops.operations"):
        ok, failed = asyncio.run(scenario())
    lines = [r for r in caplog.records if r.name == "damops.operations"]
    assert [r.getMessage().split(" (")[0] for r in lines] == [
        f"operation {ok} noop: SUCCESS",
        f"operation {failed} fail: FAILED",
    ]
    assert [(r.operation_id, r.outcome, r.attempt) for r in lines] == [(ok, "SUCCESS", 1), (failed, "FAILED", 1)]
    assert all(r.duration_seconds is not None and r.duration_seconds >= 0 for r in lines)
