"""Trigger functions a test controls through files, so that "still running" or
"ran twice" is decided by the test, not by a duration racing the machine's load.

They run in worker processes (resolved as ``tests.support.blocking:NAME``); the
helpers below run in the test."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from damops.triggers import Wait

# A hold the test forgets to release still ends, failing loudly.
SAFETY_CAP_SECONDS = 120.0


def _write_atomically(path: Path, text: str) -> None:
    # A reader sees no file or the whole text, never an empty file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def hold(inputs: dict[str, Any], context: Any) -> dict[str, Any]:
    """Writes ``<started_dir>/<operation id>`` holding the worker's pid, then
    runs until the file ``release`` exists (reporting progress every 0.2 s
    when ``progress`` is true), appends ``<operation id> <pid>`` to ``log`` if
    given, and returns the pid and the number of progress reports."""
    started = Path(inputs["started_dir"]) / str(context.operation_id)
    _write_atomically(started, str(os.getpid()))
    release = Path(inputs["release"])
    deadline = time.monotonic() + float(inputs.get("cap", SAFETY_CAP_SECONDS))
    steps = 0
    while not release.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"never released: {release} does not exist")
        time.sleep(0.05 if not inputs.get("progress") else 0.2)
        if inputs.get("progress"):
            steps += 1
            context.progress(f"step {steps}")
    if inputs.get("log"):
        with open(inputs["log"], "a") as log:
            log.write(f"{context.operation_id} {os.getpid()}\n")
    return {"pid": os.getpid(), "steps": steps}


def wait_once(inputs: dict[str, Any], context: Any) -> Any:
    """Appends the wall-clock time of each run to ``runs``; the first run asks
    to WAIT, any later one returns ``{"ran_at": time}``."""
    runs = Path(inputs["runs"])
    now = time.time()
    first = not runs.exists()
    with runs.open("a") as out:
        out.write(f"{now}\n")
    return Wait("first run waits") if first else {"ran_at": now}


# --- used by the tests ------------------------------------------------------


def started_pids(started_dir: Path) -> dict[int, int]:
    """operation id -> worker pid of every held operation that has started."""
    return {
        int(entry.name): int(entry.read_text()) for entry in started_dir.iterdir() if not entry.name.startswith(".")
    }


def release(path: Path) -> None:
    path.touch()
