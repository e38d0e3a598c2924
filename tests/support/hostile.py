"""Trigger functions that return, raise or report what a careless or hostile
trigger function could: the engine must fail that one operation and go on."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from damops.triggers import Wait


def returns(inputs: dict[str, Any], context: Any) -> Any:
    """Returns the Python value named by inputs['value']."""
    values = {
        "nul": "a\x00b",
        "nested_nul": {"text": "\x00"},
        "surrogate": "\udc00",
        "nan": float("nan"),
        "nested_nan": [1.0, float("inf")],
        "huge_int": 10**5000,
        "deep": _deep(300),
        "set": {1, 2},
    }
    return values[inputs["value"]]


def raises_nul(inputs: Any, context: Any) -> None:
    raise ValueError("bad byte \x00 and a lone \udc00 surrogate")


def waits_with_nul(inputs: Any, context: Any) -> Wait:
    return Wait("waiting for \x00")


def exits(inputs: Any, context: Any) -> None:
    sys.exit(3)


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


def raises_unprintable(inputs: Any, context: Any) -> None:
    raise _Unprintable()


def pid(inputs: Any, context: Any) -> dict[str, int]:
    return {"pid": os.getpid()}


def record_then_sleep(inputs: dict[str, Any], context: Any) -> dict[str, int]:
    """Appends "<id> <attempt> <pid> start" to inputs['log'] and writes inputs['flag'],
    sleeps inputs['seconds'], then appends "... end": a test counts executions."""
    line = f"{context.operation_id} {context.attempt} {os.getpid()}"
    with open(inputs["log"], "a") as log:
        log.write(line + " start\n")
    if inputs.get("flag"):
        Path(inputs["flag"]).write_text(str(os.getpid()))
    time.sleep(float(inputs["seconds"]))
    with open(inputs["log"], "a") as log:
        log.write(line + " end\n")
    return {"pid": os.getpid()}


def _deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


def until_cancelled(inputs: dict[str, Any], context: Any) -> dict[str, str]:
    """Writes inputs['flag'] with its pid, then works until cancelled and stops cleanly."""
    Path(inputs["flag"]).write_text(str(os.getpid()))
    if context.wait_cancelled(float(inputs.get("seconds", 120))):
        raise RuntimeError("stopped: cancelled")
    return {"finished": "not cancelled"}


def ignores_cancel(inputs: dict[str, Any], context: Any) -> None:
    """Writes inputs['flag'] with its pid and never returns, cancelled or not."""
    Path(inputs["flag"]).write_text(str(os.getpid()))
    while True:
        time.sleep(3600)
