"""Trigger functions used only by the tests (resolved as module:function)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def record(inputs: dict[str, Any], context: Any) -> dict[str, int]:
    """Appends "<operation id> <pid>" to inputs['log']: lets a test count executions."""
    with open(inputs["log"], "a") as log:
        log.write(f"{context.operation_id} {os.getpid()}\n")
    return {"pid": os.getpid()}


def pid(inputs: Any, context: Any) -> dict[str, int]:
    return {"pid": os.getpid()}


def sleep_then_record(inputs: dict[str, Any], context: Any) -> dict[str, int]:
    """Sleeps inputs['seconds'], then records like ``record``."""
    time.sleep(float(inputs["seconds"]))
    return record(inputs, context)


def signal_then_hang(inputs: dict[str, Any], context: Any) -> None:
    """Creates inputs['flag'] (the test then knows it runs) and hangs."""
    Path(inputs["flag"]).write_text(str(os.getpid()))
    while True:
        time.sleep(3600)


def big_result(inputs: dict[str, Any], context: Any) -> str:
    return "x" * int(inputs["bytes"])


def busy_with_progress(inputs: dict[str, Any], context: Any) -> dict[str, int]:
    """Works for inputs['seconds'], reporting progress every 0.2 s."""
    deadline = time.monotonic() + float(inputs["seconds"])
    steps = 0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        steps += 1
        context.progress(f"step {steps}")
    return {"steps": steps}
