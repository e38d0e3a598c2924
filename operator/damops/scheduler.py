"""The scheduler: claims operations for free workers and records their results.

One Scheduler serves one pool. It opens a channel to each worker's sidecar
(local processes or Kubernetes pods alike: it only needs host and port),
tracks every worker as pending, free or active (seed: Pending/Free/Active
workers), and runs one dispatch cycle whenever something changes:

1. write the StatusUpdates received since the last cycle, in one statement;
2. claim one operation for each free worker, in one statement;
3. send each claimed operation to its worker.

A cycle runs on every scheduler heartbeat, on LISTEN/NOTIFY when operations
are inserted, and as soon as a worker becomes free, so dispatch latency is
not bounded by the heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psycopg

from damops import protocol, store
from damops.config import Settings
from damops.dispatch import WorkerState
from damops.protocol import NotReady, Operation, Progress, Ready, StatusUpdate, Welcome
from damops.store import Claimed, Completion

log = logging.getLogger("damops.scheduler")

ExpiredCallback = Callable[[str], Awaitable[None]]
NOTIFY_CHANNEL = "damops_operations"


@dataclass
class WorkerHandle:
    name: str
    host: str
    port: int
    state: WorkerState = WorkerState.PENDING
    draining: bool = False
    operation: Claimed | None = None
    last_touched: float = field(default_factory=time.monotonic)
    pid: int | None = None
    channel: protocol.Channel | None = None
    task: asyncio.Task[None] | None = None

    def touch(self) -> None:
        self.last_touched = time.monotonic()


@dataclass(frozen=True)
class WorkerView:
    name: str
    state: str
    draining: bool
    operation_id: int | None
    last_touched_seconds_ago: float
    pid: int | None


@dataclass(frozen=True)
class Snapshot:
    pending: int
    free: int
    active: int
    draining: int
    workers: list[WorkerView]
    stats: dict[str, int]


@dataclass
class Stats:
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    waited: int = 0
    expired_workers: int = 0
    dropped_channels: int = 0
    dispatch_latency_seconds_total: float = 0.0


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        database_url: str,
        *,
        pool: str | None = None,
        secret: str | None = None,
        on_worker_expired: ExpiredCallback | None = None,
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        self.pool = pool or settings.pool
        self.secret = secret if secret is not None else (settings.secret or "")
        self.on_worker_expired = on_worker_expired
        self.workers: dict[str, WorkerHandle] = {}
        self.stats = Stats()
        self.claiming = True
        self._completions: list[Completion] = []
        self._touches: set[int] = set()
        self._releases: list[tuple[int, int, str]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._conn: psycopg.AsyncConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cycle_lock = asyncio.Lock()
        self._backoff = 0.1  # seconds before the next database retry; doubles up to 5 s

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name=f"dispatch-{self.pool}"),
            asyncio.create_task(self._listen_loop(), name=f"listen-{self.pool}"),
        ]
        log.info("scheduler for pool %r started (heartbeat %.3fs)", self.pool, self.settings.scheduler_heartbeat)

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming, let active operations finish within ``grace`` seconds,
        give the unfinished ones back to NEW and write every StatusUpdate."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.claiming = False
        deadline = time.monotonic() + grace
        while any(h.state is WorkerState.ACTIVE for h in self.workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for handle in self.workers.values():
            if handle.operation is not None:
                op = handle.operation
                self._releases.append((op.id, op.attempt, handle.name))
                handle.operation = None
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_with_retry(deadline=time.monotonic() + 30)
        for handle in list(self.workers.values()):
            await self._close_handle(handle)
        if self._conn is not None:
            await self._conn.close()
        log.info("scheduler for pool %r stopped", self.pool)

    # --- the worker set (called by the local supervisor or the operator) ----

    def add_worker(self, name: str, host: str, port: int) -> None:
        existing = self.workers.get(name)
        if existing is not None:
            if (existing.host, existing.port) == (host, port):
                return
            self.remove_worker(name)
        handle = WorkerHandle(name, host, port)
        handle.task = asyncio.create_task(self._worker_channel(handle), name=f"channel-{name}")
        self.workers[name] = handle

    def drain_worker(self, name: str) -> None:
        """No new work for this worker; it is removed once its operation ends."""
        handle = self.workers.get(name)
        if handle is None:
            return
        handle.draining = True
        if handle.state is not WorkerState.ACTIVE:
            self.remove_worker(name)

    def remove_worker(self, name: str) -> None:
        """Forget a worker now; an operation it holds goes back to NEW."""
        handle = self.workers.pop(name, None)
        if handle is None:
            return
        if handle.operation is not None:
            op = handle.operation
            self._releases.append((op.id, op.attempt, name))
            handle.operation = None
            self._wake.set()
        if handle.task is not None:
            handle.task.cancel()

    def worker_addresses(self) -> dict[str, tuple[str, int]]:
        """name -> (host, port) of every worker the scheduler has a channel (or tries one) to."""
        return {name: (h.host, h.port) for name, h in self.workers.items()}

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        views = [
            WorkerView(
                h.name,
                h.state.value,
                h.draining,
                h.operation.id if h.operation else None,
                round(now - h.last_touched, 3),
                h.pid,
            )
            for h in self.workers.values()
        ]
        count = lambda state: sum(1 for h in self.workers.values() if h.state is state)  # noqa: E731
        return Snapshot(
            pending=count(WorkerState.PENDING),
            free=count(WorkerState.FREE),
            active=count(WorkerState.ACTIVE),
            draining=sum(1 for h in self.workers.values() if h.draining),
            workers=views,
            stats=dict(self.stats.__dict__),
        )

    # --- channels to sidecars ---------------------------------------------

    async def _worker_channel(self, handle: WorkerHandle) -> None:
        delay = 0.05
        while not self._stopping:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(handle.host, handle.port), 5)
                channel = protocol.Channel(reader, writer)
                await channel.open_handshake(self.secret, "scheduler")
                welcome = await channel.receive()
                if not isinstance(welcome, Welcome):
                    raise protocol.ProtocolError(f"expected welcome, got {welcome.type}")
                handle.channel = channel
                delay = 0.05
                self._adopt(handle, welcome)
                await self._read_channel(handle, channel)
            except asyncio.CancelledError:
                await self._close_handle(handle)
                raise
            except (TimeoutError, OSError, asyncio.IncompleteReadError, protocol.ProtocolError) as exc:
                if handle.channel is not None:
                    self.stats.dropped_channels += 1
                    log.warning("channel to worker %s dropped: %s", handle.name, exc or type(exc).__name__)
                await self._lose_channel(
                    handle, f"channel to worker {handle.name} dropped: {exc or type(exc).__name__}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _adopt(self, handle: WorkerHandle, welcome: Welcome) -> None:
        """A sidecar already busy (handed work by a previous scheduler) stays active."""
        if welcome.busy_operation is not None and handle.operation is None:
            handle.operation = Claimed(welcome.busy_operation, "?", None, welcome.busy_attempt or 0, handle.name)
            handle.state = WorkerState.ACTIVE
            handle.touch()

    async def _read_channel(self, handle: WorkerHandle, channel: protocol.Channel) -> None:
        beat = asyncio.create_task(protocol.heartbeat_loop(channel))
        try:
            while True:
                message = await channel.receive(timeout=None)
                if isinstance(message, StatusUpdate):
                    self._on_status(handle, message)
                elif isinstance(message, Ready):
                    handle.pid = message.pid
                    if handle.state is WorkerState.PENDING:
                        handle.state = WorkerState.FREE
                        handle.touch()
                        log.debug("worker %s ready (pid %d)", handle.name, message.pid)
                        self._wake.set()
                elif isinstance(message, Progress):
                    handle.touch()
                    self._touches.add(message.id)
                elif isinstance(message, NotReady):
                    handle.state = WorkerState.PENDING
                    handle.touch()
                elif not isinstance(message, protocol.Heartbeat):
                    raise protocol.ProtocolError(f"unexpected {message.type} from sidecar {handle.name}")
        finally:
            beat.cancel()

    def _on_status(self, handle: WorkerHandle, update: StatusUpdate) -> None:
        self._completions.append(Completion(update, handle.name))
        if handle.operation is not None and handle.operation.id == update.id:
            handle.operation = None
            if handle.state is WorkerState.ACTIVE:
                handle.state = WorkerState.FREE
            handle.touch()
            if handle.draining:
                self.remove_worker(handle.name)
        self._wake.set()

    async def _lose_channel(self, handle: WorkerHandle, reason: str) -> None:
        channel, handle.channel = handle.channel, None
        if channel is not None:
            await channel.close()
        self._recover(handle, reason)
        handle.state = WorkerState.PENDING

    def _recover(self, handle: WorkerHandle, reason: str) -> None:
        """The worker's operation is recovered: retried while attempts remain, else FAILED."""
        if handle.operation is None:
            return
        op, handle.operation = handle.operation, None
        self._completions.append(
            Completion(
                StatusUpdate(id=op.id, attempt=op.attempt, outcome="failure", error=reason, retryable=True), handle.name
            )
        )
        self._wake.set()

    async def _close_handle(self, handle: WorkerHandle) -> None:
        if handle.channel is not None:
            channel, handle.channel = handle.channel, None
            await channel.close()

    # --- the dispatch cycle ---------------------------------------------------

    async def _dispatch_loop(self) -> None:
        last_expiry_check = time.monotonic()
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.scheduler_heartbeat)
            except TimeoutError:
                pass
            self._wake.clear()
            if time.monotonic() - last_expiry_check >= self.settings.scheduler_heartbeat:
                last_expiry_check = time.monotonic()
                self._expire_workers()
            try:
                await self._cycle()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                await self._database_lost(exc)

    async def _database_lost(self, exc: Exception) -> None:
        log.warning("database unreachable (%s); retrying", str(exc).strip().splitlines()[0] if str(exc) else exc)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, 5.0)
        self._wake.set()

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True, prepare_threshold=0)
            self._backoff = 0.1
        return self._conn

    async def _cycle(self) -> None:
        """Write what workers reported and claim for the free ones: one round
        trip to the database (pipeline mode), whatever the number of workers."""
        async with self._cycle_lock:
            conn = await self._connection()
            free = []
            if self.claiming and not self._stopping:
                free = [
                    h
                    for h in self.workers.values()
                    if h.state is WorkerState.FREE and not h.draining and h.channel is not None
                ]
            completions, self._completions = self._completions, []
            touches, self._touches = self._touches, set()
            releases, self._releases = self._releases, []
            if not (free or completions or touches or releases):
                return
            started = time.monotonic()
            try:
                # One transaction: one commit (one WAL flush) per cycle, not one per statement.
                async with conn.pipeline(), conn.transaction():
                    applied = await self._queue_writes(conn, completions, touches, releases)
                    claim = None
                    if free:
                        claim = await conn.execute(
                            store.CLAIM_SQL,
                            store.claim_params(
                                self.pool, [h.name for h in free], self.settings.operation_wait_interval
                            ),
                        )
                # Leaving the pipeline block has sent everything and read every result.
                if applied is not None:
                    self._count({r[0]: r[1] for r in await applied.fetchall()})
                claimed = [Claimed(*row) for row in await claim.fetchall()] if claim is not None else []
            except BaseException:
                self._requeue(completions, touches, releases)
                raise
            for op in claimed:
                self._send(op)
            if claimed:
                self.stats.claimed += len(claimed)
                self.stats.dispatch_latency_seconds_total += time.monotonic() - started
            if claimed and len(claimed) == len(free):
                self._wake.set()  # the queue may hold more: look again when workers free up

    async def _queue_writes(
        self,
        conn: psycopg.AsyncConnection,
        completions: list[Completion],
        touches: set[int],
        releases: list[tuple[int, int, str]],
    ) -> psycopg.AsyncCursor | None:
        """Queue the buffered StatusUpdates, touches and releases on ``conn``;
        return the cursor of the StatusUpdates (its rows say what was applied)."""
        applied = None
        if completions:
            applied = await conn.execute(
                store.COMPLETE_SQL,
                store.complete_params(
                    completions,
                    policy=store.RetryPolicy.from_settings(self.settings),
                    default_max_attempts=self.settings.max_attempts,
                ),
            )
        if touches:
            await conn.execute(store.TOUCH_SQL, store.touch_params(touches))
        if releases:
            await conn.execute(
                store.RELEASE_SQL,
                store.release_params(releases, "released: its worker or scheduler stopped before it finished"),
            )
        return applied

    def _requeue(self, completions: list[Completion], touches: set[int], releases: list[tuple[int, int, str]]) -> None:
        """A database error: put the writes back. Replaying them is safe, every
        statement checks the row is still held by that worker and attempt."""
        self._completions[:0] = completions
        self._touches |= touches
        self._releases[:0] = releases

    def _send(self, op: Claimed) -> None:
        handle = self.workers.get(op.worker)
        if handle is None or handle.state is not WorkerState.FREE or handle.channel is None:
            # The worker went away while we claimed: give the operation back untouched.
            self._releases.append((op.id, op.attempt, op.worker))
            return
        handle.state = WorkerState.ACTIVE
        handle.operation = op
        handle.touch()
        try:
            handle.channel.send_nowait(
                Operation(id=op.id, trigger_function=op.trigger_function, inputs=op.inputs, attempt=op.attempt)
            )
        except protocol.ProtocolError as exc:  # inputs too large for one frame
            handle.operation = None
            handle.state = WorkerState.FREE
            self._completions.append(
                Completion(
                    StatusUpdate(
                        id=op.id,
                        attempt=op.attempt,
                        outcome="failure",
                        error=f"inputs too large: {exc}",
                        retryable=False,
                    ),
                    op.worker,
                )
            )

    async def _flush(self, conn: psycopg.AsyncConnection) -> None:
        """Write buffered StatusUpdates, touches and releases (at shutdown)."""
        completions, self._completions = self._completions, []
        touches, self._touches = self._touches, set()
        releases, self._releases = self._releases, []
        try:
            async with conn.pipeline():
                applied = await self._queue_writes(conn, completions, touches, releases)
            if applied is not None:
                self._count({r[0]: r[1] for r in await applied.fetchall()})
        except BaseException:
            self._requeue(completions, touches, releases)
            raise

    async def _flush_with_retry(self, deadline: float) -> None:
        while self._completions or self._touches or self._releases:
            try:
                await self._flush(await self._connection())
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if time.monotonic() > deadline:
                    log.error("could not write %d StatusUpdates before shutdown: %s", len(self._completions), exc)
                    return
                self._conn = None
                await asyncio.sleep(0.5)

    def _count(self, applied: dict[int, str]) -> None:
        for status in applied.values():
            if status == "SUCCESS":
                self.stats.succeeded += 1
            elif status == "FAILED":
                self.stats.failed += 1
            elif status == "NEW":
                self.stats.retried += 1
            elif status == "WAIT":
                self.stats.waited += 1

    # --- expired workers (seed: Expired worker) --------------------------------

    def _expire_workers(self) -> None:
        limit = self.settings.max_worker_active_time
        now = time.monotonic()
        for handle in list(self.workers.values()):
            if handle.state is WorkerState.ACTIVE and now - handle.last_touched > limit:
                self.stats.expired_workers += 1
                op_id = handle.operation.id if handle.operation else None
                log.warning(
                    "worker %s expired: active on operation %s for longer than "
                    "MAX_WORKER_ACTIVE_TIME (%.0fs); restarting it",
                    handle.name,
                    op_id,
                    limit,
                )
                self._recover(
                    handle, f"worker {handle.name} expired: active for longer than MAX_WORKER_ACTIVE_TIME ({limit:g}s)"
                )
                handle.state = WorkerState.PENDING
                handle.touch()
                if self.on_worker_expired is not None:
                    asyncio.create_task(self.on_worker_expired(handle.name))

    # --- LISTEN/NOTIFY ------------------------------------------------------

    async def _listen_loop(self) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    delay = 0.1
                    self._wake.set()  # catch anything inserted while we were not listening
                    async for notify in conn.notifies():
                        if notify.payload == self.pool:
                            self._wake.set()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                log.debug("LISTEN connection lost: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
