"""Run a coroutine on uvloop where it is installed (it cuts the sidecar's
per-message syscall and CPU cost by about a quarter; see bench/README.md),
else on the standard event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A new event loop (uvloop's where installed), closed on the way out: for
    code that runs its loop itself, as ``kopf.run(loop=...)`` does."""
    with runner() as loop_runner:
        yield loop_runner.get_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    with runner() as loop_runner:
        return loop_runner.run(main)


def runner() -> asyncio.Runner:
    """An asyncio.Runner on the loop every damops process uses."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
