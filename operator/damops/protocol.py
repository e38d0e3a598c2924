"""The wire protocol between scheduler, sidecar and worker.

Versioned JSON messages (pydantic models, discriminated by ``type``), framed
with a 4-byte big-endian length prefix and bounded by a maximum frame size.
A channel opens with a challenge/response on a shared secret: the listening
side sends a random nonce, the connecting side answers HMAC-SHA256(secret,
nonce). The secret itself never crosses the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import struct
import time
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION: Literal[1] = 1
DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
HEARTBEAT_INTERVAL = 2.0
# A peer that sent nothing (not even a heartbeat) for this long is dead.
HEARTBEAT_TIMEOUT = 10.0
_HEADER = struct.Struct(">I")
# Before a peer has proven it knows the secret, it may send only this much:
# an unauthenticated connection cannot make us buffer a full frame.
HANDSHAKE_MAX_FRAME_BYTES = 4096


class ProtocolError(Exception):
    """A peer broke the protocol: bad frame, bad message, bad secret. Drop the connection."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = PROTOCOL_VERSION


class Challenge(_Message):
    type: Literal["challenge"] = "challenge"
    nonce: str


class Hello(_Message):
    type: Literal["hello"] = "hello"
    role: Literal["scheduler", "worker"]
    proof: str


class Welcome(_Message):
    """Sent by a sidecar after a good Hello. ``busy_operation`` lets a new
    scheduler adopt an operation that a previous one handed out."""

    type: Literal["welcome"] = "welcome"
    worker: str
    busy_operation: int | None = None
    busy_attempt: int | None = None
    # A new value per sidecar process: a scheduler can tell a sidecar that
    # restarted (and forgot its operation) from one that only lost a channel.
    boot: str = ""
    # Ids of the StatusUpdates kept for the scheduler, and of a prefetched operation
    # its worker still holds (withdrawn: handed back or run); they follow this message.
    undelivered: list[int] = Field(default_factory=list)


class Ready(_Message):
    type: Literal["ready"] = "ready"
    worker: str
    pid: int


class NotReady(_Message):
    """The worker behind a sidecar went away; the sidecar waits for a new one."""

    type: Literal["not_ready"] = "not_ready"
    reason: str


class Operation(_Message):
    type: Literal["operation"] = "operation"
    id: int
    trigger_function: str
    inputs: Any = None
    attempt: int
    # W3C trace context (traceparent, tracestate) the worker's run span continues
    # (damops.tracing). Left out of the frame when None: untraced frames are unchanged.
    trace_context: dict[str, Any] | None = Field(default=None, exclude_if=lambda value: value is None)
    # Sent ahead to a busy worker (WORKER_PREFETCH): it waits in the worker's socket
    # and starts the moment the running one ends, or is handed back unrun on a
    # Withdraw. Left out when False.
    prefetched: bool = Field(default=False, exclude_if=lambda value: not value)


class StatusUpdate(_Message):
    """The result of handling one operation (seed: StatusUpdate)."""

    type: Literal["status"] = "status"
    id: int
    attempt: int
    outcome: Literal["success", "failure", "wait"]
    result: Any = None
    error: str | None = None
    # False for errors that a retry cannot fix (unknown trigger function, ...).
    retryable: bool = True
    # Seconds a retryable failure asks to wait before its next attempt
    # (``raise Retry(after=...)``); None lets the backoff policy decide.
    retry_after: float | None = None
    # The trigger function's traceback for a failure it raised (bounded in size).
    traceback: str | None = None
    # False when the operation was refused before it reached the trigger
    # function (worker busy or not ready): it goes back without using an attempt.
    executed: bool = True

    @classmethod
    def failure(cls, id: int, attempt: int, error: str, *, retryable: bool = True, **extra: Any) -> StatusUpdate:
        """The one constructor of a failure StatusUpdate (worker, sidecar and scheduler alike)."""
        return cls(id=id, attempt=attempt, outcome="failure", error=error, retryable=retryable, **extra)

    @classmethod
    def handed_back(cls, id: int, attempt: int, reason: str) -> StatusUpdate:
        """A prefetched operation given back before it started: not an attempt."""
        return cls.failure(id, attempt, f"prefetched operation handed back: {reason}", executed=False)


class Progress(_Message):
    """Refreshes the worker's lastTouched while a long operation runs."""

    type: Literal["progress"] = "progress"
    id: int
    message: str | None = None
    fraction: float | None = None


class Cancel(_Message):
    """Scheduler -> sidecar -> worker: stop this operation if you can (``context.cancelled``)."""

    type: Literal["cancel"] = "cancel"
    id: int
    attempt: int


class Withdraw(_Message):
    """Scheduler -> sidecar -> worker: hand back this prefetched operation if it has not
    started (the answer is a StatusUpdate with ``executed`` False); ignored once it runs."""

    type: Literal["withdraw"] = "withdraw"
    id: int
    attempt: int
    # Why, for the hand-back's error text (set by the sidecar). Left out when None.
    reason: str | None = Field(default=None, exclude_if=lambda value: value is None)


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"


class Shutdown(_Message):
    type: Literal["shutdown"] = "shutdown"


Message = Annotated[
    Challenge
    | Hello
    | Welcome
    | Ready
    | NotReady
    | Operation
    | StatusUpdate
    | Progress
    | Cancel
    | Withdraw
    | Heartbeat
    | Shutdown,
    Field(discriminator="type"),
]
_message_adapter: TypeAdapter[Message] = TypeAdapter(Message)  # type: ignore[arg-type, unused-ignore]


def encode(message: _Message, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """One frame: length prefix + JSON body. Raises ProtocolError if too large."""
    body = message.model_dump_json().encode()
    if len(body) > max_frame_bytes:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the maximum of {max_frame_bytes} bytes")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> Message:
    """Parse one frame body; raises ProtocolError naming what is wrong."""
    try:
        return _message_adapter.validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise ProtocolError(f"malformed message: {where}: {first['msg']}") from None


async def read_frame(
    reader: asyncio.StreamReader, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[Message, bytes]:
    """Read one frame: (message, the whole frame as received, for relaying).
    EOF raises asyncio.IncompleteReadError; bad frames ProtocolError."""
    header = await reader.readexactly(HEADER_BYTES)
    body = await reader.readexactly(frame_length(header, max_frame_bytes))
    return decode(body), header + body


HEADER_BYTES = _HEADER.size


def frame_length(header: bytes, max_frame_bytes: int) -> int:
    """The body length a frame header announces; ProtocolError when over the limit.
    Shared by the async channels and the worker's blocking one."""
    (length,) = _HEADER.unpack(header)
    if length > max_frame_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the maximum of {max_frame_bytes} bytes")
    return int(length)


def answer(challenge: Message, secret: str, role: Literal["scheduler", "worker"]) -> Hello:
    """The connecting side's answer to the listener's first message."""
    if not isinstance(challenge, Challenge):
        raise ProtocolError(f"expected challenge, got {challenge.type}")
    return Hello(role=role, proof=make_proof(secret, challenge.nonce))


async def read_message(reader: asyncio.StreamReader, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    return (await read_frame(reader, max_frame_bytes))[0]


def make_proof(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def new_challenge() -> Challenge:
    return Challenge(nonce=secrets.token_hex(16))


def check_proof(secret: str, challenge: Challenge, hello: Hello) -> None:
    # As bytes: compare_digest refuses non-ASCII str, and a peer chooses the proof.
    if not hmac.compare_digest(make_proof(secret, challenge.nonce).encode(), hello.proof.encode()):
        raise ProtocolError("wrong secret: the peer's proof does not match")


# Deeper JSON than this is refused at enqueue and in results: every parser on
# the way (pydantic-core, PostgreSQL's jsonb) has its own, lower-level limit,
# and a value over one of them would fail far from its cause.
MAX_JSON_DEPTH = 64
# Python refuses to print integers of more than 4,300 digits (int_max_str_digits).
_MAX_JSON_INT = 10**4000


def json_problem(value: Any) -> str | None:
    """None when ``value`` can travel as JSON through every hop (frames, jsonb);
    else a message naming what is wrong: not JSON (a set, an object), NaN or
    infinity, nesting deeper than MAX_JSON_DEPTH, or a string PostgreSQL's
    jsonb cannot store (a NUL character, a lone surrogate)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"nested deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"has a non-string object key {key!r}"
                    stack.append((key, depth))
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "contains a NUL character, which PostgreSQL cannot store"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "contains a lone surrogate, which is not valid Unicode"
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                return f"contains {item!r}, which JSON cannot represent"
        elif isinstance(item, int) and not isinstance(item, bool):
            if abs(item) >= _MAX_JSON_INT:
                return "contains an integer too large for JSON parsers"
        elif item is not None and not isinstance(item, bool):
            return f"contains a {type(item).__name__}, which is not JSON"
    return None


class Channel:
    """A framed, authenticated connection: one reader, serialised writes.

    Frames sent in one turn of the event loop leave in one write: several
    operations for one worker, or several StatusUpdates relayed at once, wake
    the peer once rather than once per frame."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame_bytes = max_frame_bytes
        self.last_seen = time.monotonic()
        self.silent_reason: str | None = None
        self._outgoing: list[bytes] | None = None  # frames of this turn of the loop, not yet written
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time (fork check).
        self._loop: asyncio.AbstractEventLoop | None = None

    async def send(self, message: _Message) -> None:
        self.send_nowait(message)
        self.flush()
        await self.writer.drain()

    def send_nowait(self, message: _Message) -> None:
        """Queue a frame without waiting for the socket buffer to drain."""
        self.send_frame_nowait(encode(message, self.max_frame_bytes))

    def send_frame_nowait(self, frame: bytes) -> None:
        """Queue a frame already encoded (and size-checked), e.g. one relayed from its sender."""
        if self._outgoing is None:
            self._outgoing = [frame]
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)
        else:
            self._outgoing.append(frame)

    def flush(self) -> None:
        """Write the queued frames now (they leave at the end of this turn of the loop anyway)."""
        frames, self._outgoing = self._outgoing, None
        if frames:
            self.writer.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def receive(self, timeout: float | None = HEARTBEAT_TIMEOUT) -> Message:
        return (await self.receive_frame(timeout))[0]

    async def receive_frame(self, timeout: float | None = HEARTBEAT_TIMEOUT) -> tuple[Message, bytes]:
        """The next message and its raw frame (the handshake, a Welcome): a channel's
        steady stream of frames goes through :meth:`dispatch`. With ``timeout=None``
        it waits as long as it takes; a :func:`heartbeat_loop` closing the channel
        meanwhile fails the read with its reason."""
        try:
            async with asyncio.timeout(timeout):
                received = await read_frame(self.reader, self.max_frame_bytes)
        except TimeoutError:
            raise ProtocolError(f"peer silent for {timeout:.0f}s (no heartbeat)") from None
        except (asyncio.IncompleteReadError, ConnectionError):
            if self.silent_reason:
                raise ProtocolError(self.silent_reason) from None
            raise
        self.last_seen = time.monotonic()
        return received

    async def dispatch(self, handler: FrameHandler) -> None:
        """Hand every frame to ``handler`` (message, raw frame) as its bytes arrive,
        until the handler returns True or the connection ends; then raise as
        :meth:`receive_frame` would (EOF, a bad frame, a silent peer) or with what the
        handler raised. The frames are parsed in the transport's own callback: no
        task is woken per frame (a quarter to a third of a relayed frame's CPU). Call it
        once, after the handshake; :meth:`receive` is not used afterwards."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        reader, transport = self.reader, typing.cast(asyncio.Transport, self.writer.transport)
        inner = transport.get_protocol()
        assert isinstance(inner, asyncio.StreamReaderProtocol)
        dispatcher = _FrameDispatcher(self, inner, handler, done)
        # What the handshake's reads left buffered (the frames right behind a Welcome,
        # say) comes first. StreamReader has no public way to take it without waiting.
        buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
        leftover = bytes(buffered)
        buffered.clear()
        transport.set_protocol(dispatcher)
        if leftover:
            dispatcher.data_received(leftover)
        if reader.exception() is not None:  # the connection ended before the switch
            dispatcher.finish(reader.exception())
        elif reader.at_eof():
            dispatcher.eof_received()
        elif not transport.is_reading() and not transport.is_closing():
            transport.resume_reading()  # StreamReader paused it on a full buffer
        try:
            await done
        except (asyncio.IncompleteReadError, ConnectionError):
            if self.silent_reason:
                raise ProtocolError(self.silent_reason) from None
            raise

    def close_nowait(self) -> None:
        """Close after writing what is queued."""
        self.flush()
        self.writer.close()

    async def close(self) -> None:
        self.close_nowait()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    @property
    def peer(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return str(peer) if peer else "unix-socket"

    # Handshake helpers -------------------------------------------------

    async def accept_handshake(self, secret: str, role: str) -> Hello:
        """Listening side: challenge the peer and check its proof and role."""
        challenge = new_challenge()
        await self.send(challenge)
        async with asyncio.timeout(HEARTBEAT_TIMEOUT):
            hello, _ = await read_frame(self.reader, HANDSHAKE_MAX_FRAME_BYTES)
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected hello, got {hello.type}")
        check_proof(secret, challenge, hello)
        if hello.role != role:
            raise ProtocolError(f"expected a {role} peer, got {hello.role}")
        return hello

    async def open_handshake(self, secret: str, role: Literal["scheduler", "worker"]) -> None:
        """Connecting side: answer the listener's challenge."""
        await self.send(answer(await self.receive(timeout=HEARTBEAT_TIMEOUT), secret, role))


# Called with each frame :meth:`Channel.dispatch` reads; True ends the dispatch.
FrameHandler = Callable[[Message, bytes], bool | None]


class _FrameDispatcher(asyncio.Protocol):
    """A channel's transport protocol once it dispatches: frames are parsed from the
    bytes as they arrive. Flow control and closing go on to the StreamReaderProtocol
    it replaced, so the channel's writer (drain, wait_closed) works as before."""

    def __init__(
        self, channel: Channel, inner: asyncio.StreamReaderProtocol, handler: FrameHandler, done: asyncio.Future[None]
    ) -> None:
        self._channel = channel
        self._inner = inner
        self._handler = handler
        self._done = done
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return  # ended: the rest is dropped, as a reader that stopped reading would
        self._channel.last_seen = time.monotonic()
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while len(buffer) - start >= HEADER_BYTES:
                header = bytes(buffer[start : start + HEADER_BYTES])
                end = start + HEADER_BYTES + frame_length(header, self._channel.max_frame_bytes)
                if len(buffer) < end:
                    break
                frame = bytes(buffer[start:end])
                start = end
                if self._handler(decode(frame[HEADER_BYTES:]), frame):
                    self.finish(None)
                    return
        except Exception as exc:  # noqa: BLE001 - a bad frame or the handler's error ends this channel only
            self.finish(exc)
        finally:
            del buffer[:start]

    def eof_received(self) -> bool:
        partial = bytes(self._buffer)  # the frame cut short, its header included
        header = partial[:HEADER_BYTES]
        expected = HEADER_BYTES if len(header) < HEADER_BYTES else HEADER_BYTES + _HEADER.unpack(header)[0]
        self.finish(asyncio.IncompleteReadError(partial, expected))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)
        if exc is not None:
            self.finish(exc)
        else:
            self.eof_received()  # closed on our side (close_nowait, a silent peer)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def finish(self, exc: BaseException | None) -> None:
        """End the dispatch (at most once): normally, or raising ``exc``."""
        if self._done.done():
            return
        if exc is None:
            self._done.set_result(None)
        else:
            self._done.set_exception(exc)


async def heartbeat_loop(channel: Channel) -> None:
    """Send a Heartbeat every HEARTBEAT_INTERVAL, and close the channel once
    the peer has been silent for HEARTBEAT_TIMEOUT (its reader then fails)."""
    try:
        tick = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            now = time.monotonic()
            if now - tick > 2 * HEARTBEAT_INTERVAL:
                # We were not running (SIGSTOP, a stalled host): the peer's silence
                # is ours. Judge it afresh from now rather than drop a healthy peer.
                channel.last_seen = max(channel.last_seen, now - HEARTBEAT_INTERVAL)
            tick = now
            if now - channel.last_seen > HEARTBEAT_TIMEOUT:
                channel.silent_reason = f"peer silent for {HEARTBEAT_TIMEOUT:.0f}s (no heartbeat)"
                channel.close_nowait()
                return
            channel.send_nowait(Heartbeat())
    except (ConnectionError, RuntimeError):
        return
