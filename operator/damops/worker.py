"""The worker process: pre-heated, long-lived, one operation at a time.

It talks only to its sidecar, over a Unix socket. It connects, proves it knows
the shared secret, says Ready, then runs each Operation it is given and answers
with exactly one StatusUpdate. With prefetch the next Operation may already wait
in the socket: the worker starts it right after the running one's StatusUpdate,
unless a Withdraw for it came first (then it goes back unrun).

A worker does one thing at a time, so it uses plain blocking sockets: the main
thread receives and runs operations (no hand-over between threads: one wake-up
per operation), a small thread sends heartbeats so the sidecar knows a long
operation is still alive. While an operation runs nobody blocks on the socket:
a Cancel (or a Withdraw of one held ahead) is read when the trigger function
looks (``context.cancelled``, ``context.wait_cancelled``) or within PUMP_INTERVAL. Async trigger functions
run on one event loop kept for the life of the process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import select
import signal
import socket
import threading
import time
import traceback as tb
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from damops import logs, protocol, tracing
from damops.lifeline import die_with_parent
from damops.logs import OperationFields
from damops.protocol import Cancel, Heartbeat, Operation, Progress, Ready, Shutdown, StatusUpdate, Withdraw
from damops.triggers import Context, PermanentError, Retry, TriggerRegistry, UnknownTriggerFunction, Wait

log = logging.getLogger("damops.worker")


@dataclass(frozen=True)
class _Resolved:
    function: Callable[..., Any]
    takes_context: bool
    is_async: bool
    logger: logging.Logger


# How often the heartbeat thread reads the socket while an operation runs.
PUMP_INTERVAL = 0.25

# Below glibc's mmap threshold: a read buffer is not mapped and unmapped per frame.
_READ_BYTES = 65536


class BlockingChannel:
    """Length-prefixed frames over a blocking socket; sends are thread-safe.

    Reads are serialised: a blocking :meth:`receive`, or a :meth:`pump` that never
    waits for another reader (a heartbeat must not wait behind an idle receive).
    What a pump reads and does not consume is kept, in order, for :meth:`receive`."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._buffer = bytearray()
        self._kept: list[protocol.Message] = []
        self._failure: Exception | None = None
        self._eof = False

    def send(self, message: protocol._Message) -> None:
        self.send_frame(protocol.encode(message, self.max_frame_bytes))

    def send_frame(self, frame: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self) -> protocol.Message:
        """The next message, waiting as long as it takes."""
        with self._read_lock:
            if self._kept:
                return self._kept.pop(0)
            if self._failure is not None:
                raise self._failure
            while (message := self._next_buffered()) is None:
                self._read(self.sock.recv(_READ_BYTES))
            return message

    def pump(self, consume: Callable[[protocol.Message], bool], timeout: float = 0.0) -> None:
        """Read what has arrived (waiting up to ``timeout`` when nothing has) and offer
        each message to ``consume``; the ones it declines are kept for :meth:`receive`.
        Returns at once when another thread is reading."""
        if not self._read_lock.acquire(blocking=False):
            return
        try:
            if timeout > 0 and not self._eof and not self._frame_waiting():
                poller = select.poll()
                poller.register(self.sock, select.POLLIN)
                poller.poll(timeout * 1000)
            while not self._eof:
                try:
                    data = self.sock.recv(_READ_BYTES, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                self._read(data)
                if len(data) < _READ_BYTES:
                    break  # the socket was empty after this read: asking again would only say so
            while self._failure is None:
                try:
                    message = self._next_buffered()
                except (EOFError, protocol.ProtocolError) as exc:
                    self._failure = exc  # raised by the next receive, once the operation is over
                    break
                if message is None:
                    break
                if not consume(message):
                    self._kept.append(message)
        except OSError as exc:
            self._failure = exc
        finally:
            self._read_lock.release()

    def take_kept(self, wanted: Callable[[protocol.Message], bool]) -> protocol.Message | None:
        """Remove and return the first kept message ``wanted`` accepts. Only from a
        :meth:`pump`'s ``consume`` (the reader's lock is held then)."""
        for index, message in enumerate(self._kept):
            if wanted(message):
                return self._kept.pop(index)
        return None

    def _read(self, data: bytes) -> None:
        if not data:
            self._eof = True
        self._buffer += data

    def _frame_end(self) -> int | None:
        """Where the first buffered frame ends once all of it has arrived, else None.
        Raises ProtocolError when its header announces too large a frame."""
        if len(self._buffer) < protocol.HEADER_BYTES:
            return None
        header = bytes(self._buffer[: protocol.HEADER_BYTES])
        end = protocol.HEADER_BYTES + protocol.frame_length(header, self.max_frame_bytes)
        return end if len(self._buffer) >= end else None

    def _frame_waiting(self) -> bool:
        """A frame (or a bad header to report) is buffered: nothing to wait for."""
        try:
            return self._frame_end() is not None
        except protocol.ProtocolError:
            return True

    def _next_buffered(self) -> protocol.Message | None:
        end = self._frame_end()
        if end is None:
            if self._eof:
                partial = len(self._buffer) >= protocol.HEADER_BYTES
                raise EOFError("the sidecar closed the connection" + (" mid-frame" if partial else ""))
            return None
        body = bytes(self._buffer[protocol.HEADER_BYTES : end])
        del self._buffer[:end]
        return protocol.decode(body)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class WorkerRuntime:
    def __init__(
        self,
        socket_path: str,
        secret: str,
        name: str | None = None,
        max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.socket_path = socket_path
        self.secret = secret
        self.name = name or socket.gethostname()
        self.max_frame_bytes = max_frame_bytes
        self.registry = TriggerRegistry()
        self._resolved: dict[str, _Resolved] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: BlockingChannel | None = None
        self._current: tuple[int, int] | None = None  # the running operation (id, attempt)
        self._cancel = threading.Event()  # set when the running operation is cancelled
        self._withdrawal: str | None = None  # why the operation about to start was withdrawn
        self._running = False
        self._terminating = False
        self.pool = os.environ.get("DAMOPS_POOL") or None  # set for worker pods and by damops run: for log lines

    def preload(self, names: list[str]) -> None:
        """Import trigger functions before saying Ready (pre-heating): the first
        operation then pays no import cost. An unknown name is logged, not fatal:
        operations naming it fail with the usual message."""
        for name in names:
            try:
                self._resolve(name)
            except UnknownTriggerFunction as exc:
                log.warning("DAMOPS_PRELOAD: %s", exc)

    def run(self) -> None:
        self.preload([n.strip() for n in os.environ.get("DAMOPS_PRELOAD", "").split(",") if n.strip()])
        channel = self._channel = BlockingChannel(self._connect(), self.max_frame_bytes)
        channel.send(protocol.answer(channel.receive(), self.secret, "worker"))
        channel.send(Ready(worker=self.name, pid=os.getpid()))
        log.info("worker %s (pid %d) ready", self.name, os.getpid())
        stop_beating = threading.Event()
        threading.Thread(target=self._heartbeat, args=(channel, stop_beating), daemon=True).start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while True:
                message = channel.receive()
                if isinstance(message, Shutdown):
                    log.info("worker %s shutting down", self.name)
                    return
                if not isinstance(message, Operation):
                    if not isinstance(message, (Heartbeat, Cancel, Withdraw)):  # for an operation that ended
                        raise protocol.ProtocolError(f"unexpected {message.type} from the sidecar")
                    continue
                self._current = (message.id, message.attempt)
                self._cancel.clear()
                if message.prefetched and self._withdrawn_before_start(channel, message):
                    self._current = None
                    continue
                self._running = True
                try:
                    channel.send_frame(self._frame(self._observed(message)))
                finally:
                    self._running = False
                    self._current = None
                if self._terminating:
                    log.info("worker %s: finished its operation after SIGTERM, exiting", self.name)
                    return
        finally:
            stop_beating.set()
            channel.close()

    def _withdrawn_before_start(self, channel: BlockingChannel, op: Operation) -> bool:
        """A prefetched operation waited in the socket; a Withdraw for it may be right
        behind it. Read what has arrived first: withdrawn, it goes back unrun."""
        self._withdrawal = None
        channel.pump(self._consume)
        if self._withdrawal is None:
            return False
        channel.send(StatusUpdate.handed_back(op.id, op.attempt, self._withdrawal))
        return True

    def _withdraw(self, withdraw: Withdraw) -> None:
        """Hand a prefetched operation back if it has not started; once it runs, too late."""
        key, reason = (withdraw.id, withdraw.attempt), withdraw.reason or "withdrawn"
        if key == self._current and not self._running:
            self._withdrawal = reason  # about to start: :meth:`_withdrawn_before_start` answers
            return
        channel = self._channel
        if channel is not None and channel.take_kept(lambda m: isinstance(m, Operation) and (m.id, m.attempt) == key):
            channel.send(StatusUpdate.handed_back(withdraw.id, withdraw.attempt, reason))

    def _consume(self, message: protocol.Message) -> bool:
        """A frame read while an operation runs (or before a prefetched one starts): a
        Cancel for it takes effect now, a Withdraw of the next one hands it back; the
        rest (a Shutdown, the next Operation) waits for the main loop."""
        if isinstance(message, Withdraw):
            self._withdraw(message)
            return True
        if isinstance(message, Cancel) and (message.id, message.attempt) == self._current:
            log.info(
                "operation %d: cancel requested",
                message.id,
                extra=logs.fields(message.id, None, message.attempt, self.pool, self.name),
            )
            self._cancel.set()
            return True
        return isinstance(message, Heartbeat)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        """Idle: exit now. Running an operation: finish it, send its StatusUpdate, then exit."""
        self._terminating = True
        if not self._running:
            raise SystemExit(0)

    def _pump(self, timeout: float) -> None:
        """Read what the sidecar sent while the operation runs (a cancel check)."""
        channel = self._channel
        if channel is not None and self._running:
            channel.pump(self._consume, timeout)

    def _connect(self) -> socket.socket:
        """The sidecar may start after us: retry until its socket answers."""
        delay = 0.02
        deadline = time.monotonic() + 120
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise ConnectionError(f"no sidecar listening on {self.socket_path}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _heartbeat(self, channel: BlockingChannel, stop: threading.Event) -> None:
        """A Heartbeat every HEARTBEAT_INTERVAL; and, every PUMP_INTERVAL while an
        operation runs, a read of what the sidecar sent: a Cancel reaches a trigger
        function that never looks, and a Withdraw of one held ahead is answered."""
        next_beat = time.monotonic() + protocol.HEARTBEAT_INTERVAL
        while not stop.wait(PUMP_INTERVAL):
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + protocol.HEARTBEAT_INTERVAL
                try:
                    channel.send(Heartbeat())
                except OSError:
                    return
            self._pump(0)

    def _resolve(self, name: str) -> _Resolved:
        resolved = self._resolved.get(name)
        if resolved is None:
            function = self.registry.resolve(name)
            resolved = _Resolved(
                function,
                _takes_context(function),
                inspect.iscoroutinefunction(function),
                logging.getLogger(f"damops.trigger.{name}"),
            )
            self._resolved[name] = resolved
        return resolved

    def _progress(self, operation_id: int) -> Callable[[str | None, float | None], None]:
        def report(message: str | None, fraction: float | None) -> None:
            if self._channel is not None:
                self._channel.send(Progress(id=operation_id, message=message, fraction=fraction))

        return report

    def _observed(self, op: Operation) -> StatusUpdate:
        """:meth:`handle`, with every line logged meanwhile (the trigger function's
        too) naming the operation, and in a run span when tracing."""
        with logs.about(OperationFields(op.id, op.trigger_function, op.attempt, self.pool, self.name)):
            if tracing.tracer is None:
                return self.handle(op)
            return tracing.run(op, self.pool, self.name, self.handle)

    def handle(self, op: Operation) -> StatusUpdate:
        """Run one operation; every outcome becomes exactly one StatusUpdate
        that can be sent and stored, whatever the trigger function did."""

        def failure(error: str, retryable: bool, **extra: Any) -> StatusUpdate:
            return StatusUpdate.failure(op.id, op.attempt, clean_text(error), retryable=retryable, **extra)

        try:
            target = self._resolve(op.trigger_function)
        except UnknownTriggerFunction as exc:
            return failure(str(exc), retryable=False)
        args: tuple[Any, ...] = (op.inputs,)
        if target.takes_context:
            cancel = _CancelSignal(self._cancel, self._pump)
            args = (op.inputs, Context(op.id, op.attempt, target.logger, self._progress(op.id), cancel))
        try:
            result = target.function(*args)
            if inspect.isawaitable(result):
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                result = self._loop.run_until_complete(result)
        except PermanentError as exc:
            return failure(f"PermanentError: {describe(exc)}", retryable=False)
        except Retry as exc:
            return failure(f"Retry: {describe(exc)}", retryable=True, retry_after=exc.after)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any error of user code fails the operation
            log.info("operation %d: %s raised %s", op.id, op.trigger_function, describe(exc))
            return failure(describe(exc), retryable=True, traceback=clean_text(tb.format_exc(), TRACEBACK_LIMIT))
        if isinstance(result, Wait):
            return StatusUpdate(id=op.id, attempt=op.attempt, outcome="wait", error=clean_text(result.reason) or None)
        problem = protocol.json_problem(result)
        if problem:
            return failure(
                f"the result of trigger function {op.trigger_function!r} is not JSON-serializable: {problem}",
                retryable=False,
            )
        return StatusUpdate(id=op.id, attempt=op.attempt, outcome="success", result=result)

    def _frame(self, update: StatusUpdate) -> bytes:
        """Encode once; a result that cannot be put in a frame fails the operation instead of the channel."""
        try:
            return protocol.encode(update, self.max_frame_bytes)
        except Exception as exc:  # noqa: BLE001 - too large, or an encoder error
            reason = (
                f"result too large: {exc}"
                if isinstance(exc, protocol.ProtocolError)
                else (f"the result could not be encoded: {describe(exc)}")
            )
            return protocol.encode(StatusUpdate.failure(update.id, update.attempt, clean_text(reason), retryable=False))


class _CancelSignal:
    """The running operation's cancel flag as its context sees it: looking at it
    reads the socket first (at most every CHECK_EVERY seconds when it only peeks),
    so a Cancel arrives without a reader thread woken for every operation."""

    CHECK_EVERY = 0.01

    def __init__(self, flag: threading.Event, pump: Callable[[float], None]) -> None:
        self._flag = flag
        self._pump_messages = pump
        self._checked = 0.0

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._flag.is_set() and now - self._checked >= self.CHECK_EVERY:
            self._checked = now
            self._pump_messages(0)
        return self._flag.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._flag.is_set():
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            started = time.monotonic()
            self._pump_messages(min(left, 1.0))
            if time.monotonic() - started < 0.005:
                # Another thread was reading (it delivers a Cancel), or a frame came: do not spin.
                self._flag.wait(min(max(left, 0.0), 0.005))
        return self._flag.is_set()


# Errors and tracebacks are stored with the operation: bounded, and cleaned of
# what PostgreSQL's text type refuses (NUL) or UTF-8 cannot hold (lone surrogates).
ERROR_LIMIT = 4000
TRACEBACK_LIMIT = 16000


def clean_text(text: str, limit: int = ERROR_LIMIT) -> str:
    cleaned = text.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")
    return cleaned if len(cleaned) <= limit else "…" + cleaned[-(limit - 1) :]


def describe(exc: BaseException) -> str:
    """``TypeName: message``, even for an exception whose __str__ raises."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001
        message = "<its message could not be printed>"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _takes_context(function: Any) -> bool:
    """Trigger functions take (inputs, context) or just (inputs)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) != 1


def main(socket_path: str, secret: str, name: str | None = None) -> None:
    die_with_parent()
    tracing.configure("worker")
    WorkerRuntime(socket_path, secret, name).run()
