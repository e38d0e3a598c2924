"""Local mode: N sidecar+worker pairs as child processes of ``damops run``.

The supervisor starts every pair before any operation arrives (pre-heating),
hands each sidecar's address to the scheduler, restarts whatever dies, and
kills the worker of an expired worker (the scheduler asks it to).
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
from dataclasses import dataclass, field

from damops.scheduler import Scheduler

log = logging.getLogger("damops.local")


@dataclass
class LocalPair:
    name: str
    directory: str
    port: int = 0
    sidecar: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    worker_pids: list[int] = field(default_factory=list)

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, "worker.sock")


class LocalSupervisor:
    def __init__(
        self, scheduler: Scheduler, count: int, secret: str, name_prefix: str | None = None, log_level: str = "WARNING"
    ) -> None:
        self.scheduler = scheduler
        self.count = count
        self.secret = secret
        self.prefix = name_prefix or f"{socket.gethostname()}-{os.getpid()}"
        self.log_level = log_level
        self.pairs: dict[str, LocalPair] = {}
        self._root = tempfile.mkdtemp(prefix="damops-workers-")
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DAMOPS_SECRET"] = self.secret
        env["DAMOPS_LOG_LEVEL"] = self.log_level
        return env

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "damops", *args]

    async def start(self) -> None:
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

    def _start_sidecar(self, pair: LocalPair) -> None:
        # We bind the port and pass the socket: no race for a free port.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", pair.port))
        listener.listen(16)
        pair.port = listener.getsockname()[1]
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
        pair.worker = subprocess.Popen(
            self._command("worker", "--socket", pair.socket_path, "--name", pair.name),
            env=self._env(),
            start_new_session=True,
        )
        pair.worker_pids.append(pair.worker.pid)

    async def kill_worker(self, name: str) -> None:
        """Expired worker: kill its process; the watcher starts a new one."""
        pair = self.pairs.get(name)
        if pair and pair.worker and pair.worker.poll() is None:
            log.warning("killing expired worker %s (pid %d)", name, pair.worker.pid)
            pair.worker.kill()

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.2)
            for pair in self.pairs.values():
                if self._stopping:
                    return
                if pair.sidecar is not None and pair.sidecar.poll() is not None:
                    log.warning("sidecar %s exited (%s); restarting the pair", pair.name, pair.sidecar.returncode)
                    if pair.worker is not None and pair.worker.poll() is None:
                        pair.worker.kill()
                        pair.worker.wait()
                    self._start_sidecar(pair)
                    self._start_worker(pair)
                    pair.restarts += 1
                elif pair.worker is not None and pair.worker.poll() is not None:
                    log.warning("worker %s exited (%s); restarting it", pair.name, pair.worker.returncode)
                    self._start_worker(pair)
                    pair.restarts += 1

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
