"""Periodic operations: cron schedules that housekeeping turns into operations.

Declared in DAMOPS_PERIODIC as a JSON or YAML list, for example::

    [{"name": "nightly-report", "cron": "0 3 * * *", "trigger_function": "noop",
      "inputs": {}, "pool": "default"}]

Cron expressions are evaluated in UTC by cronsim. The rules:

* exactly one operation per tick: the tick is recorded in damops.periodic in
  the same transaction that enqueues its operation, and only the transaction
  that moves ``last_tick`` forward enqueues, however many housekeepers run;
* a schedule seen for the first time starts at its next tick (nothing runs
  for ticks before it was declared);
* missed ticks (nothing ran housekeeping at the time, e.g. after downtime)
  are not replayed: the next run enqueues one operation for the most recent
  missed tick and skips the older ones.

Each operation gets the unique key ``periodic:<name>:<tick>``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import yaml
from cronsim import CronSim, CronSimError

from damops import logs
from damops.operations import NewOperation, enqueue_many, operation_problem

log = logging.getLogger("damops.periodic")

# Moves the schedule's last tick forward, or registers a new schedule. Returns
# a row only when this transaction moved it forward (then, and only then, it
# enqueues); a concurrent housekeeper waits on the row lock and finds nothing to do.
ADVANCE_TICK_SQL = """
INSERT INTO damops.periodic AS p (name, last_tick) VALUES (%(name)s, %(tick)s)
ON CONFLICT (name) DO UPDATE SET last_tick = EXCLUDED.last_tick WHERE p.last_tick < EXCLUDED.last_tick
RETURNING (xmax <> 0) AS advanced
"""

_FIELDS = {"name", "cron", "trigger_function", "inputs", "pool", "priority", "max_attempts"}


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    trigger_function: str
    inputs: Any = field(default_factory=dict)
    pool: str = "default"
    priority: int = 0
    max_attempts: int | None = None


def _schedule(entry: object, index: int) -> Schedule:
    where = f"DAMOPS_PERIODIC entry {index + 1}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping with name, cron and trigger_function")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    for key in ("name", "cron", "trigger_function"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise ValueError(f"{where} needs a non-empty {key!r}")
    try:
        CronSim(entry["cron"], datetime.now(UTC))
    except CronSimError as exc:
        raise ValueError(f"{where} ({entry['name']}): bad cron expression {entry['cron']!r}: {exc}") from None
    try:
        schedule = Schedule(**entry)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None
    # What enqueue would refuse at every tick is refused at start-up instead.
    problem = operation_problem(_operation(schedule, datetime.now(UTC)))
    if problem:
        raise ValueError(f"{where} ({schedule.name}): {problem}")
    return schedule


def _operation(schedule: Schedule, tick: datetime) -> NewOperation:
    return NewOperation(
        schedule.trigger_function,
        schedule.inputs,
        schedule.pool,
        schedule.priority,
        schedule.max_attempts,
        unique_key=unique_key(schedule, tick),
    )


def parse_schedules(text: str | None) -> list[Schedule]:
    """The schedules of a DAMOPS_PERIODIC value; ValueError naming the bad entry."""
    if not text or not text.strip():
        return []
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise ValueError(f"DAMOPS_PERIODIC is neither JSON nor YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, list):
        raise ValueError("DAMOPS_PERIODIC must be a list of schedules")
    schedules = [_schedule(entry, i) for i, entry in enumerate(data)]
    names = [s.name for s in schedules]
    if len(set(names)) != len(names):
        raise ValueError("DAMOPS_PERIODIC has two schedules with the same name")
    return schedules


def latest_tick(cron: str, now: datetime) -> datetime:
    """The most recent tick at or before ``now`` (UTC, whole seconds)."""
    now = now.astimezone(UTC).replace(microsecond=0)
    return next(CronSim(cron, now + timedelta(seconds=1), reverse=True))


def unique_key(schedule: Schedule, tick: datetime) -> str:
    return f"periodic:{schedule.name}:{tick.astimezone(UTC).isoformat()}"


def run_periodic(conn: psycopg.Connection, schedules: list[Schedule], now: datetime | None = None) -> dict[str, int]:
    """Enqueue the due tick of each schedule; return {schedule name: operation id} for those enqueued."""
    now = now or datetime.now(UTC)
    enqueued: dict[str, int] = {}
    for schedule in schedules:
        tick = latest_tick(schedule.cron, now)
        with conn.transaction():
            row = conn.execute(ADVANCE_TICK_SQL, {"name": schedule.name, "tick": tick}).fetchone()
            if row is None or not row[0]:
                continue  # already done for this tick, or a new schedule registered
            [enqueued[schedule.name]] = enqueue_many(conn, [_operation(schedule, tick)])
        log.info(
            json.dumps(
                {
                    "event": "periodic_enqueued",
                    "schedule": schedule.name,
                    "tick": tick.isoformat(),
                    "id": enqueued[schedule.name],
                }
            ),
            extra=logs.fields(enqueued[schedule.name], schedule.trigger_function, pool=schedule.pool),
        )
    return enqueued
