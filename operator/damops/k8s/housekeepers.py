"""Housekeeping once per database: started with the first pool on it, stopped with the last."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Hashable

from damops.config import Settings
from damops.housekeeping import Housekeeper

log = logging.getLogger("damops.operator")


class RefCount:
    """Users per key. ``acquire`` says whether this is the first, ``release`` whether it was the last."""

    def __init__(self) -> None:
        self._refs: Counter[Hashable] = Counter()

    def acquire(self, key: Hashable) -> bool:
        self._refs[key] += 1
        return self._refs[key] == 1

    def release(self, key: Hashable) -> bool:
        if self._refs[key] <= 0:
            del self._refs[key]
            return False  # never acquired: nothing to stop
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            return True
        return False

    def __len__(self) -> int:
        return len(self._refs)


class Housekeepers:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.refs = RefCount()
        self.running: dict[str, tuple[Housekeeper, asyncio.Task[None]]] = {}
        self.stopping: set[asyncio.Task[None]] = set()

    def acquire(self, url: str) -> None:
        if not self.refs.acquire(url):
            return
        keeper = Housekeeper(self.settings, url)
        self.running[url] = (keeper, asyncio.create_task(keeper.run(), name="housekeeping"))
        log.info("housekeeping started for a database (%d database(s) now)", len(self.running))

    def release(self, url: str) -> None:
        """Signal the last user's housekeeper to stop; it winds down in the background
        (a pool's deletion does not wait for a housekeeping round to end)."""
        if self.refs.release(url) and url in self.running:
            keeper, task = self.running.pop(url)
            keeper.stop()
            self.stopping.add(task)
            task.add_done_callback(self.stopping.discard)

    async def close(self, timeout: float = 10) -> None:
        """Stop them all (operator exit) and wait for them, cancelling what overstays."""
        for keeper, task in self.running.values():
            keeper.stop()
            self.stopping.add(task)
        self.running.clear()
        tasks = list(self.stopping)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
