"""The scheduler: the I/O shell around the dispatch core (:mod:`damops.dispatch`).

One Scheduler serves one pool. It keeps a channel open to each worker's
sidecar (a local process or a pod: it only needs host and port), feeds what
it hears into the :class:`~damops.dispatch.WorkerTable` and applies what the
table decides. A dispatch cycle runs on every scheduler heartbeat, on
LISTEN/NOTIFY when operations are inserted, and as soon as a worker becomes
free; it is one pipelined transaction (one WAL flush):

1. write the StatusUpdates, progress and give-backs buffered since the last cycle;
2. claim one operation for each free worker;
3. after the commit, send each claimed operation to its worker.

When the database connection fails in a cycle, the COMMIT may or may not have
reached the server; the next cycle first looks at the rows (claimed for the
workers that were free) and sends or releases each, so no claimed operation
waits for housekeeping. A statement the server refuses (a StatusUpdate that
cannot be stored) is retried row by row, so one bad row never blocks the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import psycopg

from damops import protocol, store
from damops.config import Settings
from damops.dispatch import Completion, Effects, Lease, PendingWrites, WorkerState, WorkerTable, failure
from damops.protocol import NotReady, Progress, Ready, StatusUpdate, Welcome
from damops.safejson import register_safe_jsonb, undecodable_reason

log = logging.getLogger("damops.scheduler")

ExpiredCallback = Callable[[str], Coroutine[Any, Any, None]]
NOTIFY_CHANNEL = "damops_operations"
RELEASE_REASON = "released: its worker or scheduler stopped before it finished"


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
    stats: dict[str, int | float]


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
        self.on_worker_expired = on_worker_expired  # kills and replaces a worker
        self.table = WorkerTable()
        self.stats = self.table.stats
        self.claiming = True
        self._writes = PendingWrites()
        self._addresses: dict[str, tuple[str, int]] = {}
        self._channels: dict[str, protocol.Channel] = {}
        self._channel_tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._unresolved: set[str] = set()  # workers a possibly committed claim was for
        self._wake = asyncio.Event()
        self._stopping = False
        self._conn: psycopg.AsyncConnection | None = None
        self._backoff = 0.1  # seconds before the next database retry; doubles up to 5 s
        self._loops: list[asyncio.Task[None]] = []

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name=f"dispatch-{self.pool}"),
            asyncio.create_task(self._listen_loop(), name=f"listen-{self.pool}"),
        ]
        log.info("scheduler for pool %r started (heartbeat %.3fs)", self.pool, self.settings.scheduler_heartbeat)

    async def stop(self, grace: float | None = None, *, release: bool = True) -> None:
        """Stop claiming and let active operations finish within ``grace`` seconds.
        With ``release``, the unfinished ones are stopped (their workers killed, so
        they cannot finish later) and go back to NEW with their attempt given back;
        without, their sidecars keep them for the next scheduler to adopt."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.claiming = False
        deadline = time.monotonic() + grace
        while self.table.leases() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if release and self.table.leases():
            if self.on_worker_expired is not None:
                await asyncio.gather(*(self.on_worker_expired(lease.worker) for lease in self.table.leases()))
            self._apply(self.table.release_all())
        self._stopping = True
        self._wake.set()
        await asyncio.gather(self._loops[0], return_exceptions=True)  # the dispatch loop ends its cycle
        self._loops[1].cancel()
        await self._flush(deadline=time.monotonic() + 30)
        for task in [*self._channel_tasks.values(), *self._background]:
            task.cancel()
        await asyncio.gather(*self._channel_tasks.values(), *self._background, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
        log.info("scheduler for pool %r stopped", self.pool)

    # --- the worker set (called by the local supervisor or the operator) ----

    def add_worker(self, name: str, host: str, port: int) -> None:
        if self._addresses.get(name) == (host, port):
            return
        if name in self._addresses:
            self.remove_worker(name)
        self._addresses[name] = (host, port)
        self.table.add(name, time.monotonic())
        self._channel_tasks[name] = asyncio.create_task(self._worker_channel(name), name=f"channel-{name}")

    def drain_worker(self, name: str) -> None:
        """No new work for this worker; it is removed once its operation ends."""
        self._apply(self.table.drain(name))

    def remove_worker(self, name: str) -> None:
        """Forget a worker now (its pod or process is gone); an operation it held is recovered."""
        self._apply(self.table.remove(name, f"worker {name} went away while it ran the operation"))

    def worker_lost(self, name: str, reason: str) -> None:
        """The worker's processes are gone but it will be restarted under the same name."""
        self._apply(self.table.lost(name, reason, time.monotonic()))

    def worker_addresses(self) -> dict[str, tuple[str, int]]:
        """name -> (host, port) of every worker the scheduler has a channel (or tries one) to."""
        return dict(self._addresses)

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        workers = self.table.workers.values()
        views = [
            WorkerView(
                w.name,
                w.state.value,
                w.draining,
                w.lease.id if w.lease else None,
                round(now - w.last_touched, 3),
                w.pid,
            )
            for w in workers
        ]
        return Snapshot(
            pending=self.table.count(WorkerState.PENDING),
            free=self.table.count(WorkerState.FREE),
            active=self.table.count(WorkerState.ACTIVE),
            draining=sum(1 for w in workers if w.draining),
            workers=views,
            stats=dict(self.stats.__dict__),
        )

    async def recover_abandoned(self, worker_prefix: str, abandoned: Callable[[str], bool], reason: str) -> int:
        """At start-up: operations left PROCESSING by workers whose processes are gone
        (``abandoned(worker)``) are recovered now, not after MAX_OPERATION_PROCESSING_TIME."""
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
            cur = await conn.execute(store.HELD_BY_SQL, {"pool": self.pool, "prefix": worker_prefix + "%"})
            rows = [row for row in await cur.fetchall() if abandoned(row[2])]
        for op_id, attempt, worker in rows:
            self._writes.completions.append(Completion(failure(Lease(op_id, attempt, worker), reason), worker))
        if rows:
            log.warning(
                "recovering %d operation(s) left PROCESSING by a run that died: %s",
                len(rows),
                ", ".join(str(row[0]) for row in rows),
            )
            self._wake.set()
        return len(rows)

    # --- applying the core's decisions ----------------------------------------

    def _apply(self, effects: Effects) -> None:
        self._writes.add(effects)
        for lease in effects.send:
            self._send(lease)
        for name in effects.restart:
            if self.on_worker_expired is not None:
                task = asyncio.create_task(self.on_worker_expired(name))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        for name in effects.forget:
            self._addresses.pop(name, None)
            channel_task = self._channel_tasks.pop(name, None)
            if channel_task is not None:
                channel_task.cancel()
        if effects.wake or effects.completions or effects.releases:
            self._wake.set()

    def _send(self, lease: Lease) -> None:
        problem = undecodable_reason(lease.inputs) or protocol.json_problem(lease.inputs)
        try:
            if problem:
                raise protocol.ProtocolError(problem)
            self._channels[lease.worker].send_nowait(lease.operation())
        except Exception as exc:  # noqa: BLE001 - too large, too deep...: fails this operation only
            log.warning("operation %d cannot be sent to worker %s: %s", lease.id, lease.worker, exc)
            self._apply(self.table.undeliverable(lease, f"inputs cannot be sent to a worker: {exc}"))

    # --- channels to sidecars ---------------------------------------------

    async def _worker_channel(self, name: str) -> None:
        delay = 0.05
        while not self._stopping and name in self._addresses:
            channel: protocol.Channel | None = None
            try:
                host, port = self._addresses[name]
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                channel = protocol.Channel(reader, writer)
                await channel.open_handshake(self.secret, "scheduler")
                welcome = await channel.receive()
                if not isinstance(welcome, Welcome):
                    raise protocol.ProtocolError(f"expected welcome, got {welcome.type}")
                self._channels[name] = channel
                delay = 0.05
                busy = None if welcome.busy_operation is None else (welcome.busy_operation, welcome.busy_attempt or 0)
                self._apply(self.table.connected(name, welcome.boot, busy, set(welcome.undelivered), time.monotonic()))
                await self._read_channel(name, channel)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, protocol.ProtocolError) as exc:
                if name in self._channels:
                    log.warning("channel to worker %s dropped: %s", name, exc or type(exc).__name__)
            finally:
                if channel is not None and self._channels.get(name) is channel:
                    del self._channels[name]
                self._apply(self.table.channel_lost(name, time.monotonic()))
                if channel is not None:
                    channel.writer.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _read_channel(self, name: str, channel: protocol.Channel) -> None:
        beat = asyncio.create_task(protocol.heartbeat_loop(channel))
        try:
            while True:
                message = await channel.receive(timeout=None)
                now = time.monotonic()
                if isinstance(message, StatusUpdate):
                    self._apply(self.table.status(name, message, now))
                elif isinstance(message, Ready):
                    self._apply(self.table.ready(name, message.pid, now))
                elif isinstance(message, Progress):
                    if self.table.progress(name, message.id, now):
                        self._writes.progress[message.id] = (message.message, message.fraction)
                elif isinstance(message, NotReady):
                    self._apply(self.table.not_ready(name, now))
                elif not isinstance(message, protocol.Heartbeat):
                    raise protocol.ProtocolError(f"unexpected {message.type} from sidecar {name}")
        finally:
            beat.cancel()

    # --- the dispatch cycle ---------------------------------------------------

    async def _dispatch_loop(self) -> None:
        """Never ends but on stop: a failed cycle is logged and the next one tries again."""
        last_expiry_check = time.monotonic()
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.scheduler_heartbeat)
            except TimeoutError:
                pass
            self._wake.clear()
            now = time.monotonic()
            if now - last_expiry_check >= self.settings.scheduler_heartbeat:
                last_expiry_check = now
                self._apply(self.table.expire(now, self.settings.max_worker_active_time))
            try:
                await self._cycle()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                await self._database_lost(exc)
            except Exception:
                log.exception(
                    "dispatch cycle of pool %r failed (operations %s); trying again",
                    self.pool,
                    sorted(self._writes.operation_ids()) or "none",
                )
                await self._database_lost(None)

    async def _database_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.warning("database unreachable (%s); retrying", _first_line(exc))
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, 5.0)
        self._wake.set()

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True, prepare_threshold=0)
            register_safe_jsonb(self._conn)
        return self._conn

    async def _cycle(self) -> None:
        conn = await self._connection()
        if self._unresolved:
            await self._resolve_claims(conn)
        free = self.table.claimable() if self.claiming and not self._stopping else []
        writes = self._writes.take()
        if not (free or writes):
            return
        started = time.monotonic()
        try:
            async with conn.pipeline(), conn.transaction():
                applied = await self._queue_writes(conn, writes)
                claim = None
                if free:
                    claim = await conn.execute(
                        store.CLAIM_SQL, store.claim_params(self.pool, free, self.settings.operation_wait_interval)
                    )
            # Leaving the pipeline block has sent everything and read every result.
            self._count(await applied.fetchall() if applied is not None else [])
            claimed = [store.lease_from_claim(row) for row in await claim.fetchall()] if claim is not None else []
        except (psycopg.OperationalError, psycopg.InterfaceError):
            # The COMMIT may have been applied: replay the writes (idempotent) and
            # look at the rows before claiming again.
            self._writes.put_back(writes)
            self._unresolved.update(free)
            raise
        except psycopg.Error as exc:
            # The server refused a statement, so nothing was written: find the bad row.
            log.warning("a cycle's writes were refused (%s); writing them one by one", _first_line(exc))
            await self._write_one_by_one(conn, writes)
            self._wake.set()
            return
        self._backoff = 0.1
        for lease in claimed:
            self._apply(self.table.assign(lease, time.monotonic()))
        if claimed:
            self.stats.dispatch_latency_seconds_total += time.monotonic() - started
        if claimed and len(claimed) == len(free):
            self._wake.set()  # the queue may hold more: look again when workers free up

    async def _queue_writes(self, conn: psycopg.AsyncConnection, writes: PendingWrites) -> psycopg.AsyncCursor | None:
        """Queue the buffered writes on ``conn``; return the cursor of the StatusUpdates."""
        applied = None
        if writes.completions:
            applied = await conn.execute(store.COMPLETE_SQL, store.complete_params(writes.completions))
        if writes.progress:
            await conn.execute(store.TOUCH_SQL, store.touch_params(writes.progress))
        if writes.releases:
            await conn.execute(store.RELEASE_SQL, store.release_params(writes.releases, RELEASE_REASON))
        return applied

    async def _write(self, conn: psycopg.AsyncConnection, writes: PendingWrites) -> None:
        async with conn.pipeline(), conn.transaction():
            applied = await self._queue_writes(conn, writes)
        self._count(await applied.fetchall() if applied is not None else [])

    async def _write_one_by_one(self, conn: psycopg.AsyncConnection, writes: PendingWrites) -> None:
        """Each write in its own transaction; a StatusUpdate the database refuses
        becomes a failure that names why, and what cannot be written at all is logged."""
        singles = [PendingWrites(completions=[c]) for c in writes.completions]
        singles += [PendingWrites(releases=[lease]) for lease in writes.releases]
        if writes.progress:
            singles.append(PendingWrites(progress=writes.progress))
        for index, single in enumerate(singles):
            try:
                await self._write(conn, single)
                continue
            except (psycopg.OperationalError, psycopg.InterfaceError):
                for rest in singles[index:]:
                    self._writes.put_back(rest)
                raise
            except psycopg.Error as exc:
                refused = exc
            self.stats.write_errors += 1
            ids = sorted(single.operation_ids())
            log.error("could not store the write for operation(s) %s: %s", ids, _first_line(refused))
            if single.completions:
                bad = single.completions[0]
                update = bad.update
                replacement = StatusUpdate(
                    id=update.id,
                    attempt=update.attempt,
                    outcome="failure",
                    retryable=False,
                    error=f"the worker's StatusUpdate could not be stored: {_first_line(refused)}",
                )
                try:
                    await self._write(conn, PendingWrites(completions=[Completion(replacement, bad.worker)]))
                except psycopg.Error as again:
                    log.error("operation %d left PROCESSING for housekeeping: %s", update.id, _first_line(again))

    async def _resolve_claims(self, conn: psycopg.AsyncConnection) -> None:
        cur = await conn.execute(
            store.RESOLVE_CLAIMS_SQL,
            {"pool": self.pool, "workers": sorted(self._unresolved), "settled": sorted(self._writes.operation_ids())},
        )
        rows = await cur.fetchall()
        self._unresolved.clear()
        for row in rows:
            lease = store.lease_from_claim(row)
            held = self.table.workers.get(lease.worker)
            if held is not None and held.lease is not None and held.lease.id == lease.id:
                continue
            log.warning("operation %d was claimed by a cycle whose commit was in doubt; handing it over", lease.id)
            self._apply(self.table.assign(lease, time.monotonic()))

    async def _flush(self, deadline: float) -> None:
        """At shutdown: write everything still buffered."""
        while self._writes:
            writes = self._writes.take()
            try:
                await self._write(await self._connection(), writes)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._writes.put_back(writes)
                if time.monotonic() > deadline:
                    log.error("could not write %d StatusUpdates before shutdown: %s", len(writes.completions), exc)
                    return
                self._conn = None
                await asyncio.sleep(0.5)
            except psycopg.Error:
                await self._write_one_by_one(await self._connection(), writes)

    def _count(self, applied: list[tuple[object, ...]]) -> None:
        for row in applied:
            status = row[1]
            if status == "SUCCESS":
                self.stats.succeeded += 1
            elif status == "FAILED":
                self.stats.failed += 1
            elif status == "NEW":
                self.stats.retried += 1
            elif status == "WAIT":
                self.stats.waited += 1
            elif status == "CANCELLED":
                self.stats.cancelled += 1

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
