"""The sidecar: the worker's only door to the world.

It listens on a Unix socket for its worker and on TCP for the scheduler,
relays Operations one way and StatusUpdates/Progress the other, checks the
shared secret on both, and answers Kubernetes probes over HTTP: ``/readyz``
is 200 only while the worker has signalled ready, ``/livez`` while it runs.

A StatusUpdate that arrives while no scheduler is connected is kept and
delivered to the next scheduler that connects, so a scheduler restart loses
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable

from damops import logs, protocol
from damops.lifeline import die_with_parent
from damops.loop import run as run_loop
from damops.protocol import (
    Cancel,
    Heartbeat,
    NotReady,
    Operation,
    Progress,
    ProtocolError,
    Ready,
    Shutdown,
    StatusUpdate,
    Welcome,
    Withdraw,
)

log = logging.getLogger("damops.sidecar")

# After SIGTERM, how long an idle sidecar waits for its worker to exit first.
WORKER_EXIT_WAIT = 2.0


class Sidecar:
    def __init__(
        self, name: str, secret: str, socket_path: str, max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        self.name = name
        self.secret = secret
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes
        self.worker: protocol.Channel | None = None
        self.worker_ready: Ready | None = None
        self.scheduler: protocol.Channel | None = None
        self.assignment: Operation | None = None  # what the worker is running
        # Prefetched, in the order sent: already in the worker's socket, each starts when
        # the one before ends (no wake-up of this process between them) unless withdrawn first.
        self.held: list[Operation] = []
        self.undelivered: list[StatusUpdate] = []
        self.stopped = asyncio.Event()
        self.boot = secrets.token_hex(8)
        self.terminating = False
        self._exit_timer: asyncio.TimerHandle | None = None
        self.pool = os.environ.get("DAMOPS_POOL") or None  # for log lines only

    # --- servers -----------------------------------------------------------

    async def serve(
        self,
        listen_host: str | None = None,
        listen_port: int | None = None,
        listen_fd: int | None = None,
        health_port: int | None = None,
    ) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        worker_server = await asyncio.start_unix_server(_ends_quietly(self._on_worker), path=self.socket_path)
        os.chmod(self.socket_path, 0o660)
        if listen_fd is not None:
            sock = socket.socket(fileno=listen_fd)
            scheduler_server = await asyncio.start_server(_ends_quietly(self._on_scheduler), sock=sock)
        else:
            scheduler_server = await asyncio.start_server(_ends_quietly(self._on_scheduler), listen_host, listen_port)
        servers = [worker_server, scheduler_server]
        if health_port is not None:
            servers.append(await asyncio.start_server(_ends_quietly(self._on_health), "0.0.0.0", health_port))
        log.info(
            "sidecar %s listening: worker socket %s, scheduler %s",
            self.name,
            self.socket_path,
            scheduler_server.sockets[0].getsockname(),
        )
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.terminate)
        try:
            await self.stopped.wait()
        finally:
            for server in servers:
                server.close()

    def terminate(self) -> None:
        """SIGTERM (a pod deleted, a node drained): take no new operation; exit at once
        when idle, else once the running operation's StatusUpdate is handed over."""
        if not self.terminating:
            log.info(
                "sidecar %s: SIGTERM, %s",
                self.name,
                "finishing its operation first" if self.assignment else "idle, exiting",
                extra=self._about(self.assignment),
            )
        self.terminating = True
        self._withdraw_held("its sidecar is stopping")
        self._exit_when_idle()

    def _exit_when_idle(self) -> None:
        if not (self.terminating and self.assignment is None and not self.held and not self.undelivered):
            return
        if self.worker is None:
            self.stopped.set()
        elif self._exit_timer is None:
            # The worker got the same SIGTERM and exits once its StatusUpdate is out:
            # let it go first (a supervisor seeing the sidecar gone would kill it).
            self._exit_timer = asyncio.get_running_loop().call_later(WORKER_EXIT_WAIT, self.stopped.set)

    # --- the worker side ---------------------------------------------------

    async def _on_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = protocol.Channel(reader, writer, self.max_frame_bytes)
        try:
            await channel.accept_handshake(self.secret, "worker")
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.warning("dropping worker connection: %s", exc)
            await channel.close()
            return
        if self.worker is not None:
            log.warning("refusing a second worker connection: one worker per sidecar")
            await channel.close()
            return
        self.worker = channel
        beat = asyncio.create_task(protocol.heartbeat_loop(channel))
        reason = "worker disconnected"
        try:
            await channel.dispatch(self._from_worker)  # ends by raising: the connection ended
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            reason = f"worker connection dropped: {exc or type(exc).__name__}"
            # Expected when both were told to stop, or when an idle worker closed its end
            # between frames (it was told to stop first; its supervisor says why it ended).
            # A warning when an operation was lost or the connection broke mid-frame.
            quiet = self.terminating or (self.assignment is None and _closed_between_frames(exc))
            (log.info if quiet else log.warning)("%s", reason, extra=self._about(self.assignment))
        finally:
            beat.cancel()
            self.worker = None
            self.worker_ready = None
            await channel.close()
            # NotReady first: the scheduler must not take the lost operation's
            # StatusUpdate as a sign that this worker is free.
            self._to_scheduler(NotReady(reason=reason))
            if self.assignment is not None:
                lost, self.assignment = self.assignment, None
                self._deliver(
                    StatusUpdate.failure(
                        lost.id, lost.attempt, f"worker process lost while running the operation ({reason})"
                    )
                )
            self._hand_back("its worker went away before it started")
            self._exit_when_idle()

    def _from_worker(self, message: protocol.Message, frame: bytes) -> None:
        if isinstance(message, StatusUpdate):
            if self.assignment and self.assignment.id == message.id:
                # The worker starts the next held one (if any) right after this StatusUpdate.
                self.assignment = self.held.pop(0) if self.held else None
            else:
                withdrawn = next((op for op in self.held if op.id == message.id), None)
                if withdrawn is not None:
                    self.held.remove(withdrawn)  # the worker handed it back unrun
            self._deliver(message, frame)
        elif isinstance(message, Progress):
            if self.scheduler is not None:
                self.scheduler.send_frame_nowait(frame)
        elif isinstance(message, Ready):
            self.worker_ready = message
            self._to_scheduler(Ready(worker=self.name, pid=message.pid))
        elif not isinstance(message, Heartbeat):
            raise ProtocolError(f"unexpected {message.type} from the worker")

    def _about(self, op: Operation | None) -> dict[str, object]:
        """Log fields of the operation a line is about (none when idle)."""
        if op is None:
            return {}
        return logs.fields(op.id, op.trigger_function, op.attempt, self.pool, self.name)

    # --- the scheduler side ------------------------------------------------

    async def _on_scheduler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = protocol.Channel(reader, writer, self.max_frame_bytes)
        try:
            await channel.accept_handshake(self.secret, "scheduler")
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.warning("dropping scheduler connection from %s: %s", channel.peer, exc)
            await channel.close()
            return
        # Prefetched for an earlier scheduler: withdrawn; its worker's answer (handed back,
        # or its StatusUpdate if it started meanwhile) follows the Welcome.
        self._withdraw_held("a new scheduler connected")
        previous, self.scheduler = self.scheduler, channel
        if previous is not None:  # the newest scheduler wins (e.g. after an operator restart)
            await previous.close()
        busy = self.assignment
        channel.send_nowait(
            Welcome(
                worker=self.name,
                busy_operation=busy.id if busy else None,
                busy_attempt=busy.attempt if busy else None,
                boot=self.boot,
                undelivered=[update.id for update in self.undelivered] + [op.id for op in self.held],
            )
        )
        for update in self.undelivered:
            channel.send_nowait(update)
        self.undelivered.clear()
        self._exit_when_idle()
        if self.worker_ready is not None and self.assignment is None:
            channel.send_nowait(Ready(worker=self.name, pid=self.worker_ready.pid))
        beat = asyncio.create_task(protocol.heartbeat_loop(channel))
        try:
            await channel.dispatch(self._from_scheduler)
        except asyncio.IncompleteReadError:
            log.info("scheduler %s disconnected", channel.peer)
        except (ProtocolError, ConnectionError) as exc:
            log.warning("dropping scheduler connection from %s: %s", channel.peer, exc or type(exc).__name__)
        finally:
            beat.cancel()
            if self.scheduler is channel:
                self.scheduler = None
                self._withdraw_held("its scheduler's channel dropped")  # the answer is kept for the next one
            await channel.close()

    def _from_scheduler(self, message: protocol.Message, frame: bytes) -> bool:
        """One frame from the scheduler; True (a Shutdown) ends the channel."""
        if isinstance(message, Operation):
            self._assign(message, frame)
        elif isinstance(message, Cancel):
            running = self.assignment
            if running and (running.id, running.attempt) == (message.id, message.attempt) and self.worker:
                self.worker.send_frame_nowait(frame)
        elif isinstance(message, Withdraw):
            for op in self.held:
                if (op.id, op.attempt) == (message.id, message.attempt):
                    self._withdraw(op, "withdrawn by the scheduler")
        elif isinstance(message, Shutdown):
            if self.worker is not None:
                self.worker.send_nowait(message)
            self.stopped.set()
            return True
        elif not isinstance(message, Heartbeat):
            raise ProtocolError(f"unexpected {message.type} from the scheduler")
        return False

    def _assign(self, op: Operation, frame: bytes) -> None:
        ready = self.worker is not None and self.worker_ready is not None and not self.terminating
        if ready and self.worker is not None and self.assignment is not None and op.prefetched:
            self.held.append(op)  # the scheduler bounds how many (WORKER_PREFETCH_DEPTH)
            self.worker.send_frame_nowait(frame)
            return
        if self.worker is None or not ready or self.assignment is not None:
            state = "busy" if self.assignment else "stopping" if self.terminating else "not ready"
            self._deliver(StatusUpdate.failure(op.id, op.attempt, f"worker {self.name} is {state}", executed=False))
            return
        self.assignment = op
        self.worker.send_frame_nowait(frame)

    def _withdraw_held(self, reason: str) -> None:
        """Ask the worker to hand every prefetched operation back unrun."""
        for op in self.held:
            self._withdraw(op, reason)

    def _withdraw(self, op: Operation, reason: str) -> None:
        """The worker answers with a StatusUpdate: handed back, or (it had started) the run's own."""
        if self.worker is not None:
            self.worker.send_nowait(Withdraw(id=op.id, attempt=op.attempt, reason=reason))

    def _hand_back(self, reason: str) -> None:
        """The worker is gone before it started the prefetched operations (it starts one
        only after the one before's StatusUpdate): they go back unrun, their attempts given back."""
        held, self.held = self.held, []
        for op in held:
            self._deliver(StatusUpdate.handed_back(op.id, op.attempt, reason))

    def _deliver(self, update: StatusUpdate, frame: bytes | None = None) -> None:
        """To the scheduler now, or kept for the next one that connects."""
        if self.scheduler is not None:
            if frame is not None:
                self.scheduler.send_frame_nowait(frame)
            else:
                self.scheduler.send_nowait(update)
        else:
            self.undelivered.append(update)
        self._exit_when_idle()

    def _to_scheduler(self, message: protocol._Message) -> None:
        if self.scheduler is not None:
            self.scheduler.send_nowait(message)

    # --- probes ------------------------------------------------------------

    async def _on_health(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            if path.startswith("/readyz"):
                ok = self.worker_ready is not None and not self.terminating
                body = b"ready\n" if ok else b"worker not ready\n"
            else:
                ok, body = True, b"alive\n"
            status = b"200 OK" if ok else b"503 Service Unavailable"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: text/plain\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()


def _closed_between_frames(exc: BaseException) -> bool:
    """The peer closed its end cleanly: end of stream where the next frame would start."""
    return isinstance(exc, asyncio.IncompleteReadError) and not exc.partial and exc.expected == protocol.HEADER_BYTES


def _ends_quietly(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A connection handler cancelled at shutdown ends normally: asyncio would
    otherwise log a traceback for each connection still open when the sidecar exits."""

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            writer.close()

    return run


def main(
    name: str, secret: str, socket_path: str, listen: str | None, listen_fd: int | None, health_port: int | None
) -> None:
    die_with_parent()
    host, port = None, None
    if listen:
        host, _, port_text = listen.rpartition(":")
        port = int(port_text)
    sidecar = Sidecar(name, secret, socket_path)
    run_loop(sidecar.serve(host or "0.0.0.0", port, listen_fd, health_port))
