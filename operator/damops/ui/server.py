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
