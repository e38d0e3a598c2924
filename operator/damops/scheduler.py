"""The scheduler: the I/O shell around the dispatch core (:mod:`damops.dispatch`).

One Scheduler serves one pool. Its parts: the channels to the sidecars
(:mod:`damops.channels`), the database cycle (:mod:`damops.cycle`: one
transaction, usually one statement, writes what workers reported and claims
for the free ones), LISTEN/NOTIFY, and the dispatch loop that runs a cycle on every
scheduler heartbeat, on NOTIFY and as soon as a worker becomes free. What
each event means is decided by the :class:`~damops.dispatch.WorkerTable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg

from damops import logs, protocol, store, tracing
from damops.channels import SidecarChannels
from damops.config import Settings
from damops.cycle import CONNECTION_ERRORS, DispatchCycle, first_line
from damops.dispatch import Completion, Effects, Lease, PendingWrites, Snapshot, WorkerTable, failure
from damops.protocol import Cancel, NotReady, Progress, Ready, StatusUpdate, Welcome, Withdraw
from damops.safejson import undecodable_reason

log = logging.getLogger("damops.scheduler")

ExpiredCallback = Callable[[str], Coroutine[Any, Any, None]]
NOTIFY_CHANNEL = "damops_operations"


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
        self.table = WorkerTable(prefetch=settings.worker_prefetch_depth if settings.worker_prefetch else 0)
        self.stats = self.table.stats
        self.claiming = True
        self._writes = PendingWrites()
        self._channels = SidecarChannels(self.secret, self)
        self._cycle = DispatchCycle(settings, database_url, self.pool, self.stats)
        self._background: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._cancel_check = False  # a cancel was requested in this pool: look which
        self._stopping = False
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
        self._channels.reconnect = False
        self._apply(self.table.withdraw_all())  # prefetched ones come back unrun
        deadline = time.monotonic() + grace
        while self.table.leases() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if release and self.table.leases():
            # From here on a StatusUpdate for these is not written; their workers
            # are killed before the operations go back to NEW, so none finishes later.
            released = self.table.release_all()
            if self.on_worker_expired is not None:
                await asyncio.gather(*(self.on_worker_expired(lease.worker) for lease in released.releases))
            self._apply(released)
        self._stopping = True
        self._wake.set()
        await asyncio.gather(self._loops[0], return_exceptions=True)  # the dispatch loop ends its cycle
        self._loops[1].cancel()
        await self._flush(deadline=time.monotonic() + 30)
        for task in self._background:
            task.cancel()
        await asyncio.gather(self._channels.close_all(), *self._background, return_exceptions=True)
        await self._cycle.close()
        log.info("scheduler for pool %r stopped", self.pool)

    # --- the worker set (called by the local supervisor or the operator) ----

    def add_worker(self, name: str, host: str, port: int) -> None:
        if self._channels.addresses.get(name) == (host, port):
            return
        if name in self._channels.addresses:
            self.remove_worker(name)
        self.table.add(name, time.monotonic())
        self._channels.open(name, host, port)

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
        return dict(self._channels.addresses)

    def snapshot(self) -> Snapshot:
        return self.table.snapshot(time.monotonic())

    def recover(self, leases: list[Lease], reason: str) -> None:
        """End operations no worker of ours holds (their processes are gone) as
        retryable failures, at once rather than after MAX_OPERATION_PROCESSING_TIME."""
        self._writes.completions += [Completion(failure(lease, reason), lease.worker) for lease in leases]
        self._wake.set()

    # --- what the sidecars say (SidecarChannels calls these) -------------------

    def on_welcome(self, name: str, welcome: Welcome) -> None:
        busy = None if welcome.busy_operation is None else (welcome.busy_operation, welcome.busy_attempt or 0)
        self._apply(self.table.connected(name, welcome.boot, busy, set(welcome.undelivered), time.monotonic()))

    def on_message(self, name: str, message: protocol.Message) -> None:
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
        else:
            raise protocol.ProtocolError(f"unexpected {message.type} from sidecar {name}")

    def on_lost(self, name: str) -> None:
        self._apply(self.table.channel_lost(name, time.monotonic()))

    # --- applying the core's decisions ----------------------------------------

    def _apply(self, effects: Effects) -> None:
        self._writes.add(effects)
        for lease in effects.send:
            self._send(lease)
        for lease in effects.ahead:
            self._send(lease, prefetched=True)
        for name in effects.restart:
            if self.on_worker_expired is not None:
                task = asyncio.create_task(self.on_worker_expired(name))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        for name in effects.forget:
            self._channels.close(name)
        for lease in effects.cancels:
            try:
                self._channels.send(lease.worker, Cancel(id=lease.id, attempt=lease.attempt))
            except KeyError:
                pass  # no channel now: the next check sends nothing more, the grace still runs out
        for lease in effects.withdraw:
            try:
                self._channels.send(lease.worker, Withdraw(id=lease.id, attempt=lease.attempt))
            except KeyError:
                pass  # no channel: the sidecar hands it back to the next one that connects
        if effects.wake or effects.completions or effects.releases:
            self._wake.set()

    def _send(self, lease: Lease, prefetched: bool = False) -> None:
        problem = undecodable_reason(lease.inputs) or protocol.json_problem(lease.inputs)
        try:
            if problem:
                raise protocol.ProtocolError(problem)
            self._channels.send(lease.worker, lease.operation(prefetched))
        except Exception as exc:  # noqa: BLE001 - too large, too deep...: fails this operation only
            log.warning(
                "operation %d cannot be sent to worker %s: %s",
                lease.id,
                lease.worker,
                exc,
                extra=logs.fields(lease.id, lease.trigger_function or None, lease.attempt, self.pool, lease.worker),
            )
            self._apply(self.table.undeliverable(lease, f"inputs cannot be sent to a worker: {exc}"))

    # --- the dispatch loop ------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        """Ends only on stop: a failed cycle is logged and the next one tries again."""
        last_expiry_check = last_overdue_check = time.monotonic()
        max_wait = self.settings.worker_prefetch_max_wait
        # Held ones wait max_wait, plus up to a tenth of it: a check on a cadence costs nothing per cycle.
        overdue_every = min(self.settings.scheduler_heartbeat, max_wait / 10)
        while not self._stopping:
            held = self.table.prefetch and self.table.holds_ahead()  # any() stops at the first busy worker
            try:
                await asyncio.wait_for(self._wake.wait(), overdue_every if held else self.settings.scheduler_heartbeat)
            except TimeoutError:
                pass
            self._wake.clear()
            now = time.monotonic()
            if now - last_expiry_check >= self.settings.scheduler_heartbeat:
                last_expiry_check = now
                self._apply(self.table.expire(now, self.settings.max_worker_active_time))
                self._cancel_check = True  # NOTIFY is prompt; the heartbeat catches a missed one
            if self.table.prefetch and now - last_overdue_check >= overdue_every:
                last_overdue_check = now
                self._apply(self.table.hand_back_overdue(now, max_wait))
            try:
                if self._cancel_check and self.table.leases():
                    self._cancel_check = False
                    requested = await self._cycle.cancel_requests()
                    self._apply(self.table.cancel_requested(requested, now, self.settings.cancel_grace))
            except CONNECTION_ERRORS:
                pass  # the cycle below meets the same error and backs off
            try:
                await self._run_cycle()
                self._backoff = 0.1
            except CONNECTION_ERRORS as exc:
                log.warning("database unreachable (%s); retrying", first_line(exc))
                await self._back_off()
            except Exception:
                log.exception(
                    "dispatch cycle of pool %r failed (operations %s); trying again",
                    self.pool,
                    sorted(self._writes.operation_ids()) or "none",
                )
                await self._back_off()

    async def _run_cycle(self) -> None:
        free = self.table.claimable() if self.claiming and not self._stopping else []
        started = time.monotonic()
        result = await self._cycle.run(self._writes, free)
        if tracing.tracer is not None:  # claim spans; each lease then carries its span's context
            result.claimed = tracing.claimed(result.claimed, self.pool, started)
            result.resolved = tracing.claimed(result.resolved, self.pool, started)
        for lease in result.resolved:
            held = self.table.workers.get(lease.worker)
            if held is None or held.lease is None or held.lease.id != lease.id:
                self._apply(self.table.assign(lease, time.monotonic()))
        for lease in result.claimed:
            self._apply(self.table.assign(lease, time.monotonic()))
        if self._writes or result.requeued or (result.claimed and len(result.claimed) == len(free)):
            self._wake.set()  # more to write, a retry may be due, or the queue may hold more: look again

    async def _back_off(self) -> None:
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, 5.0)
        self._wake.set()

    async def _flush(self, deadline: float) -> None:
        """At shutdown: write everything still buffered, retrying a lost connection until ``deadline``."""
        while self._writes:
            try:
                await self._cycle.flush(self._writes)
            except CONNECTION_ERRORS as exc:
                if time.monotonic() > deadline:
                    log.error(
                        "could not write %d StatusUpdates before shutdown: %s",
                        len(self._writes.completions),
                        first_line(exc),
                    )
                    return
                await asyncio.sleep(0.5)

    # --- LISTEN/NOTIFY ------------------------------------------------------

    async def _listen_loop(self) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}; LISTEN {store.CANCEL_NOTIFY_CHANNEL}")
                    delay = 0.1
                    self._cancel_check = True
                    self._wake.set()  # catch anything inserted while we were not listening
                    async for notify in conn.notifies():
                        if notify.payload == self.pool:
                            if notify.channel == store.CANCEL_NOTIFY_CHANNEL:
                                self._cancel_check = True
                            self._wake.set()
            except CONNECTION_ERRORS as exc:
                log.debug("LISTEN connection lost: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
