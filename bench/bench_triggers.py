"""Trigger functions of the benchmark (resolved as ``bench_triggers:NAME``: the bench
puts its directory on the workers' PYTHONPATH)."""

from __future__ import annotations

import os
import time
from typing import Any


def timed_sleep(inputs: dict[str, Any], context: Any) -> dict[str, float]:
    """Sleeps ``seconds`` (work that takes real time but no CPU); returns when it
    started and ended (worker clock) and the worker process."""
    started = time.time()
    time.sleep(float(inputs["seconds"]))
    return {"started": started, "ended": time.time(), "pid": os.getpid()}
