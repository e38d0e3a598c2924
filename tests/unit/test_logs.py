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


def test_lines_logged_while_an_operation_is_handled_carry_its_fields_whatever_the_logger():
    from damops.logs import OperationFields, OperationFilter, about

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(OperationFilter())
    logger = logging.getLogger("damops.test.about")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with about(OperationFields(7, "noop", 2, "p", "w-1")):
            logger.warning("inside")
            logger.warning("explicit wins", extra={"attempt": 9})
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    inside, explicit, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert {k: inside[k] for k in ("operation_id", "trigger_function", "attempt", "pool", "worker")} == {
        "operation_id": 7,
        "trigger_function": "noop",
        "attempt": 2,
        "pool": "p",
        "worker": "w-1",
    }
    assert explicit["attempt"] == 9 and explicit["operation_id"] == 7
    assert "operation_id" not in after


def test_fields_leaves_out_what_is_not_known():
    from damops.logs import fields

    assert fields(3, None, 1, "p") == {"operation_id": 3, "attempt": 1, "pool": "p"}
