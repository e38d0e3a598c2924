"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium.

Skipped, saying why, where chromium or chromedriver is missing (.ci/run
installs both). Every wait is for a condition, with a generous timeout.
Screenshots go to DAMOPS_SCREENSHOTS when set (docs/screenshots/ holds the
README's), else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import uvicorn

from damops.operations import count_by_status, enqueue, get
from damops.periodic import parse_schedules
from damops.ui.app import create_app
from tests.integration.test_ui_api import TOKEN, _claim, _complete, seed
from tests.support.engine import running_engine, settings, wait_final

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TIMEOUT = 30  # generous: CI shares its two cores
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    if not CHROMIUM or not CHROMEDRIVER:
        reason = "chromium and chromedriver are needed (apt-get install -y chromium chromium-driver)"
        print(f"SKIP browser tests: {reason}")
        pytest.skip(reason)
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP refusals included
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Site:
    def __init__(self, base: str, driver: webdriver.Chrome) -> None:
        self.base = base
        self.driver = driver

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def wait(self, condition, what: str):
        return WebDriverWait(self.driver, TIMEOUT, ignored_exceptions=[StaleElementReferenceException]).until(
            condition, message=f"waiting for {what}"
        )

    def text(self, css: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def login(self) -> None:
        self.open("/login")
        self.driver.find_element(By.ID, "token").send_keys(TOKEN)
        self.driver.find_element(By.ID, "login").click()
        self.wait(EC.presence_of_element_located((By.ID, "logout")), "the login to take")


@pytest.fixture
def site(database_url, browser, tmp_path) -> Iterator[Site]:
    """The dashboard with a token, served by uvicorn on a free port, in a thread."""
    schedules = parse_schedules('[{"name": "nightly-thumbnails", "cron": "0 3 * * *", "trigger_function": "noop"}]')
    app = create_app(database_url, token=TOKEN, schedules=schedules)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        WebDriverWait(None, TIMEOUT).until(lambda _: server.started, message="the dashboard to listen")
        s = Site(f"http://127.0.0.1:{port}", browser)
        s.open("/healthz")
        browser.delete_all_cookies()  # a session of an earlier test's dashboard (same host) is not carried over
        yield s
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


def shots() -> Path | None:
    where = os.environ.get("DAMOPS_SCREENSHOTS")
    return Path(where) if where else None


def screenshot(site: Site, name: str, tmp_path: Path) -> None:
    folder = shots() or tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    assert site.driver.save_screenshot(str(path)) and path.stat().st_size > 10_000


def history(conn: psycopg.Connection) -> None:
    """Finished operations spread over the last hour, so the chart has a shape."""
    conn.execute(
        """
        INSERT INTO damops.operations (trigger_function, pool, status, attempts, inputs, result, error,
                                       created, updated, started, finished, last_worker)
        SELECT CASE WHEN i % 3 = 0 THEN 'render_rendition' ELSE 'noop' END,
               CASE WHEN i % 4 = 0 THEN 'images' ELSE 'default' END,
               CASE WHEN i % 11 = 0 THEN 'FAILED' ELSE 'SUCCESS' END, 1, jsonb_build_object('i', i),
               CASE WHEN i % 11 = 0 THEN NULL ELSE '{"ok": true}'::jsonb END,
               CASE WHEN i % 11 = 0 THEN 'TimeoutError: object store did not answer in 30s' END,
               t - interval '2 seconds', t, t - interval '1 second', t, 'local-' || (i % 4)
        FROM generate_series(1, 600) AS i,
             LATERAL (SELECT now() - (i * 5.9 || ' seconds')::interval * (0.6 + 0.4 * sin(i / 40.0)) AS t) AS x
        """
    )


def overview_cells(site: Site) -> dict[str, dict[str, int]]:
    cells: dict[str, dict[str, int]] = {}
    for row in site.driver.find_elements(By.CSS_SELECTOR, "table.pools tbody tr"):
        pool = row.get_attribute("data-pool")
        cells[pool] = {
            c.get_attribute("data-status"): int(c.text) for c in row.find_elements(By.CSS_SELECTOR, "td[data-status]")
        }
    return cells


def test_overview_numbers_match_the_database_and_refresh_by_themselves(site, conn, tmp_path):
    seed(conn)
    history(conn)
    site.open("/")
    site.wait(lambda d: d.find_element(By.ID, "throughput").get_attribute("data-ready") == "1", "the chart")
    expected = {pool: count_by_status(conn, pool) for pool in ("default", "images")}
    assert overview_cells(site) == expected
    errors = [e["message"] for e in site.driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], "the page runs without console errors (a script the CSP refused would be one)"
    screenshot(site, "overview", tmp_path)

    # A marker on the page's window survives a partial refresh, not a reload.
    site.driver.execute_script("window.damopsMarker = 42")
    for _ in range(3):
        enqueue(conn, "noop", {})
    expected["default"]["NEW"] += 3
    site.wait(lambda d: overview_cells(site) == expected, "the overview to show the 3 new operations")
    assert site.driver.execute_script("return window.damopsMarker") == 42


def test_filter_the_list_and_open_an_operation(site, conn, tmp_path):
    seeded = seed(conn)
    history(conn)
    site.open("/operations")
    Select(site.driver.find_element(By.ID, "f-status")).select_by_value("FAILED")
    site.driver.find_element(By.ID, "f-pool").send_keys("default")
    site.driver.find_element(By.ID, "f-error").send_keys("disk")
    site.driver.find_element(By.ID, "f-apply").click()
    site.wait(lambda d: "error=disk" in d.current_url, "the filtered list")
    rows = site.driver.find_elements(By.CSS_SELECTOR, "#ops-table tbody tr[data-id]")
    assert sorted(int(r.get_attribute("data-id")) for r in rows) == seeded.ids["FAILED"][:2]
    assert all("FAILED" in r.text for r in rows)
    screenshot(site, "operations-filtered", tmp_path)

    site.open("/operations?status=FAILED&trigger=flaky")
    target = seeded.ids["FAILED"][-1]
    site.driver.find_element(By.CSS_SELECTOR, f'tr[data-id="{target}"] a').click()
    site.wait(EC.url_contains(f"/operations/{target}"), "the operation page")
    site.wait(EC.text_to_be_present_in_element((By.ID, "op-status"), "FAILED"), "its status")
    page = site.driver.find_element(By.TAG_NAME, "main").text
    assert "ValueError: first try" in page and "ValueError: second try" in page and "flaky" in page
    screenshot(site, "operation", tmp_path)

    site.open("/failed")
    assert "TimeoutError: object store" in site.text("#failed-groups")
    screenshot(site, "failed", tmp_path)


def test_an_action_without_the_token_is_refused(site, conn):
    seeded = seed(conn)
    op_id = seeded.ids["FAILED"][0]
    site.open(f"/operations/{op_id}")
    assert not site.driver.find_elements(By.ID, "retry")  # not logged in: no button
    status = site.driver.execute_script(
        "const r = await fetch(arguments[0], {method: 'POST'}); return r.status;", f"/api/operations/{op_id}/retry"
    )
    assert status == 401
    # A hand-made form from the page itself: still refused without a login.
    site.driver.execute_script(
        "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
        "document.body.appendChild(f); f.submit();",
        f"/operations/{op_id}/retry",
    )
    site.wait(EC.text_to_be_present_in_element((By.ID, "error-message"), "log in first"), "the refusal")
    assert get(conn, op_id).status == "FAILED"  # type: ignore[union-attr]

    site.open("/login")
    site.driver.find_element(By.ID, "token").send_keys("not-the-token")
    site.driver.find_element(By.ID, "login").click()
    site.wait(EC.text_to_be_present_in_element((By.ID, "refused"), "not the token"), "the wrong token refused")


def test_retry_a_failed_operation_and_see_it_succeed(site, conn, database_url, tmp_path):
    op_id = enqueue(conn, "noop", {"from": "the browser test"}, pool="browser", max_attempts=1)
    _complete(conn, _claim(conn, op_id, "w-gone", "browser"), "failure", error="ConnectionError: storage was down")
    site.login()
    site.open(f"/operations/{op_id}")
    site.driver.find_element(By.ID, "retry").click()
    site.wait(EC.alert_is_present(), "the confirmation").accept()
    site.wait(EC.text_to_be_present_in_element((By.ID, "notice"), "Retried"), "the retry")
    site.wait(EC.text_to_be_present_in_element((By.ID, "op-status"), "NEW"), "NEW on the page")
    assert get(conn, op_id).status == "NEW"  # type: ignore[union-attr]

    async def run_it() -> dict[int, str]:
        async with running_engine(database_url, settings(pool="browser", worker_count=1)):
            return await wait_final(database_url, [op_id])

    assert asyncio.run(run_it()) == {op_id: "SUCCESS"}
    # The page refreshes itself: no reload.
    site.wait(EC.text_to_be_present_in_element((By.ID, "op-status"), "SUCCESS"), "SUCCESS on the page")
    text = site.driver.find_element(By.TAG_NAME, "main").text
    assert "ConnectionError: storage was down" in text  # the failed attempt stays in the history
    assert re.search(r"#1 success", text)
    screenshot(site, "operation-retried", tmp_path)


def test_beside_a_running_scheduler_the_workers_are_its_own(browser, database_url, conn, tmp_path):
    """As `damops run --ui` serves it: on the engine's own event loop, the browser's calls in a thread."""
    from damops.ui.server import start_beside, stop_beside

    history(conn)
    port = _free_port()
    site = Site(f"http://127.0.0.1:{port}", browser)

    def look() -> None:
        site.open("/")
        site.wait(EC.text_to_be_present_in_element((By.ID, "w-free"), "free 2"), "two free workers")
        site.wait(lambda d: d.find_element(By.ID, "throughput").get_attribute("data-ready") == "1", "the chart")
        assert "From the running scheduler of pool default" in site.text("#overview")
        assert len(site.driver.find_elements(By.CSS_SELECTOR, "#overview table")) == 2
        screenshot(site, "overview-local", tmp_path)

    async def body() -> None:
        async with running_engine(database_url, settings(worker_count=2)) as engine:
            app = create_app(database_url, snapshot=engine.scheduler.snapshot, local_pool=engine.scheduler.pool)
            server, task = await start_beside(app, "127.0.0.1", port)
            try:
                await asyncio.to_thread(look)
            finally:
                await stop_beside(server, task)

    asyncio.run(body())
