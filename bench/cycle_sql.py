"""The dispatch cycle's statement alone: PostgreSQL's CPU per operation, by cycle size and plan mode.

    .venv/bin/python bench/cycle_sql.py [--sizes 4,16,144] [--finished 0] [--rounds 2]

Starts an embedded PostgreSQL and, for each cycle size N and each plan mode,
migrates a fresh database, enqueues operations, analyzes the table (a backlog,
and ``--finished`` SUCCESS rows of history) and runs COMPLETE_AND_CLAIM_SQL as
the scheduler sends it (autocommit, prepared): each cycle writes N StatusUpdates
and claims N operations. Prints the CPU time of the server process serving the
connection, and the wall time, per operation.

Plan modes: ``scheduler`` is the scheduler connection's (store.PLANNER_SETTINGS:
one generic plan); ``auto`` is PostgreSQL's default, which re-plans whenever the
generic plan's estimate loses to the custom plans' (as it does with an analyzed
backlog). A figure, not a test: `make test` does not run it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from util import create_database  # noqa: E402

from damops import store  # noqa: E402
from damops.db import migrate  # noqa: E402
from damops.dispatch import Completion  # noqa: E402
from damops.embedded import start_embedded_postgres  # noqa: E402
from damops.protocol import StatusUpdate  # noqa: E402

WORKERS = 16
MODES = {"scheduler": store.PLANNER_SETTINGS, "auto": {"plan_cache_mode": "auto", "enable_seqscan": "on"}}


def backend_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, mode: str, size: int, operations: int, finished: int) -> tuple[float, float]:
    """(server CPU us, wall us) per operation over cycles of ``size`` StatusUpdates + claims."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
        conn.execute(store.SET_PLANNER_SETTINGS_SQL, store.planner_settings_params(MODES[mode]))
        conn.execute(
            "INSERT INTO damops.operations (trigger_function) SELECT 'noop' FROM generate_series(1, %s)",
            (operations + size,),
        )
        if finished:
            conn.execute(
                "INSERT INTO damops.operations (trigger_function, status, finished)"
                " SELECT 'noop', 'SUCCESS', now() FROM generate_series(1, %s)",
                (finished,),
            )
        conn.execute("VACUUM ANALYZE damops.operations")
        pid = conn.info.backend_pid
        slots = [f"w{i % WORKERS}" for i in range(size)]
        claim = store.claim_params("default", slots, 30.0)
        leases = [store.lease_from_claim(row) for row in conn.execute(store.CLAIM_SQL, claim).fetchall()]
        cpu, wall, done = backend_cpu_seconds(pid), time.perf_counter(), 0
        while done < operations:
            updates = [
                Completion(StatusUpdate(id=lease.id, attempt=lease.attempt, outcome="success", result={}), lease.worker)
                for lease in leases
            ]
            params = store.complete_and_claim_params(store.complete_params(updates), claim)
            completed, leases = store.split_cycle_rows(conn.execute(store.COMPLETE_AND_CLAIM_SQL, params).fetchall())
            done += len(completed)
        return (backend_cpu_seconds(pid) - cpu) / done * 1e6, (time.perf_counter() - wall) / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4,16,144", help="StatusUpdates (and claims) per cycle")
    parser.add_argument("--operations", type=int, default=14_400, help="operations per measurement")
    parser.add_argument("--finished", type=int, default=0, help="SUCCESS rows in the table when it is analyzed")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per size and mode, alternating modes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="damops-bench-") as home:
        server = start_embedded_postgres(home)
        print(f"{'size':>5} {'mode':<10} {'server CPU us/op':>17} {'wall us/op':>11}")
        for size in [int(s) for s in args.sizes.split(",")]:
            for round_ in range(args.rounds):
                for mode in MODES:
                    url = create_database(server, f"bench_cycle_{mode}_{size}_{round_}")
                    migrate(url)
                    cpu, wall = measure(url, mode, size, args.operations, args.finished)
                    print(f"{size:>5} {mode:<10} {cpu:>17.1f} {wall:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
