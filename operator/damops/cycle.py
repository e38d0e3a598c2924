"""The scheduler's database side: one transaction per dispatch cycle.

A cycle writes the buffered StatusUpdates, progress and give-backs, then
claims one operation per free worker; one round trip, one commit (one WAL
flush) whatever the number of workers. The usual cycle (StatusUpdates and a
claim) is a single statement; one with progress or give-backs too is a
pipelined transaction of several.

Two kinds of failure are told apart:

* the connection failed (a restarted server, a terminated backend): the
  COMMIT may or may not have been applied. The writes are put back (replaying
  them is safe: every statement checks the row is still held by that worker
  and attempt) and, before the next claim, :meth:`DispatchCycle.run` looks at
  the rows claimed for the workers that were free and returns them as
  ``resolved`` leases, to be sent or released: nothing waits for housekeeping;
* the server refused a statement (a StatusUpdate it cannot store): nothing was
  written, so the writes are retried one by one and the bad row is failed
  with the reason, instead of blocking every later cycle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg

from damops import logs, metrics, store
from damops.backoff import RetryPolicy
from damops.config import Settings
from damops.dispatch import Completion, Lease, PendingWrites, Stats
from damops.protocol import StatusUpdate
from damops.safejson import register_safe_jsonb

log = logging.getLogger("damops.scheduler")
# One line per finished run: turn it down with DAMOPS_LOG_LEVEL=WARNING
# (the operator: --no-operation-log, Helm operator.operationLog).
finished_log = logging.getLogger(logs.OPERATION_LOG)

RELEASE_REASON = "released: its worker or scheduler stopped before it finished"
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


@dataclass
class CycleResult:
    claimed: list[Lease] = field(default_factory=list)
    # Claimed by an earlier cycle whose commit was in doubt: send or release each.
    resolved: list[Lease] = field(default_factory=list)
    # A StatusUpdate put its operation back to NEW: the claim of the same
    # statement could not see it, the next cycle may take it (a retry due now).
    requeued: bool = False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DispatchCycle:
    def __init__(self, settings: Settings, database_url: str, pool: str, stats: Stats) -> None:
        self.settings = settings
        self.database_url = database_url
        self.pool = pool
        self.stats = stats
        self._conn: psycopg.AsyncConnection | None = None
        self._unresolved: set[str] = set()  # workers a possibly committed claim was for
        self._policy = RetryPolicy.from_settings(settings)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def run(self, pending: PendingWrites, free: list[str]) -> CycleResult:
        """Write ``pending`` and claim for ``free``. Connection errors propagate
        (after the writes were put back); the caller backs off and calls again."""
        conn = await self._connection()
        result = CycleResult(resolved=await self._resolve(conn, pending) if self._unresolved else [])
        writes = pending.take()
        if not (free or writes):
            return result
        try:
            if writes.progress or writes.releases:
                applied, result.claimed = await self._pipelined(conn, writes, free)
            else:
                applied, result.claimed = await self._complete_and_claim(conn, writes, free)
            result.requeued = any(done.status == "NEW" for done in self._count(applied))
        except CONNECTION_ERRORS:
            pending.put_back(writes)
            self._unresolved.update(free)
            await self.close()
            raise
        except psycopg.Error as exc:
            log.warning("a cycle's writes were refused (%s); writing them one by one", first_line(exc))
            await self._write_one_by_one(conn, writes, pending)
        return result

    async def _complete_and_claim(
        self, conn: psycopg.AsyncConnection, writes: PendingWrites, free: list[str]
    ) -> tuple[list[tuple[Any, ...]], list[Lease]]:
        """StatusUpdates and the claim in one statement (its own transaction)."""
        params = store.complete_and_claim_params(self._complete_params(writes), self._claim_params(free))
        cursor = await conn.execute(store.COMPLETE_AND_CLAIM_SQL, params)
        return store.split_cycle_rows(await cursor.fetchall())

    async def _pipelined(
        self, conn: psycopg.AsyncConnection, writes: PendingWrites, free: list[str]
    ) -> tuple[list[tuple[Any, ...]], list[Lease]]:
        """Every kind of write, then the claim: one pipelined transaction."""
        async with conn.pipeline(), conn.transaction():
            applied = await self._queue_writes(conn, writes)
            claim = await conn.execute(store.CLAIM_SQL, self._claim_params(free)) if free else None
        # Leaving the pipeline block has sent everything and read every result.
        completed = await applied.fetchall() if applied is not None else []
        return completed, [store.lease_from_claim(row) for row in await claim.fetchall()] if claim else []

    def _claim_params(self, free: list[str]) -> dict[str, Any]:
        return store.claim_params(self.pool, free, self.settings.operation_wait_interval)

    def _complete_params(self, writes: PendingWrites) -> dict[str, Any]:
        return store.complete_params(
            writes.completions, policy=self._policy, default_max_attempts=self.settings.max_attempts
        )

    async def cancel_requests(self) -> list[tuple[int, int, str]]:
        """(id, attempt, worker) of this pool's PROCESSING operations with a cancel request."""
        conn = await self._connection()
        cur = await conn.execute(store.CANCEL_REQUESTED_SQL, store.cancel_requested_params(self.pool))
        return [(int(op_id), int(attempt), str(worker)) for op_id, attempt, worker in await cur.fetchall()]

    async def flush(self, pending: PendingWrites) -> None:
        """Write everything buffered (at shutdown); connection errors propagate."""
        writes = pending.take()
        try:
            await self._write(await self._connection(), writes)
        except CONNECTION_ERRORS:
            pending.put_back(writes)
            await self.close()
            raise
        except psycopg.Error:
            await self._write_one_by_one(await self._connection(), writes, pending)

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True, prepare_threshold=0)
            try:
                await conn.execute(store.SET_PLANNER_SETTINGS_SQL, store.planner_settings_params())
            except BaseException:
                await conn.close()
                raise
            register_safe_jsonb(conn)
            self._conn = conn
        return self._conn

    async def _queue_writes(self, conn: psycopg.AsyncConnection, writes: PendingWrites) -> psycopg.AsyncCursor | None:
        """Queue the writes on ``conn``; return the cursor of the StatusUpdates (what was applied)."""
        applied = None
        if writes.completions:
            applied = await conn.execute(store.COMPLETE_SQL, self._complete_params(writes))
        if writes.progress:
            await conn.execute(store.TOUCH_SQL, store.touch_params(writes.progress))
        if writes.releases:
            await conn.execute(store.RELEASE_SQL, store.release_params(writes.releases, RELEASE_REASON))
        return applied

    async def _write(self, conn: psycopg.AsyncConnection, writes: PendingWrites) -> None:
        if not writes:
            return
        async with conn.pipeline(), conn.transaction():
            applied = await self._queue_writes(conn, writes)
        self._count(await applied.fetchall() if applied is not None else [])

    async def _write_one_by_one(
        self, conn: psycopg.AsyncConnection, writes: PendingWrites, pending: PendingWrites
    ) -> None:
        """Each write in its own transaction. A StatusUpdate the database refuses is
        replaced by a failure that names why; what cannot be written at all is logged."""
        singles = [PendingWrites(completions=[c]) for c in writes.completions]
        singles += [PendingWrites(releases=[lease]) for lease in writes.releases]
        if writes.progress:
            singles.append(PendingWrites(progress=writes.progress))
        for index, single in enumerate(singles):
            try:
                await self._write(conn, single)
                continue
            except CONNECTION_ERRORS:
                for rest in singles[index:]:
                    pending.put_back(rest)
                raise
            except psycopg.Error as exc:
                refused = exc
            self.stats.write_errors += 1
            about = self._about(single)
            log.error(
                "could not store the write for operation(s) %s: %s",
                sorted(single.operation_ids()),
                first_line(refused),
                extra=about,
            )
            if single.completions:
                bad = single.completions[0].update
                replacement = StatusUpdate.failure(
                    bad.id,
                    bad.attempt,
                    f"the worker's StatusUpdate could not be stored: {first_line(refused)}",
                    retryable=False,
                )
                try:
                    await self._write(
                        conn, PendingWrites(completions=[Completion(replacement, single.completions[0].worker)])
                    )
                except psycopg.Error as again:
                    log.error(
                        "operation %d left PROCESSING for housekeeping: %s", bad.id, first_line(again), extra=about
                    )

    def _about(self, single: PendingWrites) -> dict[str, object]:
        """The log fields of a write about one operation (a StatusUpdate or a give-back)."""
        if single.completions:
            done = single.completions[0]
            return logs.fields(done.update.id, None, done.update.attempt, self.pool, done.worker)
        if single.releases:
            lease = single.releases[0]
            return logs.fields(lease.id, lease.trigger_function or None, lease.attempt, self.pool, lease.worker)
        return {"pool": self.pool}

    async def _resolve(self, conn: psycopg.AsyncConnection, pending: PendingWrites) -> list[Lease]:
        params = {"pool": self.pool, "workers": sorted(self._unresolved), "settled": sorted(pending.operation_ids())}
        rows = await (await conn.execute(store.RESOLVE_CLAIMS_SQL, params)).fetchall()
        self._unresolved.clear()
        if rows:
            log.warning(
                "operation(s) %s were claimed by a cycle whose commit was in doubt; handing them over",
                ", ".join(str(row[0]) for row in rows),
            )
        return [store.lease_from_claim(row) for row in rows]

    def _count(self, applied: list[tuple[Any, ...]]) -> list[store.Completed]:
        """Count what the StatusUpdates did, and log one line per operation that finished a run."""
        completed = store.completed_rows(applied)
        log_finished = finished_log.isEnabledFor(logging.INFO)  # the line and its fields cost more than the check
        for done in completed:
            counter = _COUNTERS.get(done.status)
            if counter is not None:
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            metrics.observe_run(
                self.pool, done.trigger_function, done.status, done.attempts, done.duration, done.waited
            )
            if log_finished:
                finished_log.info(
                    done.describe(),
                    extra={
                        "operation_id": done.id,
                        "trigger_function": done.trigger_function,
                        "attempt": done.attempts,
                        "pool": self.pool,
                        "outcome": done.status,
                        "duration_seconds": done.duration,
                    },
                )
        return completed


_COUNTERS = {"SUCCESS": "succeeded", "FAILED": "failed", "NEW": "retried", "WAIT": "waited", "CANCELLED": "cancelled"}
