"""One bad operation never stops a pool (the numbered findings of the reliability review).

Each case ends the bad operation in a final state with an error naming the
cause, and an ordinary operation on the same pool (the same single worker,
where it matters) succeeds after it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from damops import protocol
from damops.local import LocalSupervisor, abandoned_by_dead_run, restart_delay
from damops.operations import enqueue
from damops.scheduler import Scheduler
from tests.support.engine import SECRET, row, running_engine, settings, wait_final, wait_until

HOSTILE = "tests.support.hostile"


def _insert_raw(conn: psycopg.Connection, trigger_function: str, inputs_json: str) -> int:
    """Plain SQL, as any application could: no validation by enqueue()."""
    return conn.execute(
        "INSERT INTO damops.operations (trigger_function, inputs, max_attempts) VALUES (%s, %s::jsonb, 1) RETURNING id",
        (trigger_function, inputs_json),
    ).fetchone()[0]


# --- 1, 6: what a trigger function returns or raises ---------------------------------


@pytest.mark.parametrize(
    "value, named",
    [
        ("nul", "NUL"),
        ("nested_nul", "NUL"),
        ("surrogate", "surrogate"),
        ("nan", "nan"),
        ("nested_nan", "inf"),
        ("huge_int", "too large"),
        ("deep", "nested deeper"),
        ("set", "set"),
    ],
)
def test_a_result_that_cannot_travel_fails_its_operation_and_the_worker_goes_on(database_url, value, named):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)) as engine:
            pids = engine.worker_pids()
            with psycopg.connect(database_url) as conn:
                bad = enqueue(conn, f"{HOSTILE}:returns", {"value": value}, max_attempts=1)
                after = enqueue(conn, f"{HOSTILE}:pid")
            final = await wait_final(database_url, [bad, after], timeout=60)
            return final, pids, row(database_url, after)["result"]["pid"]

    final, pids, served_by = asyncio.run(scenario())
    bad_row = row(database_url, min(final))
    assert final[min(final)] == "FAILED" and named in bad_row["error"], bad_row["error"]
    assert "not JSON-serializable" in bad_row["error"]
    assert final[max(final)] == "SUCCESS"
    assert served_by in pids  # the same worker process: it did not crash


def test_errors_and_wait_reasons_with_nul_or_surrogates_are_stored_cleaned(database_url):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)) as engine:
            pids = engine.worker_pids()
            with psycopg.connect(database_url) as conn:
                raised = enqueue(conn, f"{HOSTILE}:raises_nul", max_attempts=1)
                waited = enqueue(conn, f"{HOSTILE}:waits_with_nul")
                exited = enqueue(conn, f"{HOSTILE}:exits", max_attempts=1)
                unprintable = enqueue(conn, f"{HOSTILE}:raises_unprintable", max_attempts=1)
                after = enqueue(conn, f"{HOSTILE}:pid")
            await wait_final(database_url, [raised, exited, unprintable, after], timeout=60)
            await wait_until(lambda: row(database_url, waited)["status"] == "WAIT", 30, "the WAIT to be stored")
            return raised, waited, exited, unprintable, after, pids

    raised, waited, exited, unprintable, after, pids = asyncio.run(scenario())
    raised_row = row(database_url, raised)
    assert raised_row["status"] == "FAILED"
    assert raised_row["error"].startswith("ValueError: bad byte \\0 and a lone ? surrogate"), raised_row["error"]
    assert row(database_url, waited)["error"] == "waiting for \\0"
    assert row(database_url, exited)["error"] == "SystemExit: 3"
    assert row(database_url, unprintable)["error"] == "_Unprintable: <its message could not be printed>"
    assert row(database_url, after)["status"] == "SUCCESS" and row(database_url, after)["result"]["pid"] in pids


# --- 2: inputs the table accepts but no frame can carry ----------------------------------


@pytest.mark.parametrize("depth", [100, 300, 5000])
def test_inputs_nested_too_deep_fail_that_operation_and_the_next_one_runs(database_url, depth):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)):
            with psycopg.connect(database_url, autocommit=True) as conn:
                bad = _insert_raw(conn, "noop", "[" * depth + "]" * depth)
                after = enqueue(conn, "noop")
            return await wait_final(database_url, [bad, after], timeout=60), bad, after

    final, bad, after = asyncio.run(scenario())
    assert final == {bad: "FAILED", after: "SUCCESS"}
    with psycopg.connect(database_url) as conn:  # not inputs: the test's own parser would choke on them
        error, attempts = conn.execute("SELECT error, attempts FROM damops.operations WHERE id = %s", (bad,)).fetchone()
    assert error.startswith("inputs cannot be sent to a worker:") and "nested" in error, error
    assert attempts == 1


# --- 10: who may run what -------------------------------------------------------------------


def test_module_paths_outside_the_allow_list_never_run(database_url, tmp_path):
    marker = tmp_path / "pwned"

    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)):
            with psycopg.connect(database_url) as conn:
                shell = enqueue(conn, "os:system", f"touch {marker}")
                chr_ = enqueue(conn, "builtins:chr", 0)
                after = enqueue(conn, "noop")
            return await wait_final(database_url, [shell, chr_, after]), shell, chr_

    final, shell, chr_ = asyncio.run(scenario())
    assert not marker.exists()
    for op_id in (shell, chr_):
        failed = row(database_url, op_id)
        assert failed["status"] == "FAILED" and failed["attempts"] == 1
        assert "not allowed" in failed["error"] and "DAMOPS_ALLOWED_TRIGGERS" in failed["error"]
    assert sorted(final.values()) == ["FAILED", "FAILED", "SUCCESS"]


def test_a_trigger_module_that_raises_at_import_fails_its_operations(database_url, tmp_path, monkeypatch):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "syntax.py").write_text("def f(:\n")
    (package / "raises.py").write_text("raise RuntimeError('no config at import')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]]))
    monkeypatch.setenv("DAMOPS_ALLOWED_TRIGGERS", f"{os.environ['DAMOPS_ALLOWED_TRIGGERS']},brokenpkg")

    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)) as engine:
            pids = engine.worker_pids()
            with psycopg.connect(database_url) as conn:
                ids = [enqueue(conn, "brokenpkg.syntax:f"), enqueue(conn, "brokenpkg.raises:f"), enqueue(conn, "noop")]
            await wait_final(database_url, ids)
            return ids, pids, engine.worker_pids()

    ids, before, after = asyncio.run(scenario())
    syntax, raises, ok = (row(database_url, i) for i in ids)
    assert syntax["status"] == "FAILED" and "SyntaxError" in syntax["error"] and syntax["attempts"] == 1
    assert raises["status"] == "FAILED" and "RuntimeError: no config at import" in raises["error"]
    assert ok["status"] == "SUCCESS" and before == after  # no worker restarted


# --- 3: children die with damops run; a new run recovers what it left -----------------------


def _children_of(run_pid: int) -> set[int]:
    """Processes started by that damops run (they carry DAMOPS_PARENT_PID)."""
    found = set()
    needle = f"DAMOPS_PARENT_PID={run_pid}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _start_run(database_url: str, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        WORKER_COUNT="2",
        SCHEDULER_HEARTBEAT="0.2",
        MAX_OPERATION_PROCESSING_TIME="600",
        HOUSEKEEPING_INTERVAL="600",
    )
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [sys.executable, "-m", "damops", "run"], env=env, stdout=log, stderr=log, start_new_session=True
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the children")
def test_kill_9_of_damops_run_leaves_no_child_and_a_new_run_recovers_its_operation(database_url, tmp_path):
    log_file, flag = tmp_path / "executions.log", tmp_path / "started"
    with psycopg.connect(database_url) as conn:
        op_id = enqueue(conn, f"{HOSTILE}:record_then_sleep", {"seconds": 600, "log": str(log_file), "flag": str(flag)})
    first = _start_run(database_url, tmp_path, "first")
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the operation never started"
            time.sleep(0.05)
        children = _children_of(first.pid)
        # 2 sidecars + 2 workers + the zygote they are forked from (damops.children)
        assert int(flag.read_text()) in children and len(children) == 5
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        deadline = time.monotonic() + 30
        while _children_of(first.pid):
            assert time.monotonic() < deadline, f"children survived kill -9: {_children_of(first.pid)}"
            time.sleep(0.05)
    finally:
        if first.poll() is None:
            first.kill()
    assert row(database_url, op_id)["status"] == "PROCESSING"

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE damops.operations SET inputs = inputs || '{\"seconds\": 0}' WHERE id = %s", (op_id,))
    second = _start_run(database_url, tmp_path, "second")
    try:
        deadline = time.monotonic() + 60
        while row(database_url, op_id)["status"] != "SUCCESS":
            assert second.poll() is None, (tmp_path / "second.log").read_text()
            assert time.monotonic() < deadline, "the new run did not recover the operation promptly"
            time.sleep(0.1)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    assert row(database_url, op_id)["attempts"] == 2
    assert "left PROCESSING by a run that died" in (tmp_path / "second.log").read_text()


def test_which_workers_a_dead_run_abandoned():
    dead = {111}
    alive = lambda pid: pid not in dead  # noqa: E731
    assert abandoned_by_dead_run("host-111-w3", "host", alive)
    assert not abandoned_by_dead_run("host-222-w1", "host", alive)  # that run is alive
    assert not abandoned_by_dead_run(f"host-{os.getpid()}-w1", "host", lambda pid: False)  # ourselves
    assert not abandoned_by_dead_run("otherhost-111-w1", "host", alive)
    assert not abandoned_by_dead_run("host-pod-abc", "host", alive)


# --- 4: a database connection lost in the middle of busy cycles -----------------------------


def test_terminated_backends_in_busy_cycles_strand_nothing_and_run_nothing_twice(database_url, tmp_path):
    log_file = tmp_path / "executions.log"
    count = 300

    async def terminate_backends(stop: asyncio.Event) -> int:
        killed = 0
        with psycopg.connect(database_url, autocommit=True) as admin:
            while not stop.is_set():
                killed += admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    "   AND backend_type = 'client backend'"
                ).fetchone()[0]
                await asyncio.sleep(0.03 + (killed % 5) * 0.02)
        return killed

    async def scenario():
        config = settings(worker_count=4, scheduler_heartbeat=0.05, max_operation_processing_time=600)
        async with running_engine(database_url, config, housekeeping=False):
            with psycopg.connect(database_url) as conn:
                ids = [
                    enqueue(conn, f"{HOSTILE}:record_then_sleep", {"seconds": 0.005, "log": str(log_file)})
                    for _ in range(count)
                ]
            stop = asyncio.Event()
            chaos = asyncio.create_task(terminate_backends(stop))
            await wait_until(
                lambda: log_file.exists() and log_file.read_text().count(" end") >= count * 0.8,
                120,
                "most operations to run under chaos",
            )
            stop.set()
            killed = await chaos
            return ids, await wait_final(database_url, ids, timeout=90), killed

    ids, final, killed = asyncio.run(scenario())
    assert killed >= 10
    assert set(final.values()) == {"SUCCESS"}  # nothing stranded PROCESSING, housekeeping off
    starts = collections.Counter(
        int(line.split()[0]) for line in log_file.read_text().splitlines() if line.endswith("start")
    )
    assert sorted(starts) == sorted(ids) and max(starts.values()) == 1


# --- 5: a paused sidecar keeps its lease and its worker -------------------------------------


def test_a_paused_sidecar_does_not_lead_to_a_second_run_nor_drop_its_worker(database_url, tmp_path):
    log_file, flag = tmp_path / "executions.log", tmp_path / "started"
    pause = protocol.HEARTBEAT_TIMEOUT + 3

    async def scenario():
        async with running_engine(database_url, settings(worker_count=1), housekeeping=False) as engine:
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(
                    conn,
                    f"{HOSTILE}:record_then_sleep",
                    {"seconds": pause + 3, "log": str(log_file), "flag": str(flag)},
                )
            await wait_until(flag.exists, 30, "the operation to start")
            [pair] = engine.supervisor.pairs.values()
            worker_pid = pair.worker.pid
            os.kill(pair.sidecar.pid, signal.SIGSTOP)
            try:
                await wait_until(
                    lambda: engine.scheduler.stats.dropped_channels >= 1,
                    pause + 10,
                    "the scheduler to drop the silent channel",
                )
            finally:
                os.kill(pair.sidecar.pid, signal.SIGCONT)
            await wait_final(database_url, [op_id], timeout=60)
            with psycopg.connect(database_url) as conn:
                after = enqueue(conn, f"{HOSTILE}:pid")
            await wait_final(database_url, [after], timeout=30)
            return op_id, after, worker_pid, engine.scheduler.stats

    op_id, after, worker_pid, stats = asyncio.run(scenario())
    lines = log_file.read_text().splitlines()
    assert [line.split()[1] for line in lines if line.endswith("start")] == ["1"], lines  # one run, attempt 1
    done = row(database_url, op_id)
    assert done["status"] == "SUCCESS" and done["attempts"] == 1
    assert row(database_url, after)["result"]["pid"] == worker_pid  # the paused sidecar kept its worker
    assert stats.readopted >= 1


# --- 7: a worker that cannot start backs off --------------------------------------------------


def test_restart_delay_backs_off_exponentially_and_is_capped():
    assert [restart_delay(n) for n in range(1, 6)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert restart_delay(50) == 30.0


def test_a_crash_looping_worker_is_restarted_with_back_off(database_url, caplog):
    starts: list[float] = []

    class CrashingWorkers(LocalSupervisor):
        def _start_worker(self, pair):
            starts.append(time.monotonic())
            pair.worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
            pair.started = time.monotonic()

    async def scenario():
        scheduler = Scheduler(settings(worker_count=1), database_url, secret=SECRET)
        supervisor = CrashingWorkers(scheduler, 1, SECRET, name_prefix="crashloop")
        await scheduler.start()
        await supervisor.start()
        try:
            await wait_until(lambda: len(starts) >= 5, 30, "five starts")
            return supervisor.crash_looping()
        finally:
            await scheduler.stop(grace=0)
            await supervisor.stop()

    with caplog.at_level("WARNING", logger="damops.local"):
        looping = asyncio.run(scenario())
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert looping == ["crashloop-w1"]
    assert sum(gaps[:4]) >= 0.5 + 1.0 + 2.0 - 0.2, gaps  # without back-off: 5 starts in ~1 s
    causes = [r.getMessage() for r in caplog.records if "worker exited (3)" in r.getMessage()]
    assert len(causes) == 1  # the cause is logged once, not once per restart


# --- 8: hostile peers on the sidecar's port ---------------------------------------------------


def test_unauthenticated_peers_cannot_make_the_sidecar_buffer_or_crash(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    env = dict(os.environ, DAMOPS_SECRET=SECRET)
    sidecar = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "damops",
            "sidecar",
            "--name",
            "s1",
            "--socket",
            str(tmp_path / "w.sock"),
            "--listen-fd",
            str(listener.fileno()),
        ],
        pass_fds=(listener.fileno(),),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()

    def connect() -> tuple[socket.socket, dict]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        (length,) = struct.unpack(">I", _read_exactly(sock, 4))
        return sock, json.loads(_read_exactly(sock, length))

    try:
        # A peer announcing a 8 MiB frame before the handshake is dropped at once.
        sock, challenge = connect()
        assert challenge["type"] == "challenge"
        sock.sendall(struct.pack(">I", protocol.DEFAULT_MAX_FRAME_BYTES))
        assert sock.recv(1) == b""  # closed by the sidecar, nothing buffered
        sock.close()
        # A proof that is not ASCII is refused cleanly.
        sock, challenge = connect()
        hello = json.dumps({"type": "hello", "role": "scheduler", "proof": "é" * 64}).encode()
        sock.sendall(struct.pack(">I", len(hello)) + hello)
        assert sock.recv(1) == b""
        sock.close()

        # The sidecar still serves a real scheduler.
        async def real_handshake() -> protocol.Message:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            channel = protocol.Channel(reader, writer)
            await channel.open_handshake(SECRET, "scheduler")
            welcome = await channel.receive()
            await channel.close()
            return welcome

        assert isinstance(asyncio.run(real_handshake()), protocol.Welcome)
        assert sidecar.poll() is None
    finally:
        sidecar.terminate()
        _, stderr = sidecar.communicate(timeout=10)
    assert "exceeds the maximum of 4096 bytes" in stderr and "wrong secret" in stderr
    assert "Traceback" not in stderr


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


# --- 4 (last part), 9: a stop past its grace ------------------------------------------------


def test_a_stop_past_its_grace_kills_the_worker_before_giving_its_operation_back(database_url, tmp_path):
    flag = tmp_path / "started"

    async def scenario():
        config = settings(worker_count=1, shutdown_grace=0.3)
        async with running_engine(database_url, config) as engine:
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, "tests.support.triggers:signal_then_hang", {"flag": str(flag)})
            await wait_until(flag.exists, 30, "the operation to start")
            await engine.scheduler.stop()
            worker_pid = int(flag.read_text())
            gone = not Path(f"/proc/{worker_pid}").exists() or _is_zombie(worker_pid)
            engine.scheduler.stop = _noop_stop  # type: ignore[method-assign] # running_engine stops it again
            return op_id, gone

    op_id, gone = asyncio.run(scenario())
    assert gone  # killed before its operation went back to NEW: it cannot finish it later
    released = row(database_url, op_id)
    assert released["status"] == "NEW" and released["attempts"] == 0


async def _noop_stop(*args, **kwargs) -> None:
    return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


# --- SIGTERM (a pod deleted, a node drained): idle workers go at once, busy ones finish -------


def test_sigterm_lets_a_busy_pair_finish_its_operation_and_an_idle_pair_exit_at_once(database_url, tmp_path):
    log_file, flag = tmp_path / "executions.log", tmp_path / "started"

    async def scenario():
        async with running_engine(database_url, settings(worker_count=2), housekeeping=False) as engine:
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(
                    conn, f"{HOSTILE}:record_then_sleep", {"seconds": 2, "log": str(log_file), "flag": str(flag)}
                )
            await wait_until(flag.exists, 30, "the operation to start")
            busy_pid = int(flag.read_text())
            pairs = list(engine.supervisor.pairs.values())
            busy = next(p for p in pairs if p.worker.pid == busy_pid)
            idle = next(p for p in pairs if p is not busy)
            busy_procs, idle_procs = (busy.worker, busy.sidecar), (idle.worker, idle.sidecar)
            signalled = time.monotonic()
            for process in (*busy_procs, *idle_procs):
                process.send_signal(signal.SIGTERM)
            await wait_until(lambda: all(p.poll() is not None for p in idle_procs), 10, "the idle pair to exit")
            idle_exit = time.monotonic() - signalled
            await wait_until(lambda: all(p.poll() is not None for p in busy_procs), 30, "the busy pair to exit")
            await wait_final(database_url, [op_id], timeout=30)
            return op_id, idle_exit, [p.returncode for p in (*busy_procs, *idle_procs)]

    op_id, idle_exit, codes = asyncio.run(scenario())
    done = row(database_url, op_id)
    assert done["status"] == "SUCCESS" and done["attempts"] == 1  # finished, not interrupted
    assert log_file.read_text().count(" end") == 1
    assert codes == [0, 0, 0, 0]  # clean exits, none killed
    assert idle_exit < 5, idle_exit
