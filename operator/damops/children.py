"""Local mode's sidecars and workers, forked from one pre-imported parent.

``python -m damops sidecar`` spends ~0.4 s of CPU importing pydantic and damops
before it listens; sixteen pairs are 32 such starts, seconds on two cores. Here
one *zygote* process (a fresh, single-threaded interpreter started once: never
a fork of the multi-threaded ``damops run``) imports the sidecar and the worker,
and every child is a fork of it, ready in milliseconds. The supervisor gets a
:class:`Child` that behaves as the ``subprocess.Popen`` it used before.

Children die with ``damops run`` however it dies: the zygote asks for SIGKILL
when ``damops run`` dies (PR_SET_PDEATHSIG via :mod:`damops.lifeline`) and exits
when its control socket closes; each child asks for SIGKILL when the zygote dies.

The control socket carries one JSON object per line. Zygote -> parent ``{"ready": pid}``
once its imports are done. Parent -> zygote:
``{"start": kind, "args": [...], "env": {...}, "cwd": ...}`` with the fds to pass
(SCM_RIGHTS). Zygote -> parent: ``{"pid": n}`` for each start, in order, and
``{"exited": pid, "code": c}`` when a child ends (negative: killed by a signal).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import traceback
from typing import Any, Protocol

from damops.lifeline import PARENT_ENV, die_with_parent


class ChildProcess(Protocol):
    """What the supervisor uses of a child: ``subprocess.Popen`` has it, so has :class:`Child`."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | Any: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...
    def send_signal(self, sig: int, /) -> None: ...


def available() -> bool:
    return hasattr(os, "fork") and hasattr(socket, "send_fds")


class Zygote:
    """The parent's end: start children, learn how they ended. Thread-safe; a small
    thread reads the zygote's messages, so waiting for one child never blocks another."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from damops.children import serve; serve({theirs.fileno()})"],
            pass_fds=(theirs.fileno(),),
            env=env,
            start_new_session=True,
        )
        theirs.close()
        self._sock = ours
        self._exited: dict[int, int] = {}
        self._started: list[int] = []
        self._gone = False
        self._ready = False
        self._changed = threading.Condition()
        self._one_start = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="zygote-reader").start()

    def start(self, kind: str, arguments: list[Any], env: dict[str, str], fds: list[int]) -> Child:
        request = json.dumps({"start": kind, "args": arguments, "env": env, "cwd": os.getcwd()}).encode() + b"\n"
        with self._one_start:  # one request in flight: its fds cannot mix with another's
            socket.send_fds(self._sock, [request], fds)
            with self._changed:
                self._changed.wait_for(lambda: self._started or self._gone)
                if not self._started:
                    raise ChildProcessError("the zygote that forks damops' children is gone")
                return Child(self, self._started.pop(0))

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """The child's exit code (negative: the signal that killed it); None while it
        runs after waiting up to ``timeout`` seconds (None: as long as it takes)."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exited or self._gone, timeout)
            if pid in self._exited:
                return self._exited[pid]
            # Without its zygote a child is killed (it asked for SIGKILL when its parent dies).
            return -signal.SIGKILL if self._gone else None

    def wait_ready(self, timeout: float) -> None:
        """Until the zygote has imported what children run (a blocking wait)."""
        with self._changed:
            self._changed.wait_for(lambda: self._ready or self._gone, timeout)

    @property
    def alive(self) -> bool:
        return not self._gone

    def _read(self) -> None:
        buffer = b""
        try:
            while data := self._sock.recv(65536):
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    message = json.loads(line)
                    with self._changed:
                        if "ready" in message:
                            self._ready = True
                        elif "pid" in message:
                            self._started.append(int(message["pid"]))
                        else:
                            self._exited[int(message["exited"])] = int(message["code"])
                        self._changed.notify_all()
        except OSError:
            pass
        finally:
            with self._changed:
                self._gone = True
                self._changed.notify_all()


class Child:
    """A forked child with the part of ``subprocess.Popen``'s interface the supervisor uses."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self._code: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._code

    def poll(self) -> int | None:
        if self._code is None:
            self._code = self._zygote.exit_code(self.pid, 0)
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        if self._code is None:
            self._code = self._zygote.exit_code(self.pid, timeout)
        if self._code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return self._code

    def send_signal(self, sig: int, /) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# --- the zygote's side ---------------------------------------------------------


def serve(fd: int) -> None:
    """The zygote: import what children run, then fork one per request."""
    die_with_parent()
    import damops.logs
    import damops.sidecar
    import damops.worker  # noqa: F401  (imported once here, inherited by every child)
    from damops import triggers

    triggers.scanned_entry_points = triggers.installed_entry_points()

    control = socket.socket(fileno=fd)
    control.sendall(json.dumps({"ready": os.getpid()}).encode() + b"\n")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is for damops run, which stops us
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj == wake_r:
                    os.read(wake_r, 4096)
                    _reap(control)
                    continue
                data, fds, _, _ = socket.recv_fds(control, 1 << 20, 16)
                if not data:
                    return  # damops run closed its end: it is stopping or gone
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    pid = os.fork()
                    if pid == 0:
                        inherited = [control.fileno(), wake_r, wake_w, selector.fileno()]
                        os._exit(_child(json.loads(line), fds, inherited))
                    for passed in fds:
                        os.close(passed)
                    fds = []
                    control.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        notice = {"exited": pid, "code": os.waitstatus_to_exitcode(status)}
        try:
            control.sendall(json.dumps(notice).encode() + b"\n")
        except OSError:
            return


def _child(request: dict[str, Any], fds: list[int], inherited: list[int]) -> int:
    """In the forked child: become a sidecar or a worker; the exit code."""
    try:
        signal.set_wakeup_fd(-1)
        for fd in inherited:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        os.chdir(request["cwd"])
        env: dict[str, str] = request["env"]
        os.environ.clear()
        os.environ.update(env)
        if PARENT_ENV in env:
            os.environ[PARENT_ENV] = str(os.getppid())  # the zygote, which dies with damops run
        # As a fresh interpreter would: PYTHONPATH entries set after the zygote started.
        for entry in reversed([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]):
            if entry not in sys.path:
                sys.path.insert(1, entry)
        from damops.logs import setup_logging

        setup_logging("WARNING")
        if request["start"] == "sidecar":
            from damops.sidecar import main as sidecar_main

            name, secret, socket_path = request["args"]
            sidecar_main(name, secret, socket_path, None, fds[0], None)
        else:
            from damops.worker import main as worker_main

            worker_main(*request["args"])
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then the child ends as a crashed process does
        traceback.print_exc()
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def zygote() -> Zygote:
    """The running zygote, started first if need be (it takes a moment: call from a thread)."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive:
            _zygote = Zygote()
            _zygote.wait_ready(120)
        return _zygote


def start(kind: str, arguments: list[Any], env: dict[str, str], fds: tuple[int, ...] = ()) -> Child:
    """Fork a sidecar (``kind`` "sidecar", arguments (name, secret, socket path), its
    listening socket's fd in ``fds``) or a worker (arguments as :func:`damops.worker.main`'s),
    with ``env`` as its whole environment, in a session of its own."""
    return zygote().start(kind, arguments, env, list(fds))
