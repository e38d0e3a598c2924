"""The worker process: pre-heated, long-lived, one operation at a time.

It talks only to its sidecar, over a Unix socket. It connects, proves it knows
the shared secret, says Ready, then runs each Operation it is given and answers
with exactly one StatusUpdate.

A worker does one thing at a time, so it uses plain blocking sockets: the main
thread receives and runs operations, a small thread sends heartbeats so the
sidecar knows a long operation is still alive. Async trigger functions run on
one event loop kept for the life of the process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import queue
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
from damops.protocol import Cancel, Heartbeat, Operation, Progress, Ready, Shutdown, StatusUpdate
from damops.triggers import Context, PermanentError, Retry, TriggerRegistry, UnknownTriggerFunction, Wait

log = logging.getLogger("damops.worker")


@dataclass(frozen=True)
class _Resolved:
    function: Callable[..., Any]
    takes_context: bool
    is_async: bool
    logger: logging.Logger


class BlockingChannel:
    """Length-prefixed frames over a blocking socket; sends are thread-safe."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self._send_lock = threading.Lock()
        self._file = sock.makefile("rb")

    def send(self, message: protocol._Message) -> None:
        self.send_frame(protocol.encode(message, self.max_frame_bytes))

    def send_frame(self, frame: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self) -> protocol.Message:
        header = self._file.read(protocol.HEADER_BYTES)
        if len(header) < protocol.HEADER_BYTES:
            raise EOFError("the sidecar closed the connection")
        length = protocol.frame_length(header, self.max_frame_bytes)
        body = self._file.read(length)
        if len(body) < length:
            raise EOFError("the sidecar closed the connection mid-frame")
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
        self._cancels: dict[tuple[int, int], threading.Event] = {}  # per queued or running operation
        self._cancels_lock = threading.Lock()
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
        inbox: queue.Queue[Operation | BaseException | None] = queue.Queue()
        threading.Thread(target=self._read, args=(channel, inbox), daemon=True, name="reader").start()
        try:
            while True:
                item = inbox.get()
                if item is None:
                    log.info("worker %s shutting down", self.name)
                    return
                if isinstance(item, BaseException):
                    raise item
                self._running = True
                try:
                    channel.send_frame(self._frame(self._observed(item)))
                finally:
                    self._running = False
                    with self._cancels_lock:
                        self._cancels.pop((item.id, item.attempt), None)
                if self._terminating:
                    log.info("worker %s: finished its operation after SIGTERM, exiting", self.name)
                    return
        finally:
            stop_beating.set()
            channel.close()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        """Idle: exit now. Running an operation: finish it, send its StatusUpdate, then exit."""
        self._terminating = True
        if not self._running:
            raise SystemExit(0)

    def _read(self, channel: BlockingChannel, inbox: queue.Queue[Operation | BaseException | None]) -> None:
        """The reader thread: operations go to the main thread, a Cancel reaches the
        running operation's context at once (the main thread is busy running it)."""
        try:
            while True:
                message = channel.receive()
                if isinstance(message, Operation):
                    with self._cancels_lock:
                        self._cancels[(message.id, message.attempt)] = threading.Event()
                    inbox.put(message)
                elif isinstance(message, Cancel):
                    with self._cancels_lock:
                        event = self._cancels.get((message.id, message.attempt))
                    if event is not None:
                        log.info(
                            "operation %d: cancel requested",
                            message.id,
                            extra=logs.fields(message.id, None, message.attempt, self.pool, self.name),
                        )
                        event.set()
                elif isinstance(message, Shutdown):
                    inbox.put(None)
                    return
                elif not isinstance(message, Heartbeat):
                    raise protocol.ProtocolError(f"unexpected {message.type} from the sidecar")
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which ends the worker
            inbox.put(exc)

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

    @staticmethod
    def _heartbeat(channel: BlockingChannel, stop: threading.Event) -> None:
        while not stop.wait(protocol.HEARTBEAT_INTERVAL):
            try:
                channel.send(Heartbeat())
            except OSError:
                return

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
            with self._cancels_lock:
                cancel = self._cancels.setdefault((op.id, op.attempt), threading.Event())
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
