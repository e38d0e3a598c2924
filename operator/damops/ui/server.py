"""Serving the dashboard with uvicorn: on its own (`damops ui`) or beside the
main job on the same event loop (`damops run --ui`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn


def serve(app: Any, host: str, port: int) -> None:
    """Run until Ctrl-C (uvicorn handles the signals)."""
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


class BesideServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host: `damops run` has its own
    two-step Ctrl-C, which uvicorn's handlers would replace."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return None


async def start_beside(app: Any, host: str, port: int) -> tuple[BesideServer, asyncio.Task[None]]:
    """Start serving on the running loop; returns once the port is bound (or the server failed)."""
    server = BesideServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():
        task.result()  # raises what stopped it
        raise OSError(f"the dashboard could not listen on {host}:{port}")
    return server, task


async def stop_beside(server: BesideServer, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await asyncio.gather(task, return_exceptions=True)


def check_address(host: str, port: int) -> str | None:
    """None when host:port can be listened on now; else why not (one line)."""
    import socket

    if not 0 < port < 65536:
        return f"port must be between 1 and 65535, got {port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or :PORT, or PORT) for `damops run --ui`; ValueError naming the problem."""
    host, _, port = text.rpartition(":") if ":" in text else ("", "", text)
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--ui {text!r} is not HOST:PORT, e.g. 127.0.0.1:8765") from None
    return host.strip("[]") or "127.0.0.1", number


async def start_local(
    settings: Any, url: str, scheduler: Any, host: str, port: int
) -> tuple[BesideServer, asyncio.Task[None]]:
    """The dashboard of `damops run --ui`: the running scheduler's own worker states."""
    import os

    from damops.periodic import parse_schedules
    from damops.ui.app import create_app

    app = create_app(
        url,
        token=os.environ.get("DAMOPS_UI_TOKEN") or None,
        schedules=parse_schedules(settings.periodic),
        snapshot=scheduler.snapshot,
        local_pool=scheduler.pool,
    )
    return await start_beside(app, host, port)
