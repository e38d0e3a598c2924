"""A pool's queue depth (its NEW and WAIT operations), for the autoscaler and the
status, read over one kept connection: a new connection per read would cost
PostgreSQL a backend start every few seconds for every pool."""

from __future__ import annotations

import asyncio
import threading

import psycopg

from damops.operations import count_queued


class QueueDepth:
    def __init__(self) -> None:
        self._url: str | None = None
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()  # reads run in worker threads

    async def read(self, url: str, pool: str) -> int:
        return await asyncio.to_thread(self._read, url, pool)

    async def close(self) -> None:
        await asyncio.to_thread(self._locked_close)

    def _read(self, url: str, pool: str) -> int:
        with self._lock:
            if self._url != url:
                self._close()
            if self._conn is not None and not self._conn.closed:
                try:
                    return count_queued(self._conn, pool)
                except psycopg.OperationalError:
                    self._close()  # dropped while kept (a server restart): one more try, afresh
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
            self._url = url
            try:
                return count_queued(self._conn, pool)
            except psycopg.Error:
                self._close()
                raise

    def _locked_close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._url = None
