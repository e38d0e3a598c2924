"""Real child processes for the tests: a sidecar on a socket we bind (no
free-port race), and a pipe read line by line in a thread so a test can wait
for a log line instead of sleeping."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from typing import IO


class LineReader:
    """Drains a text pipe in a thread (so the child never blocks on a full
    pipe) and keeps every line; :meth:`wait_for` blocks until one contains a text."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: list[str] = []
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line containing ``text``; AssertionError (with everything
        read so far) after ``timeout`` seconds or once the pipe closed without it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    why = "the pipe closed" if self._closed else f"{timeout}s passed"
                    raise AssertionError(f"{why} without a line containing {text!r}; read:\n{''.join(self._lines)}")
                self._changed.wait(remaining)

    async def wait_for_async(self, text: str, timeout: float) -> str:
        return await asyncio.to_thread(self.wait_for, text, timeout)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def stop_process(process: subprocess.Popen, reader: LineReader, grace: float) -> None:
    """SIGTERM, as a supervisor would; SIGKILL after ``grace`` seconds; then drain its stderr reader."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    reader.join(10)


def listening_socket() -> socket.socket:
    """A TCP socket bound to a port the kernel picked, already listening: hand
    it to a child with ``--listen-fd``; connections queue until it accepts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


class SidecarProcess:
    """``damops sidecar`` as a child process, its stderr read by a :class:`LineReader`."""

    def __init__(self, name: str, socket_path: str, secret: str) -> None:
        listener = listening_socket()
        self.port: int = listener.getsockname()[1]
        self.socket_path = socket_path
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "damops",
                "sidecar",
                "--name",
                name,
                "--socket",
                socket_path,
                "--listen-fd",
                str(listener.fileno()),
            ],
            pass_fds=(listener.fileno(),),
            env=dict(os.environ, DAMOPS_SECRET=secret, DAMOPS_LOG_LEVEL="INFO", DAMOPS_LOG_FORMAT="text"),
            stderr=subprocess.PIPE,
            text=True,
        )
        # The child has its own copy of the listening socket.
        listener.close()
        assert self.process.stderr is not None
        self.stderr = LineReader(self.process.stderr)

    def wait_listening(self, timeout: float = 30) -> None:
        """Until the sidecar logged that both its servers are up (the worker socket accepts)."""
        self.stderr.wait_for("listening: worker socket", timeout)

    def stop(self) -> None:
        stop_process(self.process, self.stderr, grace=10)
