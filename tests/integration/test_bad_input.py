"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys

import psycopg
import pytest

from damops import protocol
from damops.operations import enqueue
from tests.support.engine import (
    SECRET,
    enqueue_in_thread,
    fetch_row,
    row,
    running_engine,
    settings,
    wait_final,
    wait_until,
    wait_until_db,
)
from tests.support.procs import SidecarProcess


def test_unknown_trigger_function_fails_with_its_name(database_url):
    async def scenario():
        async with running_engine(database_url):
            with psycopg.connect(database_url) as conn:
                ids = [
                    enqueue(conn, "no_such_function"),
                    enqueue(conn, "tests.support.no_such_module:fn"),
                    enqueue(conn, "damops.examples:missing"),
                ]
            await wait_final(database_url, ids)
            return ids

    ids = asyncio.run(scenario())
    errors = [row(database_url, i) for i in ids]
    assert all(r["status"] == "FAILED" and r["attempts"] == 1 for r in errors)  # not retried
    assert errors[0]["error"] == "unknown trigger function 'no_such_function'"
    assert errors[1]["error"].startswith("unknown trigger function 'tests.support.no_such_module:fn' (cannot import")
    assert errors[2]["error"].startswith("unknown trigger function 'damops.examples:missing'")


def test_raising_trigger_function_is_retried_then_fails_with_type_and_message(database_url):
    async def scenario():
        async with running_engine(database_url):
            with psycopg.connect(database_url) as conn:
                flaky = enqueue(conn, "flaky", {"succeed_on": 3}, max_attempts=3)
                failing = enqueue(conn, "fail", {"message": "disk full"}, max_attempts=2)
            await wait_final(database_url, [flaky, failing])
            return flaky, failing

    flaky, failing = asyncio.run(scenario())
    assert row(database_url, flaky)["status"] == "SUCCESS"
    assert row(database_url, flaky)["result"] == {"attempt": 3}
    failed = row(database_url, failing)
    assert failed["status"] == "FAILED" and failed["attempts"] == 2
    assert failed["error"] == "RuntimeError: disk full"


def test_result_that_is_not_json_fails_saying_so(database_url):
    async def scenario():
        async with running_engine(database_url):
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, "not_serializable")
            await wait_final(database_url, [op_id])
            return op_id

    failed = row(database_url, asyncio.run(scenario()))
    assert failed["status"] == "FAILED" and failed["attempts"] == 1
    assert "not JSON-serializable" in failed["error"] and "not_serializable" in failed["error"]


def test_result_larger_than_a_frame_fails_the_operation_not_the_channel(database_url):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)) as engine:
            pids = engine.worker_pids()
            with psycopg.connect(database_url) as conn:
                big = enqueue(
                    conn, "tests.support.triggers:big_result", {"bytes": protocol.DEFAULT_MAX_FRAME_BYTES + 10}
                )
                after = enqueue(conn, "noop")
            await wait_final(database_url, [big, after])
            assert engine.worker_pids() == pids  # the same worker carried on
            return big, after

    big, after = asyncio.run(scenario())
    assert row(database_url, big)["status"] == "FAILED"
    assert "result too large" in row(database_url, big)["error"]
    assert row(database_url, after)["status"] == "SUCCESS"


def test_inputs_that_are_not_json_are_refused_at_enqueue(conn):
    with pytest.raises(ValueError, match="not JSON-serializable"):
        enqueue(conn, "noop", {"when": object()})
    with pytest.raises(ValueError, match="trigger_function"):
        enqueue(conn, "", {})
    assert conn.execute("SELECT count(*) FROM damops.operations").fetchone()[0] == 0


async def _raw_connect(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return protocol.Channel(reader, writer)


async def _expect_closed(channel: protocol.Channel):
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        while True:
            await asyncio.wait_for(channel.reader.readexactly(1), 30)


def _first_pair(engine):
    return next(iter(engine.supervisor.pairs.values()))


def test_wrong_secret_malformed_and_oversized_frames_drop_only_that_connection(database_url):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)) as engine:
            pair = _first_pair(engine)
            sidecar_pid = pair.sidecar.pid
            # 1. wrong secret on the sidecar's TCP port
            intruder = await _raw_connect(pair.port)
            challenge = await intruder.receive()
            await intruder.send(protocol.Hello(role="scheduler", proof=protocol.make_proof("wrong", challenge.nonce)))
            await _expect_closed(intruder)
            # 2. malformed frame
            garbage = await _raw_connect(pair.port)
            await garbage.receive()
            garbage.writer.write(struct.pack(">I", 9) + b"not json!")
            await _expect_closed(garbage)
            # 3. oversized frame (only the header is needed)
            huge = await _raw_connect(pair.port)
            await huge.receive()
            huge.writer.write(struct.pack(">I", protocol.DEFAULT_MAX_FRAME_BYTES + 1))
            await _expect_closed(huge)
            # 4. wrong secret on the worker's Unix socket
            reader, writer = await asyncio.open_unix_connection(pair.socket_path)
            fake_worker = protocol.Channel(reader, writer)
            challenge = await fake_worker.receive()
            await fake_worker.send(protocol.Hello(role="worker", proof=protocol.make_proof("bad", challenge.nonce)))
            await _expect_closed(fake_worker)
            # Everything else keeps running: same sidecar process, operations still flow.
            assert pair.sidecar.poll() is None and pair.sidecar.pid == sidecar_pid
            with psycopg.connect(database_url) as conn:
                op_id = enqueue(conn, "noop")
            await wait_final(database_url, [op_id])
            return op_id

    assert row(database_url, asyncio.run(scenario()))["status"] == "SUCCESS"


def test_worker_process_dying_mid_operation_is_replaced_and_its_operation_retried(database_url, tmp_path):
    async def scenario():
        async with running_engine(database_url, settings(worker_count=1)) as engine:
            pair = _first_pair(engine)
            flag = tmp_path / "running"
            op_id = await enqueue_in_thread(
                database_url, "tests.support.triggers:signal_then_hang", {"flag": str(flag)}, max_attempts=2
            )
            await wait_until(flag.exists, 20, "the operation to start")
            first_worker = pair.worker.pid
            pair.worker.kill()
            await wait_until_db(lambda: row(database_url, op_id)["attempts"] == 2, 30, "the operation to be retried")
            assert pair.worker.pid != first_worker
            return await fetch_row(database_url, op_id)

    retried = asyncio.run(scenario())
    assert retried["status"] == "PROCESSING"  # running again, on the new worker
    assert "worker process lost" in (retried["error"] or "")


def test_bad_frame_from_a_worker_drops_it_and_recovers_its_operation(database_url, tmp_path):
    """A real sidecar and scheduler; the worker is a fake, because a real worker
    cannot be made to send a malformed frame: it takes an operation, then
    sends garbage. Its connection is dropped and the operation recovered."""
    from damops.scheduler import Scheduler

    # We bind the sidecar's port and pass the socket: no free-port race.
    sidecar = SidecarProcess("fault-w1", str(tmp_path / "worker.sock"), SECRET)

    async def scenario():
        scheduler = Scheduler(settings(), database_url, secret=SECRET)
        await scheduler.start()
        try:
            # Logged once the worker socket accepts (a socket file exists before it listens).
            await sidecar.stderr.wait_for_async("listening: worker socket", 30)
            reader, writer = await asyncio.open_unix_connection(sidecar.socket_path)
            fake = protocol.Channel(reader, writer)
            await fake.open_handshake(SECRET, "worker")
            await fake.send(protocol.Ready(worker="fake", pid=1))
            scheduler.add_worker("fault-w1", "127.0.0.1", sidecar.port)
            op_id = await enqueue_in_thread(database_url, "noop", max_attempts=2)
            operation = await fake.receive(timeout=30)
            assert isinstance(operation, protocol.Operation) and operation.id == op_id
            fake.writer.write(struct.pack(">I", 5) + b"{bad}")
            await _expect_closed(fake)
            await wait_until_db(
                lambda: row(database_url, op_id)["status"] == "NEW", 20, "the operation to be recovered"
            )
            assert sidecar.process.poll() is None  # the sidecar itself carries on
            return op_id
        finally:
            await scheduler.stop(grace=0)

    try:
        op_id = asyncio.run(scenario())
    finally:
        sidecar.stop()
    recovered = row(database_url, op_id)
    assert recovered["attempts"] == 1 and recovered["worker"] is None
    assert "worker connection dropped: malformed message" in recovered["error"]


def test_cli_invalid_inputs_is_an_error_and_inserts_nothing(database_url, conn):
    env = dict(os.environ, DATABASE_URL=database_url)
    result = subprocess.run(
        [sys.executable, "-m", "damops", "enqueue", "noop", "--inputs", "{not json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--inputs is not valid JSON" in result.stderr
    assert conn.execute("SELECT count(*) FROM damops.operations").fetchone()[0] == 0


def test_bad_configuration_stops_start_up_naming_the_variable(database_url):
    env = dict(os.environ, DATABASE_URL=database_url, SCHEDULER_HEARTBEAT="soon", WORKER_COUNT="-3")
    result = subprocess.run(
        [sys.executable, "-m", "damops", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "SCHEDULER_HEARTBEAT='soon'" in result.stderr
    assert "WORKER_COUNT='-3'" in result.stderr
