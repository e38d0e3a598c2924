"""The worker process: pre-heated, long-lived, one operation at a time.

It talks only to its sidecar, over a Unix socket. It connects, proves it knows
the shared secret, says Ready, then runs each Operation it is given and answers
with one StatusUpdate.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from typing import Any

from damops import protocol
from damops.protocol import Heartbeat, Operation, Progress, Ready, Shutdown, StatusUpdate
from damops.triggers import Context, PermanentError, TriggerRegistry, UnknownTriggerFunction, Wait

log = logging.getLogger("damops.worker")


class WorkerRuntime:
    def __init__(self, socket_path: str, secret: str, name: str | None = None,
                 max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.socket_path = socket_path
        self.secret = secret
        self.name = name or socket.gethostname()
        self.max_frame_bytes = max_frame_bytes
        self.registry = TriggerRegistry()
        self._channel: protocol.Channel | None = None

    async def run(self) -> None:
        reader, writer = await self._connect()
        channel = self._channel = protocol.Channel(reader, writer, self.max_frame_bytes)
        await channel.open_handshake(self.secret, "worker")
        await channel.send(Ready(worker=self.name, pid=os.getpid()))
        log.info("worker %s (pid %d) ready", self.name, os.getpid())
        beat = asyncio.create_task(protocol.heartbeat_loop(channel))
        try:
            while True:
                message = await channel.receive()
                if isinstance(message, Operation):
                    update = await self.handle(message)
                    await channel.send(self._fit(update))
                elif isinstance(message, Shutdown):
                    log.info("worker %s shutting down", self.name)
                    return
                elif not isinstance(message, Heartbeat):
                    raise protocol.ProtocolError(f"unexpected {message.type} from the sidecar")
        finally:
            beat.cancel()
            await channel.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The sidecar may start after us: retry until its socket answers."""
        delay = 0.02
        for _ in range(600):
            try:
                return await asyncio.open_unix_connection(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        raise ConnectionError(f"no sidecar listening on {self.socket_path}")

    def _report_progress(self, operation_id: int, loop: asyncio.AbstractEventLoop):
        def report(message: str | None, fraction: float | None) -> None:
            frame = Progress(id=operation_id, message=message, fraction=fraction)
            if self._channel is not None:
                loop.call_soon_threadsafe(self._channel.send_nowait, frame)
        return report

    async def handle(self, op: Operation) -> StatusUpdate:
        """Run one operation; every outcome becomes exactly one StatusUpdate."""
        def failure(error: str, retryable: bool) -> StatusUpdate:
            return StatusUpdate(id=op.id, attempt=op.attempt, outcome="failure", error=error, retryable=retryable)

        try:
            function = self.registry.resolve(op.trigger_function)
        except UnknownTriggerFunction as exc:
            return failure(str(exc), retryable=False)
        context = Context(
            operation_id=op.id,
            attempt=op.attempt,
            logger=logging.getLogger(f"damops.trigger.{op.trigger_function}"),
            _report_progress=self._report_progress(op.id, asyncio.get_running_loop()),
        )
        args = _arguments(function, op.inputs, context)
        try:
            if inspect.iscoroutinefunction(function):
                result = await function(*args)
            else:
                # A thread keeps heartbeats flowing while sync code runs.
                result = await asyncio.to_thread(function, *args)
                if inspect.isawaitable(result):
                    result = await result
        except PermanentError as exc:
            return failure(f"PermanentError: {exc}", retryable=False)
        except Exception as exc:  # noqa: BLE001 - any error of user code fails the operation
            log.info("operation %d: %s raised %s: %s", op.id, op.trigger_function, type(exc).__name__, exc)
            return failure(f"{type(exc).__name__}: {exc}", retryable=True)
        if isinstance(result, Wait):
            return StatusUpdate(id=op.id, attempt=op.attempt, outcome="wait", error=result.reason or None)
        problem = protocol.is_json_serializable(result)
        if problem:
            return failure(
                f"the result of trigger function {op.trigger_function!r} is not JSON-serializable: {problem}",
                retryable=False,
            )
        return StatusUpdate(id=op.id, attempt=op.attempt, outcome="success", result=result)

    def _fit(self, update: StatusUpdate) -> StatusUpdate:
        """A result too large for one frame fails the operation instead of the channel."""
        try:
            protocol.encode(update, self.max_frame_bytes)
        except protocol.ProtocolError as exc:
            return StatusUpdate(id=update.id, attempt=update.attempt, outcome="failure",
                                error=f"result too large: {exc}", retryable=False)
        return update


def _arguments(function: Any, inputs: Any, context: Context) -> tuple[Any, ...]:
    """Trigger functions take (inputs, context) or just (inputs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return (inputs, context)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return (inputs,)
    return (inputs, context)


def main(socket_path: str, secret: str, name: str | None = None) -> None:
    asyncio.run(WorkerRuntime(socket_path, secret, name).run())
