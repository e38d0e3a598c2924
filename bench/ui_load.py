"""Page load times of the dashboard on a table of 1,000,000 operations.

    .venv/bin/python bench/ui_load.py              # an embedded PostgreSQL in a temporary directory
    .venv/bin/python bench/ui_load.py --rows 200000 --url postgresql://...   # a new database on that server

Creates a fresh database, inserts the rows with one generate_series (a mix of
statuses, pools, trigger functions and errors, finished over the last two
hours), ANALYZEs, serves the dashboard with uvicorn on 127.0.0.1 and times
whole HTTP requests to its pages (median and worst of --repeat, after one
warm-up request each). Not a test: `make test` does not run it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from damops.db import migrate  # noqa: E402
from damops.embedded import start_embedded_postgres  # noqa: E402
from damops.ui.app import create_app  # noqa: E402

# Statuses by share: mostly finished, as on a busy system with retention.
INSERT_SQL = """
INSERT INTO damops.operations (trigger_function, pool, status, attempts, inputs, result, error,
                               created, updated, started, finished, last_worker, worker)
SELECT (ARRAY['render_rendition', 'noop', 'sleep', 'flaky'])[1 + i % 4],
       (ARRAY['default', 'images', 'video'])[1 + i % 3],
       s.status,
       1, jsonb_build_object('i', i, 'width', 256),
       CASE WHEN s.status = 'SUCCESS' THEN '{"ok": true}'::jsonb END,
       CASE WHEN s.status = 'FAILED' THEN (ARRAY['TimeoutError: object store did not answer in 30s',
                                                  'OSError: disk full', 'ValueError: bad size ' || (i % 50)])[1 + i % 3] END,
       t, t, CASE WHEN s.status <> 'NEW' THEN t END,
       CASE WHEN s.status IN ('SUCCESS', 'FAILED', 'CANCELLED') THEN t END,
       'local-' || (i % 16), CASE WHEN s.status = 'PROCESSING' THEN 'local-' || (i % 16) END
FROM generate_series(1, %(rows)s) AS i,
     LATERAL (SELECT now() - make_interval(secs => (%(rows)s - i) * 7200.0 / %(rows)s) AS t) AS x,
     LATERAL (SELECT CASE WHEN i %% 100 < 80 THEN 'SUCCESS' WHEN i %% 100 < 90 THEN 'FAILED'
                          WHEN i %% 100 < 93 THEN 'CANCELLED' WHEN i %% 100 < 98 THEN 'NEW'
                          WHEN i %% 100 < 99 THEN 'WAIT' ELSE 'PROCESSING' END AS status) AS s
"""

PAGES = [
    ("overview", "/"),
    ("overview partial (the 5 s refresh)", "/partials/overview"),
    ("list, no filter", "/operations"),
    ("list, status=FAILED pool=images", "/operations?status=FAILED&pool=images"),
    ("list, FAILED + error text 'disk'", "/operations?status=FAILED&error=disk"),
    ("list, trigger + last 30 min", "/operations?trigger=flaky&since=30m"),
    ("list, error text matching nothing", "/operations?error=no-such-error-anywhere"),
    ("list, a page deep in the table", "/operations?before=1000&limit=50"),
    ("operation page", "/operations/{middle}"),
    ("failed by error", "/failed"),
    ("api stats", "/api/stats"),
    ("api throughput", "/api/throughput"),
]


def timed_get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
        assert response.status == 200, (url, response.status)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--url", help="a PostgreSQL server URL (default: an embedded one)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    server = args.url or start_embedded_postgres(tempfile.mkdtemp(prefix="damops-ui-bench-"))
    name = f"ui_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(server, dbname=name)
    try:
        migrate(url)
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(INSERT_SQL.replace("%(rows)s", str(int(args.rows))).replace("%%", "%"))
            conn.execute("ANALYZE damops.operations")
            total = conn.execute("SELECT count(*) FROM damops.operations").fetchone()[0]  # type: ignore[index]
        print(f"inserted {total:,} operations in {time.perf_counter() - started:.1f}s")
        run_pages(url, total, args.repeat)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_pages(url: str, total: int, repeat: int) -> None:
    app = create_app(url, cache_seconds=0)  # every request computes: the cost of a cache miss
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    print(f"{'page':<40} {'median':>9} {'worst':>9}   ({repeat} requests after a warm-up, {total:,} rows)")
    for label, path in PAGES:
        target = base + path.format(middle=total // 2)
        timed_get(target)
        times = [timed_get(target) for _ in range(repeat)]
        print(f"{label:<40} {statistics.median(times) * 1000:>7.0f}ms {max(times) * 1000:>7.0f}ms")
    server.should_exit = True
    thread.join(10)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (closed again before the server binds it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
