"""The scheduler's decisions, without I/O: a table of workers and what each event means.

Every event the scheduler sees (a sidecar's welcome, a worker ready, a
StatusUpdate, a channel lost, the clock passing MAX_WORKER_ACTIVE_TIME...) is a
method of :class:`WorkerTable` that changes the table and returns
:class:`Effects`: frames to send, rows to write, workers to restart or forget.
The :class:`damops.scheduler.Scheduler` is the I/O shell that applies them.

One rule holds throughout: a worker runs at most one :class:`Lease` (an
operation at an attempt), and a lease ends exactly once: by its StatusUpdate,
by being recovered (a retryable failure: it may have run), or by being
released (back to NEW with its attempt given back: it never reached the
trigger function). A channel that drops does not end a lease: the sidecar may
still be running it, so the lease is kept until the sidecar says what became
of it, or the worker is gone, or it expires.

With prefetch (WORKER_PREFETCH) a worker may also hold up to
WORKER_PREFETCH_DEPTH leases ``ahead``: sent ahead, waiting in the worker's socket
(its sidecar knows of them), started by the worker in the order sent, each the
moment the one before ends (the scheduler learns it from that StatusUpdate). They
are not executing: drain, cancel, stop and a new scheduler get them handed back
unrun (released) unless they started first; when the worker is lost or restarted
they are recovered like the running one, since they may have started. A running
operation that lasts longer than WORKER_PREFETCH_MAX_WAIT has those held behind it
handed back too, and its worker gets nothing more ahead until it ends: a long
operation holds up a short one for about that long at most, then a free worker
takes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from damops.protocol import Operation, StatusUpdate


class WorkerState(str, enum.Enum):
    """Seed: pending (started, not yet ready), free, active (exactly one operation)."""

    PENDING = "pending"
    FREE = "free"
    ACTIVE = "active"


@dataclass(frozen=True)
class Lease:
    """An operation held by a worker at an attempt (seed: the worker's one active operation)."""

    id: int
    attempt: int
    worker: str
    trigger_function: str = ""  # unknown for a lease adopted from a sidecar
    inputs: Any = None
    trace_context: dict[str, Any] | None = None  # W3C trace context for the worker's run span (damops.tracing)

    def operation(self, prefetched: bool = False) -> Operation:
        return Operation(
            id=self.id,
            trigger_function=self.trigger_function,
            inputs=self.inputs,
            attempt=self.attempt,
            trace_context=self.trace_context,
            prefetched=prefetched,
        )


def failure(lease: Lease, error: str, *, retryable: bool = True) -> StatusUpdate:
    """A failure StatusUpdate for a lease (recovered, undeliverable, cancelled too late)."""
    return StatusUpdate.failure(lease.id, lease.attempt, error, retryable=retryable)


@dataclass(frozen=True)
class Completion:
    """A StatusUpdate together with the worker it came from (the row must still be held by it)."""

    update: StatusUpdate
    worker: str


@dataclass
class Worker:
    name: str
    last_touched: float
    state: WorkerState = WorkerState.PENDING
    draining: bool = False
    connected: bool = False
    lease: Lease | None = None
    ahead: list[Lease] = field(default_factory=list)  # prefetched, in the order sent (not executing)
    pid: int | None = None
    boot: str | None = None  # the sidecar process we last spoke to
    worker_gone: bool = False  # NotReady since the last Ready: not free when its lease ends
    running_since: float = 0.0  # when the running lease started (as far as we know)
    overdue: bool = False  # the running lease outlasted WORKER_PREFETCH_MAX_WAIT: nothing more ahead

    def start(self, lease: Lease, now: float) -> None:
        """``lease`` is the one it runs from now on."""
        self.lease = lease
        self.state = WorkerState.ACTIVE
        self.last_touched = self.running_since = now
        self.overdue = False

    @property
    def claimable(self) -> bool:
        return self.state is WorkerState.FREE and self.connected and not self.draining and self.lease is None

    @property
    def next(self) -> Lease | None:
        """The lease it starts when the running one ends."""
        return self.ahead[0] if self.ahead else None

    @property
    def prefetchable(self) -> bool:
        """Running one operation: it may be sent more ahead (up to the table's depth)."""
        return (
            self.state is WorkerState.ACTIVE
            and self.lease is not None
            and self.connected
            and not self.draining
            and not self.worker_gone
            and not self.overdue
        )


@dataclass
class Effects:
    """What the I/O shell must do after an event."""

    send: list[Lease] = field(default_factory=list)  # claimed operations to send to their workers
    ahead: list[Lease] = field(default_factory=list)  # claimed ones sent ahead to busy workers (prefetch)
    withdraw: list[Lease] = field(default_factory=list)  # prefetched ones to hand back unrun
    completions: list[Completion] = field(default_factory=list)
    releases: list[Lease] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)  # kill and replace the worker process / pod
    forget: list[str] = field(default_factory=list)  # close the channel, drop the worker
    cancels: list[Lease] = field(default_factory=list)  # send a Cancel to the lease's worker
    wake: bool = False  # run a dispatch cycle soon

    def __iadd__(self, other: Effects) -> Effects:
        self.send += other.send
        self.ahead += other.ahead
        self.withdraw += other.withdraw
        self.completions += other.completions
        self.releases += other.releases
        self.restart += other.restart
        self.forget += other.forget
        self.cancels += other.cancels
        self.wake = self.wake or other.wake
        return self


@dataclass
class Stats:
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    waited: int = 0
    cancelled: int = 0
    released: int = 0  # hand-overs given back without counting an attempt
    recovered: int = 0  # leases ended by the scheduler as failures (worker lost, expired)
    expired_workers: int = 0
    dropped_channels: int = 0
    readopted: int = 0  # leases kept across a dropped channel
    prefetched: int = 0  # operations sent ahead to a busy worker
    overdue_handed_back: int = 0  # held ones withdrawn from behind an operation outlasting WORKER_PREFETCH_MAX_WAIT
    write_errors: int = 0  # StatusUpdates that could not be stored as sent


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


class WorkerTable:
    """Every worker of one scheduler and the one lease each may hold."""

    def __init__(self, prefetch: int = 0) -> None:
        self.workers: dict[str, Worker] = {}
        self.stats = Stats()
        self.prefetch = int(prefetch)  # how many leases a worker may hold ahead (0: prefetch off)
        # Leases given back at shutdown: a StatusUpdate for one that still arrives
        # is not written (the operation is NEW again, maybe already elsewhere).
        self._released_at_stop: set[tuple[int, int]] = set()
        self._cancel_sent: dict[tuple[int, int], float] = {}  # lease -> when its Cancel was sent

    # --- the worker set -------------------------------------------------

    def add(self, name: str, now: float) -> None:
        self.workers.setdefault(name, Worker(name, last_touched=now))

    def remove(self, name: str, reason: str) -> Effects:
        """Forget a worker now (its pod or process is gone). A lease it held may
        have run: it is recovered as a retryable failure, its attempt counted."""
        worker = self.workers.pop(name, None)
        effects = Effects(forget=[name])
        if worker is not None:
            effects += self._recover(worker, reason)
        return effects

    def drain(self, name: str) -> Effects:
        """No new work for this worker; it is forgotten once it holds no lease."""
        worker = self.workers.get(name)
        if worker is None:
            return Effects()
        worker.draining = True
        if worker.lease is None and not worker.ahead:
            del self.workers[name]
            return Effects(forget=[name])
        return Effects(withdraw=list(worker.ahead))

    # --- channel events -------------------------------------------------

    def connected(
        self, name: str, boot: str, busy: tuple[int, int] | None, undelivered: set[int], now: float
    ) -> Effects:
        """A sidecar welcomed us. ``busy`` is the (operation, attempt) it is running;
        ``undelivered`` the ids of StatusUpdates it kept for us (they follow)."""
        worker = self.workers.get(name)
        if worker is None:
            return Effects()
        effects = Effects()
        same_sidecar, worker.boot = worker.boot == boot, boot
        worker.connected = True
        if worker.ahead:
            effects += self._reconcile_ahead(worker, busy, undelivered, same_sidecar, now)
        lease = worker.lease
        if lease is not None:
            if busy == (lease.id, lease.attempt) or lease.id in undelivered:
                self.stats.readopted += 1  # still running, or its StatusUpdate follows
                worker.last_touched = now
                return effects
            worker.lease = None
            worker.state = WorkerState.PENDING
            if same_sidecar:
                # The sidecar never got it (the frame died with the channel): not an attempt.
                self.stats.released += 1
                effects.releases.append(lease)
            else:
                effects += self._end(worker, lease, f"worker {name}'s sidecar restarted while it held the operation")
        if busy is not None:
            worker.worker_gone = False  # it is running an operation right now
        if busy is not None and worker.lease is None:
            # Handed out by a scheduler before us: adopt it rather than run it twice.
            worker.start(Lease(busy[0], busy[1], name), now)
            self.stats.readopted += 1
        elif worker.state is WorkerState.FREE:
            worker.state = WorkerState.PENDING  # until the sidecar says Ready again
        return effects

    def _reconcile_ahead(
        self, worker: Worker, busy: tuple[int, int] | None, undelivered: set[int], same_sidecar: bool, now: float
    ) -> Effects:
        """After a reconnect: what became of the leases the sidecar held ahead. Those it
        lists as undelivered have a StatusUpdate coming (handed back, or it ran). One it
        is running started while we were away: every lease sent before it has ended, and
        those whose StatusUpdate is not coming were lost with the channel. The rest never
        reached the sidecar (released) or died with a restarted one (recovered)."""
        effects = Effects()
        started = next((i for i, held in enumerate(worker.ahead) if busy == (held.id, held.attempt)), None)
        before = [] if started is None else [worker.lease, *worker.ahead[:started]]
        after = worker.ahead if started is None else worker.ahead[started + 1 :]
        order: list[Lease] = []  # the worker's leases from now on, in the order it runs them
        for lease in before:
            if lease is not None and lease.id in undelivered:
                order.append(lease)
            elif lease is not None:
                effects += self._end(worker, lease, f"worker {worker.name}'s StatusUpdate was lost with its channel")
        if started is not None:
            order.append(worker.ahead[started])
        kept = []
        for held in after:
            if held.id in undelivered:
                kept.append(held)
            elif same_sidecar:
                self.stats.released += 1  # it never reached the sidecar
                effects.releases.append(held)
            else:
                effects += self._end(
                    worker, held, f"worker {worker.name}'s sidecar restarted while it held the operation"
                )
        if started is None:
            worker.ahead = kept
        else:
            running, worker.ahead = order[0], order[1:] + kept
            if running == worker.lease:
                worker.state = WorkerState.ACTIVE
            else:
                worker.start(running, now)
        return effects

    def channel_lost(self, name: str, now: float) -> Effects:
        """The channel dropped. The lease stays: the sidecar may still be running it
        (a reconnect tells), else the worker's removal or expiry recovers it."""
        worker = self.workers.get(name)
        if worker is None:
            return Effects()
        if worker.connected:
            self.stats.dropped_channels += 1
        worker.connected = False
        if worker.lease is None:
            worker.state = WorkerState.PENDING
        return Effects()

    def lost(self, name: str, reason: str, now: float) -> Effects:
        """The worker's processes are gone for sure (local mode: the sidecar exited)."""
        worker = self.workers.get(name)
        if worker is None:
            return Effects()
        worker.connected = False
        effects = self._recover(worker, reason)
        worker.state = WorkerState.PENDING
        worker.last_touched = now
        return effects

    def ready(self, name: str, pid: int, now: float) -> Effects:
        worker = self.workers.get(name)
        if worker is None:
            return Effects()
        worker.pid = pid
        worker.worker_gone = False
        if worker.state is WorkerState.PENDING and worker.lease is None:
            worker.state = WorkerState.FREE
            worker.last_touched = now
            return Effects(wake=True)
        return Effects()

    def not_ready(self, name: str, now: float) -> Effects:
        worker = self.workers.get(name)
        if worker is None:
            return Effects()
        worker.worker_gone = True
        if worker.lease is None:
            worker.state = WorkerState.PENDING
            worker.last_touched = now
        return Effects()

    def progress(self, name: str, operation_id: int, now: float) -> bool:
        """True when the progress is about the worker's lease (then it is stored)."""
        worker = self.workers.get(name)
        if worker is None or worker.lease is None or worker.lease.id != operation_id:
            return False
        worker.last_touched = now
        return True

    def status(self, name: str, update: StatusUpdate, now: float) -> Effects:
        """A StatusUpdate from a sidecar: written if it matches a row the worker holds
        (the database checks that); ends the worker's lease if it is that lease."""
        worker = self.workers.get(name)
        if (update.id, update.attempt) in self._released_at_stop:
            return Effects()
        effects = Effects(wake=True)
        if not update.executed:
            # Refused before it reached the trigger function (the worker was busy or
            # not ready): back to NEW with its attempt given back.
            self.stats.released += 1
            effects.releases.append(Lease(update.id, update.attempt, name))
        else:
            effects.completions.append(Completion(update, name))
        if worker is None:
            return effects
        if worker.lease is not None and worker.lease.id == update.id:
            worker.lease = None
            worker.last_touched = now
            if worker.ahead:
                # The worker started the next one held ahead the moment this one ended.
                worker.start(worker.ahead.pop(0), now)
            else:
                self._idle(worker, now, effects)
            return effects
        # Only a StatusUpdate for one held ahead is left (rare): the running lease's is
        # matched first, so the usual StatusUpdate does not scan the held ones.
        position = next((i for i, held in enumerate(worker.ahead) if held.id == update.id), None)
        if position is None:
            return effects
        # Handed back unrun, or it ran, so every lease sent before it ended and their
        # StatusUpdates were lost; the worker then started the next.
        del worker.ahead[position]
        if update.executed:
            for lost in [worker.lease, *worker.ahead[:position]]:
                if lost is not None:
                    effects += self._end(worker, lost, f"worker {name}'s StatusUpdate was lost")
            worker.lease, worker.ahead = None, worker.ahead[position:]
            worker.last_touched = now
            if worker.ahead:
                worker.start(worker.ahead.pop(0), now)
        if worker.lease is None and not worker.ahead:
            self._idle(worker, now, effects)
        return effects

    def _idle(self, worker: Worker, now: float, effects: Effects) -> None:
        worker.state = WorkerState.FREE if worker.connected and not worker.worker_gone else WorkerState.PENDING
        worker.last_touched = now
        if worker.draining:
            del self.workers[worker.name]
            effects.forget.append(worker.name)

    # --- the dispatch cycle ----------------------------------------------

    def claimable(self) -> list[str]:
        """One slot per operation to claim, by worker name: one per free worker first
        (they get the first operations in claim order); then, with prefetch, the room
        ahead of free and busy workers, round by round (everyone's first place ahead
        before anyone's second), so a short queue is spread over the workers."""
        free = [w.name for w in self.workers.values() if w.claimable]
        if not self.prefetch:
            return free
        room = {name: self.prefetch for name in free}
        room |= {w.name: self.prefetch - len(w.ahead) for w in self.workers.values() if w.prefetchable}
        for place in range(self.prefetch):
            free += [name for name, left in room.items() if left > place]
        return free

    def assign(self, lease: Lease, now: float) -> Effects:
        """A claimed operation: send it, or give it back when its worker went away meanwhile."""
        worker = self.workers.get(lease.worker)
        if worker is not None and worker.prefetchable and len(worker.ahead) < self.prefetch:
            worker.ahead.append(lease)
            self.stats.claimed += 1
            self.stats.prefetched += 1
            return Effects(ahead=[lease])
        if worker is None or not worker.claimable:
            self.stats.released += 1
            return Effects(releases=[lease])
        worker.start(lease, now)
        self.stats.claimed += 1
        return Effects(send=[lease])

    def undeliverable(self, lease: Lease, error: str) -> Effects:
        """A claimed operation that cannot be put in a frame: FAILED, no retry."""
        worker = self.workers.get(lease.worker)
        if worker is not None and lease in worker.ahead:
            worker.ahead.remove(lease)
        elif worker is not None and worker.lease == lease:
            worker.lease = None
            worker.state = WorkerState.FREE
        return Effects(completions=[Completion(failure(lease, error, retryable=False), lease.worker)], wake=True)

    def expire(self, now: float, limit: float) -> Effects:
        """Seed: an expired worker (active, no progress for longer than
        MAX_WORKER_ACTIVE_TIME) is restarted and its operation recovered."""
        effects = Effects()
        for worker in list(self.workers.values()):
            if worker.lease is not None and now - worker.last_touched > limit:
                self.stats.expired_workers += 1
                effects += self._restart(
                    worker,
                    f"worker {worker.name} expired: active for longer than MAX_WORKER_ACTIVE_TIME ({limit:g}s)",
                    now,
                )
        return effects

    def hand_back_overdue(self, now: float, max_wait: float) -> Effects:
        """Prefetch meets a long operation: a worker whose running lease has lasted
        longer than ``max_wait`` (WORKER_PREFETCH_MAX_WAIT) hands back what it holds
        ahead, unrun, to be claimed again (by a free worker first), and gets nothing
        more ahead until that lease ends. Once per running lease."""
        effects = Effects()
        for worker in self.workers.values():
            if worker.lease is None or worker.overdue or now - worker.running_since <= max_wait:
                continue
            worker.overdue = True
            self.stats.overdue_handed_back += len(worker.ahead)
            effects.withdraw += worker.ahead
        return effects

    def cancel_requested(self, requested: list[tuple[int, int, str]], now: float, grace: float) -> Effects:
        """Leases of ours whose cancel was requested (id, attempt, worker): send each a
        Cancel once; one still running ``grace`` seconds later has its worker killed
        and replaced, as an expired worker, and ends CANCELLED (the database decides)."""
        effects = Effects()
        wanted = {(op_id, attempt) for op_id, attempt, _ in requested}
        self._cancel_sent = {key: sent for key, sent in self._cancel_sent.items() if key in wanted}
        for worker in self.workers.values():
            # Not started: handed back, they end CANCELLED.
            effects.withdraw += [held for held in worker.ahead if (held.id, held.attempt) in wanted]
            lease = worker.lease
            if lease is None or (lease.id, lease.attempt) not in wanted:
                continue
            sent = self._cancel_sent.get((lease.id, lease.attempt))
            if sent is None:
                self._cancel_sent[(lease.id, lease.attempt)] = now
                effects.cancels.append(lease)
            elif now - sent > grace:
                effects += self._restart(
                    worker, f"cancelled: the trigger function did not stop within CANCEL_GRACE ({grace:g}s)", now
                )
        return effects

    def cancels_pending(self) -> bool:
        return bool(self._cancel_sent)

    def holds_ahead(self) -> bool:
        """Some worker holds a lease ahead (prefetched, not executing)."""
        return any(w.ahead for w in self.workers.values())

    def leases(self) -> list[Lease]:
        """Every lease held, prefetched ones included."""
        return [lease for w in self.workers.values() for lease in (w.lease, *w.ahead) if lease is not None]

    def withdraw_all(self) -> Effects:
        """At shutdown: ask every sidecar to hand back what it holds prefetched."""
        return Effects(withdraw=[held for w in self.workers.values() for held in w.ahead])

    def release_all(self) -> Effects:
        """At shutdown: every unfinished lease back to NEW, its attempt given back."""
        effects = Effects()
        for worker in self.workers.values():
            for lease in (worker.lease, *worker.ahead):
                if lease is not None:
                    self.stats.released += 1
                    effects.releases.append(lease)
                    self._released_at_stop.add((lease.id, lease.attempt))
            if worker.lease is not None or worker.ahead:
                worker.lease, worker.ahead = None, []
                worker.state = WorkerState.PENDING
        return effects

    # --- internals ----------------------------------------------------------

    def _restart(self, worker: Worker, reason: str, now: float) -> Effects:
        """Its lease recovered, its process or pod killed and replaced."""
        effects = self._recover(worker, reason)
        worker.state = WorkerState.PENDING
        worker.last_touched = now
        effects.restart.append(worker.name)
        return effects

    def _recover(self, worker: Worker, reason: str) -> Effects:
        """End the running lease as a retryable failure, and those held ahead too:
        the worker may have started them meanwhile."""
        effects = Effects()
        for lease in (worker.lease, *worker.ahead):
            if lease is not None:
                effects += self._end(worker, lease, reason)
        worker.lease, worker.ahead = None, []
        return effects

    def _end(self, worker: Worker, lease: Lease, reason: str) -> Effects:
        self.stats.recovered += 1
        return Effects(completions=[Completion(failure(lease, reason), worker.name)], wake=True)

    def count(self, state: WorkerState) -> int:
        return sum(1 for w in self.workers.values() if w.state is state)

    def snapshot(self, now: float) -> Snapshot:
        workers = self.workers.values()
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
            pending=self.count(WorkerState.PENDING),
            free=self.count(WorkerState.FREE),
            active=self.count(WorkerState.ACTIVE),
            draining=sum(1 for w in workers if w.draining),
            workers=views,
            stats=dict(self.stats.__dict__),
        )


@dataclass
class PendingWrites:
    """What the next cycle writes: StatusUpdates, progress, give-backs.
    Taken as a whole by a cycle, and put back if the cycle failed."""

    completions: list[Completion] = field(default_factory=list)
    progress: dict[int, tuple[str | None, float | None]] = field(default_factory=dict)
    releases: list[Lease] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.completions or self.progress or self.releases)

    def take(self) -> PendingWrites:
        taken = PendingWrites(self.completions, self.progress, self.releases)
        self.completions, self.progress, self.releases = [], {}, []
        return taken

    def put_back(self, taken: PendingWrites) -> None:
        """Replaying is safe: every statement checks the row is still held by that worker and attempt."""
        self.completions[:0] = taken.completions
        self.progress = {**taken.progress, **self.progress}
        self.releases[:0] = taken.releases

    def add(self, effects: Effects) -> None:
        self.completions += effects.completions
        self.releases += effects.releases

    def operation_ids(self) -> set[int]:
        return {c.update.id for c in self.completions} | {lease.id for lease in self.releases}
