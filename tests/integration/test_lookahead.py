"""Prefetch through the worker's socket, with a real sidecar and a real worker
process; the test speaks for the scheduler over TCP. An operation sent ahead
waits in the worker's socket and starts the moment the running one ends, with
no frame from anyone in between; a Withdraw that reaches the worker before it
starts hands it back unrun, whenever it arrives (during the run, or right
behind the operation); a new scheduler hears of it in the Welcome."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from damops import protocol
from damops.protocol import Operation, StatusUpdate, Withdraw
from tests.support.procs import LineReader, SidecarProcess, stop_process

SECRET = "lookahead-secret"
EXCLUSIVE = "tests.support.exclusive:run"
PROBE = 99


class Pair:
    def __init__(self, sidecar: SidecarProcess, worker: subprocess.Popen, directory: Path) -> None:
        self.sidecar = sidecar
        self.worker = worker
        self.dir = directory

    def operation(self, op_id: int, *, prefetched: bool = False, release: bool = True) -> Operation:
        inputs = {"dir": str(self.dir), "release": str(self.release(op_id))} if release else {"dir": str(self.dir)}
        return Operation(id=op_id, trigger_function=EXCLUSIVE, inputs=inputs, attempt=1, prefetched=prefetched)

    def release(self, op_id: int) -> Path:
        return self.dir / f"release-{op_id}"

    def started(self, op_id: int) -> bool:
        return (self.dir / f"started-{op_id}").exists()

    async def connect(self) -> tuple[protocol.Channel, protocol.Welcome]:
        """A scheduler's channel; returns it with the sidecar's Welcome."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.sidecar.port)
        channel = protocol.Channel(reader, writer)
        await channel.open_handshake(SECRET, "scheduler")
        welcome = await _next(channel, protocol.Welcome)
        return channel, welcome

    async def settled(self, channel: protocol.Channel) -> None:
        """Until the sidecar has handled every frame sent so far (while one operation
        runs): one more, not prefetched, is refused as busy, in order."""
        await channel.send(Operation(id=PROBE, trigger_function=EXCLUSIVE, inputs={}, attempt=1))
        refused = await _next(channel, StatusUpdate)
        assert isinstance(refused, StatusUpdate) and refused.id == PROBE and not refused.executed, refused

    async def start_first(self, channel: protocol.Channel) -> None:
        """Operation 1 sent and running (until its release file exists)."""
        await channel.send(self.operation(1))
        for _ in range(3000):
            if self.started(1):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("operation 1 did not start within 30 s")


async def _next(channel: protocol.Channel, kind: type, timeout: float = 30) -> protocol.Message:
    """The next message of ``kind`` (heartbeats, Ready and the like skipped)."""
    while True:
        message = await channel.receive(timeout=timeout)
        if isinstance(message, kind):
            return message


@asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Pair, protocol.Channel]]:
    """A sidecar and its worker; yields once the worker is Ready, with the scheduler's channel."""
    socket_path = str(tmp_path / "w.sock")
    sidecar = SidecarProcess("w", socket_path, SECRET)
    worker = subprocess.Popen(
        [sys.executable, "-m", "damops", "worker", "--socket", socket_path, "--name", "w"],
        env=dict(os.environ, DAMOPS_SECRET=SECRET, DAMOPS_LOG_LEVEL="INFO", DAMOPS_LOG_FORMAT="text"),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stderr is not None
    worker_log = LineReader(worker.stderr)
    channel = None
    try:
        await sidecar.stderr.wait_for_async("listening: worker socket", 30)
        await worker_log.wait_for_async("ready", 60)
        both = Pair(sidecar, worker, tmp_path)
        channel, _ = await both.connect()
        await _next(channel, protocol.Ready)
        yield both, channel
    finally:
        if channel is not None:
            await channel.close()
        stop_process(worker, worker_log, grace=10)
        sidecar.stop()


async def _status(channel: protocol.Channel) -> StatusUpdate:
    update = await _next(channel, StatusUpdate)
    assert isinstance(update, StatusUpdate)
    return update


def test_the_operation_sent_ahead_starts_when_the_running_one_ends_with_no_frame_between(tmp_path):
    async def scenario():
        async with pair(tmp_path) as (both, channel):
            await both.start_first(channel)
            await channel.send(both.operation(2, prefetched=True, release=False))
            both.release(1).touch()
            # Nothing more is sent: the worker takes the next one from its own socket.
            return await _status(channel), await _status(channel)

    first, second = asyncio.run(scenario())
    assert (first.id, first.outcome, second.id, second.outcome) == (1, "success", 2, "success")
    assert not first.result["overlap"] and not second.result["overlap"]
    assert second.result["pid"] == first.result["pid"] and second.result["started"] >= first.result["ended"]


def test_a_withdraw_while_the_first_runs_hands_the_next_back_unrun(tmp_path):
    async def scenario():
        async with pair(tmp_path) as (both, channel):
            await both.start_first(channel)
            await channel.send(both.operation(2, prefetched=True))
            await channel.send(Withdraw(id=2, attempt=1))
            handed_back = await _status(channel)  # while the first still runs
            both.release(1).touch()
            return handed_back, await _status(channel), both.started(2)

    handed_back, first, second_started = asyncio.run(scenario())
    assert handed_back.id == 2 and not handed_back.executed
    assert handed_back.error == "prefetched operation handed back: withdrawn by the scheduler"
    assert first.id == 1 and first.outcome == "success"
    assert not second_started


def test_a_withdraw_right_behind_the_next_operation_is_read_before_it_starts(tmp_path):
    """Both frames reach the worker in one write just as the first ends: the
    worker looks behind a prefetched operation before starting it."""

    async def scenario():
        async with pair(tmp_path) as (both, channel):
            await both.start_first(channel)
            frames = protocol.encode(both.operation(2, prefetched=True)) + protocol.encode(Withdraw(id=2, attempt=1))
            channel.writer.write(frames)
            await channel.writer.drain()
            await both.settled(channel)  # both are on their way to the worker
            both.release(1).touch()
            updates = {u.id: u for u in [await _status(channel), await _status(channel)]}
            return updates, both.started(2)

    updates, second_started = asyncio.run(scenario())
    assert updates[1].outcome == "success"
    assert not updates[2].executed and "handed back" in (updates[2].error or "")
    assert not second_started


def test_a_new_scheduler_hears_of_the_held_operation_in_the_welcome_and_gets_it_back(tmp_path):
    async def scenario():
        async with pair(tmp_path) as (both, channel):
            await both.start_first(channel)
            await channel.send(both.operation(2, prefetched=True))
            await both.settled(channel)
            second, welcome = await both.connect()  # the newest scheduler wins; the first is closed
            try:
                handed_back = await _status(second)
                both.release(1).touch()
                return welcome, handed_back, await _status(second), both.started(2)
            finally:
                await second.close()

    welcome, handed_back, first, second_started = asyncio.run(scenario())
    assert welcome.busy_operation == 1 and 2 in welcome.undelivered
    assert handed_back.id == 2 and not handed_back.executed
    assert first.id == 1 and first.outcome == "success"
    assert not second_started


def test_several_sent_ahead_run_in_order_and_a_withdrawn_middle_one_is_skipped(tmp_path):
    """WORKER_PREFETCH_DEPTH above 1: three operations held ahead in one write; the
    middle one is withdrawn while the first runs; the other two run in the order sent."""

    async def scenario():
        async with pair(tmp_path) as (both, channel):
            await both.start_first(channel)
            ahead = [both.operation(op_id, prefetched=True, release=False) for op_id in (2, 3, 4)]
            channel.writer.write(b"".join(protocol.encode(op) for op in ahead))
            await channel.send(Withdraw(id=3, attempt=1))
            handed_back = await _status(channel)  # while the first still runs
            both.release(1).touch()
            return handed_back, [await _status(channel) for _ in range(3)], both.started(3)

    handed_back, updates, third_started = asyncio.run(scenario())
    assert handed_back.id == 3 and not handed_back.executed
    assert [(u.id, u.outcome) for u in updates] == [(1, "success"), (2, "success"), (4, "success")]
    assert not any(u.result["overlap"] for u in updates)
    assert updates[1].result["started"] >= updates[0].result["ended"]
    assert updates[2].result["started"] >= updates[1].result["ended"]
    assert not third_started


def test_a_new_scheduler_gets_every_held_operation_back(tmp_path):
    async def scenario():
        async with pair(tmp_path) as (both, channel):
            await both.start_first(channel)
            for op_id in (2, 3):
                await channel.send(both.operation(op_id, prefetched=True))
            await both.settled(channel)
            second, welcome = await both.connect()
            try:
                handed_back = [await _status(second), await _status(second)]
                both.release(1).touch()
                return welcome, handed_back, await _status(second), both.started(2) or both.started(3)
            finally:
                await second.close()

    welcome, handed_back, first, any_started = asyncio.run(scenario())
    assert welcome.busy_operation == 1 and {2, 3} <= set(welcome.undelivered)
    assert sorted(u.id for u in handed_back) == [2, 3] and not any(u.executed for u in handed_back)
    assert first.id == 1 and first.outcome == "success"
    assert not any_started
