"""Claim latency with operations scheduled for later: it must stay flat.

    .venv/bin/python bench/claim_scheduled.py [--scheduled 100000] [--samples 300]

Starts an embedded PostgreSQL, migrates a fresh database and times the
scheduler's claim statement (CLAIM_SQL for 16 workers, rolled back so every
sample sees the same rows) with 1,000 ready operations, then again after
``--scheduled`` operations were scheduled an hour ahead. Prints the median and
p99 of both, their ratio, and the claim's plan (it must read only index
ranges). The claim runs prepared, as a generic plan, as the scheduler runs it.
A figure, not a test: `make test` does not run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from util import create_database, percentile  # noqa: E402

from damops import store  # noqa: E402
from damops.db import migrate  # noqa: E402
from damops.embedded import start_embedded_postgres  # noqa: E402

WORKERS = [f"bench-w{i}" for i in range(16)]


def time_claims(conn: psycopg.Connection, samples: int) -> list[float]:
    params = store.claim_params("default", WORKERS, 30.0)
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        with conn.transaction(force_rollback=True):
            rows = conn.execute(store.CLAIM_SQL, params).fetchall()
        timings.append((time.perf_counter() - started) * 1000)
        assert len(rows) == len(WORKERS), rows
    return timings


def summary(timings: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(timings), 3), "p99_ms": round(percentile(timings, 0.99), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduled", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="damops-bench-") as home:
        url = create_database(start_embedded_postgres(home), "bench_claim")
        migrate(url)
        with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
            conn.execute(store.SET_PLANNER_SETTINGS_SQL, store.planner_settings_params())  # as the scheduler's
            conn.execute(
                "INSERT INTO damops.operations (trigger_function, inputs) SELECT 'noop', '{}' FROM generate_series(1, 1000)"
            )
            conn.execute("ANALYZE damops.operations")
            time_claims(conn, 20)  # warm-up
            before = summary(time_claims(conn, args.samples))
            conn.execute(
                "INSERT INTO damops.operations (trigger_function, inputs, run_after)"
                " SELECT 'noop', '{}', now() + interval '1 hour' FROM generate_series(1, %s)",
                (args.scheduled,),
            )
            conn.execute("ANALYZE damops.operations")
            time_claims(conn, 20)
            after = summary(time_claims(conn, args.samples))
            with conn.transaction(force_rollback=True):
                plan = "\n".join(
                    row[0]
                    for row in conn.execute(
                        "EXPLAIN (ANALYZE, BUFFERS) " + store.CLAIM_SQL, store.claim_params("default", WORKERS, 30.0)
                    )
                )
    ratio = round(after["p50_ms"] / before["p50_ms"], 2)
    print(
        json.dumps(
            {
                "ready": 1000,
                "scheduled": args.scheduled,
                "before": before,
                "after": after,
                "p50_ratio_after_over_before": ratio,
            },
            indent=2,
        )
    )
    print("claim plan with the scheduled rows:\n" + plan)
    print(f"target: p50 stays flat (ratio <= 1.5): {'met' if ratio <= 1.5 else 'missed'} ({ratio})")


if __name__ == "__main__":
    main()
