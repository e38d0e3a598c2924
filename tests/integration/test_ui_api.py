"""The dashboard's API and pages against a real PostgreSQL, with operations in
every state made the way the engine makes them (claim, StatusUpdate, cancel)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import psycopg
import pytest
from starlette.testclient import TestClient

from damops import lifecycle, store
from damops.dispatch import Snapshot, WorkerView
from damops.operations import attempts, count_by_status, enqueue, get
from damops.periodic import parse_schedules
from damops.protocol import StatusUpdate
from damops.ui.app import create_app

TOKEN = "s3cret-token"
ORIGIN = "http://testserver"
SCRIPT = "<script>alert('x')</script>"


@dataclass
class Seeded:
    ids: dict[str, list[int]] = field(default_factory=dict)

    def add(self, status: str, op_id: int) -> int:
        self.ids.setdefault(status, []).append(op_id)
        return op_id


def _claim(conn: psycopg.Connection, op_id: int, worker: str, pool: str = "default") -> store.Lease:
    [row] = conn.execute(store.CLAIM_SQL, store.claim_params(pool, [worker], 30.0)).fetchall()
    lease = store.lease_from_claim(row)
    assert lease.id == op_id, "the seed claims each operation right after enqueueing it"
    return lease


def _complete(conn: psycopg.Connection, lease: store.Lease, outcome: str, **fields: object) -> None:
    update = StatusUpdate(id=lease.id, attempt=lease.attempt, outcome=outcome, **fields)  # type: ignore[arg-type]
    conn.execute(store.COMPLETE_SQL, store.complete_params([store.Completion(update, lease.worker)]))


def _run(conn, name, inputs, outcome, pool="default", worker="w-1", max_attempts=1, **fields) -> int:
    op_id = enqueue(conn, name, inputs, pool=pool, max_attempts=max_attempts)
    _complete(conn, _claim(conn, op_id, worker, pool), outcome, **fields)
    return op_id


def seed(conn: psycopg.Connection) -> Seeded:
    """Operations in every status, in two pools, with attempt history."""
    s = Seeded()
    s.add("SUCCESS", _run(conn, "render_rendition", {"width": 64}, "success", result={"thumbnail": "ok"}))
    s.add("SUCCESS", _run(conn, "noop", {}, "success", pool="images", worker="img-1", result=None))
    for _ in range(2):
        s.add(
            "FAILED",
            _run(
                conn,
                "render_rendition",
                {"width": 1},
                "failure",
                error="OSError: disk full",
                traceback='Traceback (most recent call last):\n  File "x.py", line 1\nOSError: disk full',
            ),
        )
    s.add("FAILED", _run(conn, "fail", {"html": SCRIPT}, "failure", pool="images", worker="img-1", error="<b>bold</b>"))
    # Two attempts: the first retried by the backoff, the second final.
    two = enqueue(conn, "flaky", {"n": 2}, max_attempts=2)
    _complete(conn, _claim(conn, two, "w-2"), "failure", error="ValueError: first try")
    conn.execute("UPDATE damops.operations SET run_after = now() - interval '1 second' WHERE id = %s", (two,))
    _complete(conn, _claim(conn, two, "w-2"), "failure", error="ValueError: second try")
    s.add("FAILED", two)
    s.add("WAIT", _run(conn, "wait_until", {}, "wait", max_attempts=3, result="not yet"))
    busy = enqueue(conn, "sleep", {"seconds": 60}, pool="images")
    _claim(conn, busy, "img-busy", "images")
    s.add("PROCESSING", busy)
    cancelled = enqueue(conn, "noop", {"later": True}, delay=3600)
    lifecycle.cancel(conn, [cancelled])
    s.add("CANCELLED", cancelled)
    s.add("NEW", enqueue(conn, "noop", {"html": SCRIPT}))
    s.add("NEW", enqueue(conn, "noop", {}, pool="images", delay=3600))
    for status in ("SUCCESS", "FAILED", "WAIT", "PROCESSING", "CANCELLED", "NEW"):
        for op_id in s.ids[status]:
            assert get(conn, op_id).status == status  # type: ignore[union-attr]
    return s


@pytest.fixture
def seeded(conn) -> Seeded:
    return seed(conn)


def client_for(database_url: str, token: str | None = None, **kwargs: object) -> TestClient:
    return TestClient(create_app(database_url, token=token, **kwargs), base_url=ORIGIN)  # type: ignore[arg-type]


@pytest.fixture
def client(database_url):
    with client_for(database_url) as c:
        yield c


@pytest.fixture
def acting(database_url):
    with client_for(database_url, TOKEN) as c:
        yield c


def _status(conn, op_id: int) -> str:
    row = get(conn, op_id)
    assert row is not None
    return row.status


# --- reading -----------------------------------------------------------------


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True}


def test_stats_match_the_database(client, conn, seeded):
    pools = {p["pool"]: p for p in client.get("/api/stats").json()["pools"]}
    assert set(pools) == {"default", "images"}
    for pool, p in pools.items():
        assert p["counts"] == count_by_status(conn, pool)
    assert pools["default"]["failed_last_hour"] == 3
    assert pools["default"]["finished_last_hour"] == 1 + 3 + 1  # success, failed, cancelled
    assert pools["images"]["scheduled"] == 1
    assert pools["default"]["oldest_waiting_seconds"] is not None
    only = client.get("/api/stats", params={"pool": "images"}).json()["pools"]
    assert [p["pool"] for p in only] == ["images"]


def test_overview_page_shows_the_counts(client, conn, seeded):
    html = client.get("/").text
    for status, count in count_by_status(conn, "default").items():
        cell = re.search(rf'data-pool="default">.*?data-status="{status}"><a [^>]*>(\d+)<', html, re.S)
        assert cell and int(cell.group(1)) == count, status
    assert 'hx-trigger="every 5s"' in html  # refreshes itself
    assert client.get("/partials/overview").status_code == 200


def test_throughput_has_sixty_minutes_and_counts_this_one(client, seeded):
    data = client.get("/api/throughput").json()
    assert len(data["minutes"]) == len(data["succeeded"]) == len(data["failed"]) == 60
    assert sum(data["succeeded"]) == 2 and sum(data["failed"]) == 4 and sum(data["cancelled"]) == 1
    images = client.get("/api/throughput", params={"pool": "images"}).json()
    assert sum(images["failed"]) == 1


def test_list_filters(client, seeded):
    def ids(**params):
        response = client.get("/api/operations", params=params)
        assert response.status_code == 200, response.text
        return [op["id"] for op in response.json()["operations"]]

    assert sorted(ids(status="FAILED")) == sorted(seeded.ids["FAILED"])
    assert sorted(ids(status="failed,cancelled")) == sorted(seeded.ids["FAILED"] + seeded.ids["CANCELLED"])
    assert ids(status="PROCESSING", pool="images") == seeded.ids["PROCESSING"]
    assert sorted(ids(trigger="render_rendition", status="FAILED")) == seeded.ids["FAILED"][:2]
    assert sorted(ids(error="DISK")) == seeded.ids["FAILED"][:2]  # a substring, any case
    assert ids(id=str(seeded.ids["WAIT"][0])) == seeded.ids["WAIT"]
    everything = ids(limit="500")
    assert everything == sorted(everything, reverse=True) and len(everything) == 11
    assert ids(since="1h") == everything and ids(until="1h") == []
    assert ids(since="2999-01-01T00:00:00") == []


def test_keyset_paging_walks_every_row_once(client, seeded):
    seen, before = [], None
    for _ in range(20):
        params = {"limit": "3", **({"before": str(before)} if before else {})}
        page = client.get("/api/operations", params=params).json()
        seen += [op["id"] for op in page["operations"]]
        before = page["older"]
        if before is None:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) == 11
    html = client.get("/operations", params={"limit": "3"}).text
    assert 'id="older"' in html


def test_one_operation_with_its_attempts(client, conn, seeded):
    op_id = seeded.ids["FAILED"][-1]
    data = client.get(f"/api/operations/{op_id}").json()
    assert data["status"] == "FAILED" and data["attempts"] == 2
    assert [a["error"] for a in data["history"]] == ["ValueError: first try", "ValueError: second try"]
    assert len(data["history"]) == len(attempts(conn, op_id))
    page = client.get(f"/operations/{op_id}").text
    assert "ValueError: first try" in page and "ValueError: second try" in page and "w-2" in page
    traced = client.get(f"/operations/{seeded.ids['FAILED'][0]}").text
    assert "Traceback (most recent call last)" in traced
    success = client.get(f"/operations/{seeded.ids['SUCCESS'][0]}").text
    assert "thumbnail" in success and "render_rendition" in success


def test_failed_grouped_by_error(client, seeded):
    groups = client.get("/api/failed").json()["groups"]
    top = groups[0]
    assert (top["count"], top["error"], top["pool"]) == (2, "OSError: disk full", "default")
    assert sum(g["count"] for g in groups) == len(seeded.ids["FAILED"])
    html = client.get("/failed").text
    assert "OSError: disk full" in html and "error=OSError%3A+disk+full" in html


def test_workers_from_the_database_say_so(client, seeded):
    data = client.get("/api/workers").json()
    assert data["source"] == "database"
    assert [(w["worker"], w["operation_id"]) for w in data["busy"]] == [("img-busy", seeded.ids["PROCESSING"][0])]
    assert {"w-1", "w-2", "img-1"} <= {w["worker"] for w in data["recent"]}
    assert "From the database only" in client.get("/").text


def test_workers_from_a_running_scheduler(database_url):
    snap = Snapshot(1, 2, 1, 0, [WorkerView("local-0", "active", False, 7, 0.5, 123)], {})
    with client_for(database_url, snapshot=lambda: snap, local_pool="default") as c:
        data = c.get("/api/workers").json()
        assert (data["source"], data["pending"], data["free"], data["active"]) == ("scheduler", 1, 2, 1)
        assert data["workers"][0]["last_touched_seconds_ago"] == 0.5
        assert 'id="w-free">free 2' in c.get("/").text


def test_schedules_with_their_next_run(database_url, conn):
    schedules = parse_schedules('[{"name": "nightly", "cron": "0 3 * * *", "trigger_function": "noop"}]')
    with client_for(database_url, schedules=schedules) as c:
        [row] = c.get("/api/schedules").json()["schedules"]
        assert row["name"] == "nightly" and row["next_run"].endswith("03:00:00+00:00") and row["last_tick"] is None
        assert "nightly" in c.get("/schedules").text
    with client_for(database_url) as c:
        assert "DAMOPS_PERIODIC" in c.get("/schedules").text


def test_every_page_renders(client, seeded):
    for path in ("/", "/operations", "/failed", "/schedules", "/login", "/partials/operations", "/static/htmx.min.js"):
        response = client.get(path)
        assert response.status_code == 200, path
    headers = client.get("/").headers
    assert "script-src 'self'" in headers["content-security-policy"]


# --- odd input -------------------------------------------------------------------

HOSTILE = '\'; DROP TABLE damops.operations; -- "<b>x</b>" %_\\'


def test_a_hostile_filter_is_only_a_value(client, conn, seeded):
    for name in ("pool", "trigger", "error"):
        response = client.get("/api/operations", params={name: HOSTILE})
        assert response.status_code == 200 and response.json()["operations"] == []
        page = client.get("/operations", params={name: HOSTILE})
        assert page.status_code == 200 and "<b>x</b>" not in page.text and "&lt;b&gt;x&lt;/b&gt;" in page.text
    assert sum(count_by_status(conn).values()) == 11  # the table is still there


def test_scripts_in_inputs_and_errors_are_escaped(client, seeded):
    for op_id in (seeded.ids["NEW"][0], seeded.ids["FAILED"][2]):
        html = client.get(f"/operations/{op_id}").text
        assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    assert "<b>bold</b>" not in client.get("/operations", params={"status": "FAILED"}).text
    assert client.get(f"/api/operations/{seeded.ids['NEW'][0]}").json()["inputs"] == {"html": SCRIPT}


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/api/operations?before=99999999999999999999999", 400, "before must be between"),
        ("/api/operations?before=-1", 400, "before must be between"),
        ("/api/operations?limit=1000000000", 400, "limit must be between"),
        ("/api/operations?limit=ten", 400, "limit must be a whole number"),
        ("/api/operations?status=BOGUS", 400, "unknown status"),
        ("/api/operations?since=yesterday-ish", 400, "neither an ISO-8601 time"),
        ("/api/operations?since=99999999999d", 400, "too long ago"),
        ("/api/operations?id=1%20OR%201=1", 400, "id must be a whole number"),
        ("/api/operations?error=%00", 400, "at most 1000 characters of text"),
        ("/api/operations/abc", 400, "operation id must be a whole number"),
        ("/api/operations/99999999999999999999999", 400, "operation id must be between"),
        ("/api/operations/9223372036854775807", 404, "no operation with id"),
        ("/operations/9223372036854775807", 404, "no operation with id"),
        ("/operations/%3Cscript%3E", 400, "operation id must be a whole number"),
        ("/operations?status=%3Cscript%3E", 400, "unknown status"),
        ("/nowhere", 404, "Not Found"),
    ],
)
def test_bad_input_is_a_clear_4xx(client, path, status, words):
    response = client.get(path)
    assert response.status_code == status, response.text
    assert words in response.text
    assert "Traceback" not in response.text and "<script>" not in response.text


def test_a_query_that_takes_too_long_is_a_503_saying_so(database_url, seeded):
    # Another session holds the table: the list's query waits, and its statement timeout ends it.
    with psycopg.connect(database_url) as holder, client_for(database_url, statement_timeout_ms=300) as c:
        holder.execute("LOCK TABLE damops.operations IN ACCESS EXCLUSIVE MODE")
        response = c.get("/api/operations", params={"error": "disk"})
        assert response.status_code == 503 and "narrow the filter" in response.json()["error"]
        page = c.get("/operations")
        assert page.status_code == 503 and "narrow the filter" in page.text and "Traceback" not in page.text
        holder.rollback()
        assert c.get("/api/operations").status_code == 200


def test_the_biggest_page_number_is_just_empty(client, seeded):
    response = client.get("/api/operations", params={"before": "1"})
    assert response.status_code == 200 and response.json() == {"operations": [], "older": None, "filter": {}}
    assert client.get("/api/operations", params={"before": str(2**63 - 1)}).json()["operations"]


# --- actions through the API ----------------------------------------------------------


def test_read_only_without_a_token(client, conn, seeded):
    op_id = seeded.ids["FAILED"][0]
    response = client.post(f"/api/operations/{op_id}/retry", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 403 and "read-only" in response.json()["error"]
    assert client.post(f"/operations/{op_id}/retry", data={"csrf": "x"}).status_code == 403
    assert _status(conn, op_id) == "FAILED"


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic czNjcmV0LXRva2Vu", f"Bearer {TOKEN}x"])
def test_api_actions_need_the_token(acting, conn, seeded, header):
    op_id = seeded.ids["FAILED"][0]
    headers = {"Authorization": header} if header else {}
    response = acting.post(f"/api/operations/{op_id}/retry", headers=headers)
    assert response.status_code == 401 and "Bearer" in response.json()["error"]
    assert _status(conn, op_id) == "FAILED"


def test_api_retry_and_cancel(acting, conn, seeded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    failed = seeded.ids["FAILED"][0]
    response = acting.post(f"/api/operations/{failed}/retry", headers=auth)
    assert response.status_code == 200 and response.json()["ids"] == [failed]
    assert _status(conn, failed) == "NEW" and len(attempts(conn, failed)) == 1  # history stays
    success = seeded.ids["SUCCESS"][0]
    response = acting.post(f"/api/operations/{success}/retry", headers=auth)
    assert response.status_code == 409 and "SUCCESS" in response.json()["message"]
    assert acting.post("/api/operations/9223372036854775807/retry", headers=auth).status_code == 404

    new = seeded.ids["NEW"][0]
    assert acting.post(f"/api/operations/{new}/cancel", headers=auth).status_code == 200
    assert _status(conn, new) == "CANCELLED"
    busy = seeded.ids["PROCESSING"][0]
    response = acting.post(f"/api/operations/{busy}/cancel", headers=auth)
    assert response.status_code == 200 and "told to stop" in response.json()["message"]
    assert get(conn, busy).cancel_requested is not None  # type: ignore[union-attr]
    response = acting.post(f"/api/operations/{success}/cancel", headers=auth)
    assert response.status_code == 409 and "already SUCCESS" in response.json()["message"]
    assert acting.post("/api/operations/9223372036854775807/cancel", headers=auth).status_code == 404


def test_api_bulk_retry_by_filter_and_purge(acting, conn, seeded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = acting.post("/api/retry", headers=auth, json={"status": "FAILED", "error": "disk full"})
    assert response.status_code == 200 and sorted(response.json()["ids"]) == seeded.ids["FAILED"][:2]
    assert [_status(conn, i) for i in seeded.ids["FAILED"]] == ["NEW", "NEW", "FAILED", "FAILED"]
    assert acting.post("/api/retry", headers=auth, json={"status": "SUCCESS"}).status_code == 400
    assert acting.post("/api/retry", headers=auth, content=b"[1, 2]").status_code == 400

    for bad in ({"status": "NEW", "older_than": "1s"}, {"status": "SUCCESS", "older_than": "soon"}, {}):
        response = acting.post("/api/purge", headers=auth, json=bad)
        assert response.status_code == 400, bad
    conn.execute("UPDATE damops.operations SET finished = now() - interval '2 days' WHERE status = 'SUCCESS'")
    response = acting.post("/api/purge", headers=auth, json={"status": "SUCCESS", "older_than": "1d", "pool": "images"})
    assert response.status_code == 200 and response.json()["message"] == "deleted 1 SUCCESS operation(s)"
    assert get(conn, seeded.ids["SUCCESS"][1]) is None and get(conn, seeded.ids["SUCCESS"][0]) is not None


# --- actions through the pages: login, CSRF, Origin -------------------------------------------


def _login(c: TestClient) -> str:
    response = c.post("/login", data={"token": TOKEN}, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = c.get("/operations").text
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert match, "a logged-in page carries a CSRF token"
    return match.group(1)


def test_login_with_a_wrong_token_is_refused(acting):
    response = acting.post("/login", data={"token": "nope"}, headers={"Origin": ORIGIN})
    assert response.status_code == 403 and "not the token" in response.text
    response = acting.post("/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert response.status_code == 403 and "damops_session" not in response.headers.get("set-cookie", "")


def test_page_actions_need_login_csrf_and_our_origin(acting, conn, seeded):
    op_id = seeded.ids["FAILED"][0]
    url = f"/operations/{op_id}/retry"
    response = acting.post(url, data={"csrf": "x"}, headers={"Origin": ORIGIN})
    assert response.status_code == 403 and "log in first" in response.text
    csrf = _login(acting)
    assert acting.post(url, data={}, headers={"Origin": ORIGIN}).status_code == 403
    assert acting.post(url, data={"csrf": "0" * 64}, headers={"Origin": ORIGIN}).status_code == 403
    response = acting.post(url, data={"csrf": csrf}, headers={"Origin": "http://evil.example"})
    assert response.status_code == 403 and "Origin" in response.text
    assert acting.post(url, data={"csrf": csrf}).status_code == 403  # neither Origin nor Referer
    assert _status(conn, op_id) == "FAILED"
    response = acting.post(url, data={"csrf": csrf}, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/operations/{op_id}?done=retried"
    assert _status(conn, op_id) == "NEW"
    response = acting.post(url, data={"csrf": csrf}, headers={"Referer": f"{ORIGIN}/operations/{op_id}"})
    assert response.status_code == 409 and "only FAILED or CANCELLED" in response.text

    new = seeded.ids["NEW"][0]
    cancel = acting.post(f"/operations/{new}/cancel", data={"csrf": csrf}, headers={"Origin": ORIGIN})
    assert cancel.status_code == 200 and _status(conn, new) == "CANCELLED"
    bulk = acting.post("/actions/retry", data={"csrf": csrf, "status": "FAILED"}, headers={"Origin": ORIGIN})
    assert bulk.status_code == 200 and "3 operation(s) back to NEW" in bulk.text
    logout = acting.post("/logout", data={"csrf": csrf}, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert logout.status_code == 303
    assert acting.post(url, data={"csrf": csrf}, headers={"Origin": ORIGIN}).status_code == 403


def test_purge_from_the_page(acting, conn, seeded):
    csrf = _login(acting)
    headers = {"Origin": ORIGIN}
    bad = acting.post("/actions/purge", data={"csrf": csrf, "status": "NEW", "older_than": "1d"}, headers=headers)
    assert bad.status_code == 400 and "purge needs one status" in bad.text
    assert (
        acting.post("/actions/purge", data={"status": "SUCCESS", "older_than": "1d"}, headers=headers).status_code
        == 403
    )
    conn.execute("UPDATE damops.operations SET finished = now() - interval '2 days' WHERE status = 'CANCELLED'")
    done = acting.post(
        "/actions/purge", data={"csrf": csrf, "status": "CANCELLED", "older_than": "1d"}, headers=headers
    )
    assert done.status_code == 200 and "deleted 1 CANCELLED operation(s)" in done.text
    assert get(conn, seeded.ids["CANCELLED"][0]) is None


def test_a_forged_session_cookie_is_not_a_login(acting, seeded):
    acting.cookies.set("damops_session", "9999999999.abcd.0123")
    page = acting.get("/operations").text
    assert 'name="csrf"' not in page and "log in to act" in page


# --- the commands: damops ui, damops run --ui ---------------------------------------------------


def _damops(database_url: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, DATABASE_URL=database_url, WORKER_COUNT="1")
    env.pop("DAMOPS_UI_TOKEN", None)
    env.pop("DAMOPS_PERIODIC", None)
    return subprocess.Popen(
        [sys.executable, "-m", "damops", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _get_until(url: str, ok, timeout: float = 60.0) -> dict:
    """GET ``url`` until ``ok(json)``; the last answer on timeout is in the failure."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                last = json.loads(response.read())
            if ok(last):
                return last
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered as expected; last: {last}")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_damops_ui_serves_and_refuses_a_bad_address(database_url, seeded):
    port = _port()
    proc = _damops(database_url, "ui", "--port", str(port))
    try:
        assert _get_until(f"http://127.0.0.1:{port}/healthz", lambda d: d == {"ok": True})
        data = _get_until(f"http://127.0.0.1:{port}/api/stats", lambda d: bool(d["pools"]))
        assert {p["pool"] for p in data["pools"]} == {"default", "images"}
        taken = _damops(database_url, "ui", "--port", str(port))
        out, _ = taken.communicate(timeout=60)
        assert taken.returncode == 2 and "cannot listen on 127.0.0.1" in out and "Traceback" not in out
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out and "read-only" in out


def test_damops_ui_without_the_schema_says_so(server_url):
    proc = _damops(server_url, "ui", "--port", str(_port()))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "damops db migrate" in out and "Traceback" not in out


def test_damops_run_ui_shows_the_schedulers_own_workers(database_url):
    port = _port()
    proc = _damops(database_url, "run", "--ui", f"127.0.0.1:{port}")
    try:
        data = _get_until(f"http://127.0.0.1:{port}/api/workers", lambda d: d.get("free") == 1)
        assert data["source"] == "scheduler" and data["pool"] == "default" and len(data["workers"]) == 1
        assert data["workers"][0]["last_touched_seconds_ago"] >= 0
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"dashboard at http://127.0.0.1:{port}/" in out


def test_vendored_assets_are_the_pinned_ones():
    """static/VERSIONS names each vendored file with its npm package, version and sha256."""
    import hashlib
    from pathlib import Path

    import damops.ui

    static = Path(damops.ui.__file__).parent / "static"
    pinned = re.findall(
        r"^(\S+)\s+(\S+@\d+\.\d+\.\d+)\s+\(\S+\)\s+sha256 ([0-9a-f]{64})$", (static / "VERSIONS").read_text(), re.M
    )
    assert {name for name, _, _ in pinned} == {"htmx.min.js", "uPlot.iife.min.js", "uPlot.min.css"}
    for name, _, digest in pinned:
        assert hashlib.sha256((static / name).read_bytes()).hexdigest() == digest, name
