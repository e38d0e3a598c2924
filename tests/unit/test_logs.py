"""JSON log lines carry an operation's fields, so a collector can follow it."""

from __future__ import annotations

import io
import json
import logging

from damops.logs import JsonFormatter


def test_json_lines_carry_the_operation_fields_given_as_extra():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("damops.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("operation 5 noop: SUCCESS", extra={"operation_id": 5, "pool": "p", "attempt": 1})
        logger.warning("no operation here")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["operation_id"] == 5 and first["pool"] == "p" and first["attempt"] == 1
    assert first["message"] == "operation 5 noop: SUCCESS" and first["level"] == "WARNING"
    assert "operation_id" not in second
