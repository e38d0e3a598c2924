"""Local mode: N sidecar+worker pairs as child processes of ``damops run``.

The supervisor starts every pair before any operation arrives (pre-heating),
hands each sidecar's address to the scheduler, restarts whatever dies (with
an exponential back-off while a pair keeps crashing), and kills the worker of
an expired worker when the scheduler asks. The children die with ``damops
run`` however it dies (:mod:`damops.lifeline`), and a new run recovers at once
what a dead one left PROCESSING.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from damops import children, store
from damops.children import ChildProcess
from damops.dispatch import Lease
from damops.lifeline import PARENT_ENV
from damops.scheduler import Scheduler

log = logging.getLogger("damops.local")

# A process that lived shorter than this crashed at start: back off before the next try.
STABLE_AFTER_SECONDS = 10.0
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0


def restart_delay(consecutive_crashes: int) -> float:
    """0 for the first restart, then 0.5 s doubling up to 30 s."""
    if consecutive_crashes <= 1:
        return 0.0
    return min(BACKOFF_FIRST_SECONDS * 2 ** (consecutive_crashes - 2), BACKOFF_MAX_SECONDS)


def abandoned_by_dead_run(worker: str, hostname: str, alive: Callable[[int], bool]) -> bool:
    """Worker names are ``{hostname}-{pid of damops run}-w{n}``: the worker of a
    run on this host whose process is gone."""
    rest = worker.removeprefix(f"{hostname}-")
    pid_text, _, index = rest.partition("-w")
    if rest == worker or not pid_text.isdigit() or not index.isdigit():
        return False
    pid = int(pid_text)
    return pid != os.getpid() and not alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LocalPair:
    name: str
    directory: str
    port: int = 0
    sidecar: ChildProcess | None = None
    worker: ChildProcess | None = None
    started: float = 0.0  # when the worker was last started
    restarts: int = 0  # processes started again after one exited
    crashes: int = 0  # consecutive short-lived runs
    not_before: float = 0.0  # no restart before this time (back-off)
    last_cause: str = ""

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, "worker.sock")


class LocalSupervisor:
    # Fork children from a pre-imported parent (:mod:`damops.children`) rather
    # than start ``python -m damops`` for each: pre-heating in a fraction of the time.
    fork = children.available()

    def __init__(
        self, scheduler: Scheduler, count: int, secret: str, name_prefix: str | None = None, log_level: str = "WARNING"
    ) -> None:
        self.scheduler = scheduler
        self.count = count
        self.secret = secret
        self.hostname = socket.gethostname()
        self.prefix = name_prefix or f"{self.hostname}-{os.getpid()}"
        self.log_level = log_level
        self.pairs: dict[str, LocalPair] = {}
        self._root = tempfile.mkdtemp(prefix="damops-workers-")
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DAMOPS_SECRET"] = self.secret
        # An explicit DAMOPS_LOG_LEVEL reaches the workers too; without it they say only what matters.
        env["DAMOPS_LOG_LEVEL"] = os.environ.get("DAMOPS_LOG_LEVEL") or self.log_level
        env["DAMOPS_POOL"] = self.scheduler.pool  # the workers' log lines name their pool
        env[PARENT_ENV] = str(os.getpid())
        return env

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "damops", *args]

    async def start(self) -> None:
        if self.fork:
            await asyncio.to_thread(children.zygote)  # not on the event loop: it imports first
        await self._recover_abandoned()
        for index in range(1, self.count + 1):
            name = f"{self.prefix}-w{index}"
            pair = LocalPair(name, os.path.join(self._root, f"w{index}"))
            os.makedirs(pair.directory, mode=0o700)
            self.pairs[name] = pair
            self._start_sidecar(pair)
            self._start_worker(pair)
            self.scheduler.add_worker(name, "127.0.0.1", pair.port)
        self.scheduler.on_worker_expired = self.kill_worker
        self._monitor = asyncio.create_task(self._watch())

    async def _recover_abandoned(self) -> None:
        """What a dead run on this host left PROCESSING: its workers died with it."""
        params = {"pool": self.scheduler.pool, "prefix": f"{self.hostname}-%"}
        async with await psycopg.AsyncConnection.connect(self.scheduler.database_url, autocommit=True) as conn:
            rows = await (await conn.execute(store.HELD_BY_SQL, params)).fetchall()
        leases = [
            Lease(op_id, attempt, worker)
            for op_id, attempt, worker in rows
            if abandoned_by_dead_run(worker, self.hostname, pid_alive)
        ]
        if leases:
            log.warning(
                "recovering %d operation(s) left PROCESSING by a run that died: %s",
                len(leases),
                ", ".join(str(lease.id) for lease in leases),
            )
            self.scheduler.recover(leases, "its damops run died while the operation ran")

    def crash_looping(self) -> list[str]:
        """Pairs that are waiting out a back-off after crashing again and again."""
        return [pair.name for pair in self.pairs.values() if pair.crashes > 1]

    def _start_sidecar(self, pair: LocalPair) -> None:
        # We bind the port and pass the socket: no race for a free port.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", pair.port))
        listener.listen(16)
        pair.port = listener.getsockname()[1]
        if self.fork:
            pair.sidecar = children.start(
                "sidecar", [pair.name, self.secret, pair.socket_path], self._env(), (listener.fileno(),)
            )
        else:
            pair.sidecar = subprocess.Popen(
                self._command(
                    "sidecar", "--name", pair.name, "--socket", pair.socket_path, "--listen-fd", str(listener.fileno())
                ),
                pass_fds=(listener.fileno(),),
                env=self._env(),
                start_new_session=True,
            )
        # The sidecar has its own copy; closing ours makes a dead sidecar refuse
        # connections at once instead of leaving them in our backlog.
        listener.close()

    def _start_worker(self, pair: LocalPair) -> None:
        if self.fork:
            pair.worker = children.start("worker", [pair.socket_path, self.secret, pair.name], self._env())
        else:
            pair.worker = subprocess.Popen(
                self._command("worker", "--socket", pair.socket_path, "--name", pair.name),
                env=self._env(),
                start_new_session=True,
            )
        pair.started = time.monotonic()

    async def kill_worker(self, name: str) -> None:
        """Expired worker (or a shutdown past its grace): kill its process and wait
        until it is gone, so it cannot finish the operation later; the watcher starts a new one."""
        pair = self.pairs.get(name)
        if pair and pair.worker and pair.worker.poll() is None:
            log.warning("killing worker %s (pid %d)", name, pair.worker.pid)
            pair.worker.kill()
            await asyncio.to_thread(pair.worker.wait)

    def _note_exit(self, pair: LocalPair, what: str, code: int | None) -> None:
        """Count a crash for the back-off; log the cause once per change."""
        now = time.monotonic()
        pair.crashes = pair.crashes + 1 if now - pair.started < STABLE_AFTER_SECONDS else 1
        pair.not_before = now + restart_delay(pair.crashes)
        cause = f"{what} exited ({code})"
        if cause != pair.last_cause:
            log.warning("%s of %s; restarting it", cause, pair.name)
            pair.last_cause = cause
        if pair.crashes > 1:
            log.debug(
                "%s crashed %d times in a row: next start in %.1fs", pair.name, pair.crashes, pair.not_before - now
            )

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for pair in self.pairs.values():
                if self._stopping:
                    return
                if pair.sidecar is not None and pair.sidecar.poll() is not None:
                    code = pair.sidecar.returncode
                    if pair.worker is not None and pair.worker.poll() is None:
                        pair.worker.kill()
                        await asyncio.to_thread(pair.worker.wait)
                    self.scheduler.worker_lost(pair.name, f"worker {pair.name}'s sidecar exited ({code})")
                    self._note_exit(pair, "sidecar", code)
                    pair.sidecar = pair.worker = None
                elif pair.worker is not None and pair.worker.poll() is not None:
                    self._note_exit(pair, "worker", pair.worker.returncode)
                    pair.worker = None
                if pair.sidecar is None and now >= pair.not_before:
                    pair.restarts += 1
                    self._start_sidecar(pair)
                    self._start_worker(pair)
                elif pair.worker is None and pair.sidecar is not None and now >= pair.not_before:
                    pair.restarts += 1
                    self._start_worker(pair)
                elif pair.crashes and now - pair.started > STABLE_AFTER_SECONDS:
                    pair.crashes, pair.last_cause = 0, ""

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        processes = [p for pair in self.pairs.values() for p in (pair.worker, pair.sidecar) if p is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.to_thread(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self._root, ignore_errors=True)
