"""For the observability tests: `damops run` as a real process whose JSON log
lines (its own, its sidecars' and its workers': they share its stderr) are
kept, and trigger functions that log, fail, or kill their worker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tests.support.procs import LineReader, stop_process

TRIGGERS = "tests.integration.observed"


def chatty(inputs: dict[str, Any], context: Any) -> dict[str, bool]:
    """Logs through its context's logger and through a logger of its own choosing."""
    context.logger.warning("chatty is working on %s", inputs.get("what"))
    logging.getLogger("some.library").warning("a library line logged while chatty runs")
    return {"ok": True}


def crash_once(inputs: Any, context: Any) -> dict[str, int]:
    """Its worker process dies during attempt 1; attempt 2 succeeds."""
    if context.attempt == 1:
        os._exit(3)
    return {"attempt": context.attempt}


class DamopsRun:
    """``damops run`` against ``database_url``, stderr read line by line."""

    def __init__(self, database_url: str, pool: str, workers: int = 2, env: dict[str, str] | None = None) -> None:
        environment = dict(os.environ)
        environment.pop("DAMOPS_PERIODIC", None)
        environment.update(
            DATABASE_URL=database_url,
            DAMOPS_LOG_FORMAT="json",
            DAMOPS_LOG_LEVEL="INFO",
            SCHEDULER_HEARTBEAT="0.2",
            HOUSEKEEPING_INTERVAL="0.5",
            RETRY_BACKOFF_BASE="0.05",
        )
        environment.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "damops", "run", "--workers", str(workers), "--pool", pool],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        self.stderr = LineReader(self.process.stderr)

    def wait_ready(self, timeout: float = 60) -> None:
        self.stderr.wait_for("pre-heated", timeout)

    def stop(self) -> None:
        """SIGTERM, as a supervisor would; the children go with it."""
        stop_process(self.process, self.stderr, grace=60)

    def json_lines(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (``damops run: ...`` notices are plain text)."""
        lines = []
        for line in self.stderr.text.splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def wait_for_line(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The first JSON line ``predicate`` accepts, polling until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.json_lines():
                if predicate(line):
                    return line
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no log line {what}; read:\n{self.stderr.text}")
            time.sleep(0.05)

    def __enter__(self) -> DamopsRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
