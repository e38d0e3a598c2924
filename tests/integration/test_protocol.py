"""Framing, validation and the handshake of the wire protocol, on real sockets."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from damops import protocol
from damops.config import load_settings, parse_duration
from tests.support.procs import SidecarProcess


def test_round_trip_of_every_message():
    messages = [
        protocol.Ready(worker="w", pid=1),
        protocol.Operation(id=1, trigger_function="noop", inputs={"a": [1, 2]}, attempt=1),
        protocol.StatusUpdate(id=1, attempt=1, outcome="success", result={"x": 1}),
        protocol.StatusUpdate(id=1, attempt=1, outcome="failure", error="E: x", retryable=False),
        protocol.Progress(id=1, fraction=0.5),
        protocol.Heartbeat(),
        protocol.Shutdown(),
        protocol.Welcome(worker="w", busy_operation=7, busy_attempt=2),
        protocol.NotReady(reason="gone"),
    ]
    for message in messages:
        frame = protocol.encode(message)
        (length,) = struct.unpack(">I", frame[:4])
        assert length == len(frame) - 4
        assert protocol.decode(frame[4:]) == message


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"not json", "Invalid JSON"),
        (b'{"type": "operation", "id": 1}', "operation.trigger_function"),
        (b'{"type": "launch_missiles"}', "does not match any of the expected tags"),
        (b'{"type": "heartbeat", "v": 2}', "heartbeat.v"),
        (b'{"type": "heartbeat", "extra": 1}', "heartbeat.extra"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(body, problem):
    with pytest.raises(protocol.ProtocolError, match="malformed message") as err:
        protocol.decode(body)
    assert problem in str(err.value)


def test_oversized_frames_are_refused_both_ways():
    with pytest.raises(protocol.ProtocolError, match="exceeds the maximum"):
        protocol.encode(protocol.Operation(id=1, trigger_function="f", inputs="x" * 200, attempt=1), 100)

    async def read_oversized():
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">I", 101))
        await protocol.read_message(reader, max_frame_bytes=100)

    with pytest.raises(protocol.ProtocolError, match="101 bytes exceeds"):
        asyncio.run(read_oversized())


def test_handshake_over_a_real_socket_accepts_the_secret_and_rejects_others():
    async def scenario():
        # The server side reports each connection's outcome here; the client
        # waits for it instead of sleeping and hoping the server was done.
        outcomes: asyncio.Queue[str] = asyncio.Queue()

        async def serve(reader, writer):
            channel = protocol.Channel(reader, writer)
            try:
                await channel.accept_handshake("s3cret", "scheduler")
                outcomes.put_nowait("accepted")
            except protocol.ProtocolError as exc:
                outcomes.put_nowait(str(exc))
            await channel.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        seen = []
        for secret, role in (("s3cret", "scheduler"), ("guess", "scheduler"), ("s3cret", "worker")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            channel = protocol.Channel(reader, writer)
            await channel.open_handshake(secret, role)
            seen.append(await asyncio.wait_for(outcomes.get(), 30))
            await channel.close()
        server.close()
        await server.wait_closed()
        return seen

    outcomes = asyncio.run(scenario())
    assert outcomes[0] == "accepted"
    assert "wrong secret" in outcomes[1]
    assert "expected a scheduler peer, got worker" in outcomes[2]


def test_durations_accept_seconds_and_units():
    assert parse_duration(30) == 30.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300.0
    assert parse_duration("1h") == 3600.0
    with pytest.raises(ValueError):
        parse_duration("soon")
    with pytest.raises(ValueError):
        parse_duration(0)


def test_settings_read_the_seeds_variable_names(monkeypatch):
    monkeypatch.setenv("POLL_FAILED_OPERATIONS_INTERVAL", "2h")
    monkeypatch.setenv("FAILED_OPERATION_THRESHOLD_TIME_HOURS", "12")
    monkeypatch.setenv("FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS", "500")
    monkeypatch.setenv("OPERATION_WAIT_INTERVAL", "45s")
    settings = load_settings()
    assert settings.poll_failed_operations_interval == 7200
    assert settings.failed_operation_threshold_time_hours == 12
    assert settings.failed_operation_threshold_limit_records == 500
    assert settings.operation_wait_interval == 45
    monkeypatch.delenv("POLL_FAILED_OPERATIONS_INTERVAL")
    monkeypatch.delenv("FAILED_OPERATION_THRESHOLD_TIME_HOURS")
    monkeypatch.delenv("FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS")
    defaults = load_settings()
    assert (
        defaults.poll_failed_operations_interval,
        defaults.failed_operation_threshold_time_hours,
        defaults.failed_operation_threshold_limit_records,
    ) == (3600, 24, 20000)
    monkeypatch.setenv("FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS", "lots")
    with pytest.raises(SystemExit, match="FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS='lots'"):
        load_settings()


def test_a_silent_peer_is_dropped_by_the_heartbeat_watchdog(tmp_path):
    """A real sidecar process; the 'scheduler' authenticates, then never speaks again."""
    sidecar = SidecarProcess("w", str(tmp_path / "w.sock"), "s")

    async def scenario():
        # The sidecar's TCP socket listens already (we bound it): no retry loop.
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        channel = protocol.Channel(reader, writer)
        await channel.open_handshake("s", "scheduler")
        started = time.monotonic()
        with pytest.raises(asyncio.IncompleteReadError):
            while True:  # read its welcome and heartbeats, never answer
                await asyncio.wait_for(protocol.read_message(reader), 30)
        return time.monotonic() - started

    try:
        silent_for = asyncio.run(scenario())
        # The client sees EOF as soon as the watchdog closes the socket; the
        # sidecar logs why only when its reader notices: wait for that line.
        dropped = sidecar.stderr.wait_for("dropping scheduler connection", 30)
    finally:
        sidecar.stop()
    assert silent_for >= protocol.HEARTBEAT_TIMEOUT
    assert "peer silent" in dropped


# --- Channel.dispatch: frames handed over from the transport's callback ----------


def _run_on(loop_name, coroutine):
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


async def _dispatching(peer_writes, handler=None):
    """A real TCP pair: the listening side dispatches after one received frame (as a
    handshake would leave it); ``peer_writes`` gets the connecting side's socket
    writer. Returns (frames dispatched, what dispatch raised or None)."""
    seen: list[protocol.Message] = []
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    def record(message, frame):
        assert protocol.decode(frame[protocol.HEADER_BYTES :]) == message  # the raw frame travels along
        seen.append(message)
        return handler(message) if handler else None

    async def serve(reader, writer):
        channel = protocol.Channel(reader, writer)
        first = await channel.receive()
        seen.append(first)
        try:
            await channel.dispatch(record)
            outcome.set_result(None)
        except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
            outcome.set_result(exc)
        await channel.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    await peer_writes(writer)
    raised = await asyncio.wait_for(outcome, 30)
    writer.close()
    server.close()
    return seen, raised


def _status(i):
    return protocol.StatusUpdate(id=i, attempt=1, outcome="success", result={"i": i})


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_dispatch_hands_over_frames_in_order_whole_and_split_and_those_left_behind_the_handshake(loop_name):
    updates = [_status(i) for i in range(1, 8)]

    async def peer(writer):
        # The first frame and two more in one write: dispatch starts with two buffered.
        writer.write(b"".join(protocol.encode(u) for u in updates[:3]))
        await writer.drain()
        split = b"".join(protocol.encode(u) for u in updates[3:])
        for index in range(0, len(split), 5):  # the rest arrives a few bytes at a time
            writer.write(split[index : index + 5])
            await writer.drain()
        writer.write_eof()

    seen, raised = _run_on(loop_name, _dispatching(peer))
    assert seen == updates
    # The end of the stream between two frames, as a receive reports it (the sidecar logs it quietly).
    assert isinstance(raised, asyncio.IncompleteReadError)
    assert raised.partial == b"" and raised.expected == protocol.HEADER_BYTES


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_dispatch_raises_on_a_cut_frame_a_bad_frame_and_the_handlers_own_error(loop_name):
    async def cut(writer):
        writer.write(protocol.encode(_status(1)) + protocol.encode(_status(2))[:9])
        writer.write_eof()

    seen, raised = _run_on(loop_name, _dispatching(cut))
    assert seen == [_status(1)]
    assert isinstance(raised, asyncio.IncompleteReadError) and len(raised.partial) == 9

    async def garbage(writer):
        writer.write(protocol.encode(_status(1)) + protocol.encode(_status(2)) + struct.pack(">I", 9) + b"not json!")

    seen, raised = _run_on(loop_name, _dispatching(garbage))
    assert seen == [_status(1), _status(2)]
    assert isinstance(raised, protocol.ProtocolError) and "malformed message" in str(raised)

    async def oversized(writer):
        writer.write(protocol.encode(_status(1)) + struct.pack(">I", protocol.DEFAULT_MAX_FRAME_BYTES + 1))

    _, raised = _run_on(loop_name, _dispatching(oversized))
    assert isinstance(raised, protocol.ProtocolError) and "exceeds the maximum" in str(raised)

    def refuse_the_second(message):
        if message.id == 3:
            raise protocol.ProtocolError("unexpected status")

    async def three(writer):
        writer.write(b"".join(protocol.encode(_status(i)) for i in (1, 2, 3, 4)))

    seen, raised = _run_on(loop_name, _dispatching(three, refuse_the_second))
    assert [m.id for m in seen] == [1, 2, 3]  # nothing after the frame its handler refused
    assert str(raised) == "unexpected status"


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_dispatch_ends_normally_when_the_handler_says_so(loop_name):
    async def peer(writer):
        writer.write(b"".join(protocol.encode(m) for m in (_status(1), _status(2), protocol.Shutdown(), _status(3))))

    seen, raised = _run_on(loop_name, _dispatching(peer, lambda m: isinstance(m, protocol.Shutdown)))
    assert raised is None
    assert seen == [_status(1), _status(2), protocol.Shutdown()]
