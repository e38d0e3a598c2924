"""`damops run` as a person runs it: signals in every phase, a closed pipe,
the demo's progress counting its own batch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest


def start(database_url, *args, **env):
    environment = dict(os.environ, DATABASE_URL=database_url, WORKER_COUNT="2", RETRY_BACKOFF_BASE="100ms")
    environment.pop("DAMOPS_PERIODIC", None)
    environment.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "damops", "run", *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_exit(process, timeout=30.0):
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"damops run did not stop within {timeout}s")


def read_until(process, pattern, timeout=60.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    pytest.fail(f"no line matching {pattern!r} in {seen!r}")


def test_run_says_which_database_it_uses(database_url):
    process = start(database_url)
    try:
        lines = read_until(process, r"damops run: database")
        assert "(DATABASE_URL)" in lines[-1]
        read_until(process, r"workers pre-heated")
        process.send_signal(signal.SIGINT)
        assert wait_exit(process) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_pre_heating_stops_it(database_url, sig):
    process = start(database_url, WORKER_COUNT="4")
    read_until(process, r"damops run: database")  # pre-heating starts right after
    process.send_signal(sig)
    assert wait_exit(process, 30) == 0


def test_sigterm_stops_it_when_its_output_pipe_is_closed(database_url):
    """`damops run 2>&1 | head -1`: the reader goes away after one line."""
    process = start(database_url)
    process.stdout.readline()
    process.stdout.close()  # like head exiting
    time.sleep(0.5)  # let it log into the closed pipe (this is the condition under test, not a wait)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    wait_exit(process, 30)
    assert time.monotonic() - started < 30


def test_demo_counts_its_own_batch_each_run(database_url):
    outputs = []
    for _ in range(2):
        process = start(database_url, "--demo", "--demo-count", "6")
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, out
        outputs.append(out)
    for out in outputs:
        progress = [line for line in out.splitlines() if re.match(r"^\d+/\d+ ", line)]
        assert progress and progress[-1].startswith("8/8 "), out
        assert "done: FAILED 2, SUCCESS 6" in out
        failures = re.findall(r"FAILED #(\d+)", out)
        assert len(failures) == 2
    first_ids = {int(i) for i in re.findall(r"FAILED #(\d+)", outputs[0])}
    second_ids = {int(i) for i in re.findall(r"FAILED #(\d+)", outputs[1])}
    assert min(second_ids) > max(first_ids)  # the second run lists only its own failures


def test_an_unreachable_database_is_one_line(tmp_path):
    process = start("postgresql://nobody@127.0.0.1:1/db")
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 2, out
    assert "Traceback" not in out
    assert "damops run: cannot connect to the database at" in out and "127.0.0.1" in out


@pytest.mark.parametrize("pool", ["", "p" * 64, "two words"])
def test_a_pool_no_scheduler_can_serve_stops_start_up(database_url, pool):
    process = start(database_url, DAMOPS_POOL=pool)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 2, out
    assert "invalid configuration: DAMOPS_POOL=" in out and "Traceback" not in out


def test_a_clean_stop_logs_no_warning(database_url):
    """Stopping idle workers is routine: their sidecars must not warn about the dropped connections."""
    process = start(database_url, WORKER_COUNT="4")
    try:
        read_until(process, r"workers pre-heated")
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert [line for line in out.splitlines() if "WARNING" in line or "ERROR" in line] == [], out
    finally:
        if process.poll() is None:
            process.kill()
