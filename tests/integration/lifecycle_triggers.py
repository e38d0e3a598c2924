"""Trigger functions for the lifecycle tests (imported by worker processes)."""

from __future__ import annotations

import time
from typing import Any

from damops.triggers import Retry


def retry_later(inputs: dict[str, Any], context: Any) -> dict[str, int]:
    """Asks for its own delay until the attempt given succeeds."""
    if context.attempt < inputs.get("succeed_on", 2):
        raise Retry("not yet", after=inputs["after"])
    return {"attempt": context.attempt}


def always_fail(inputs: dict[str, Any], context: Any) -> None:
    raise RuntimeError(f"transient outage on attempt {context.attempt}")


def report_progress(inputs: dict[str, Any], context: Any) -> dict[str, int]:
    context.progress("half way", 0.5)
    deadline = time.monotonic() + inputs.get("seconds", 1.0)
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return {"done": 1}
