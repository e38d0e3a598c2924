"""Typed settings, read from the environment with the seed's variable names.

A bad value stops start-up with a message that names the variable
(see :func:`load_settings`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '30s'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration: use seconds (e.g. 30) or a unit: 500ms, 30s, 5m, 1h, 1d")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

# A pool name a scheduler can serve (the same rule is a CHECK constraint on
# damops.operations.pool): 1 to 63 characters, no white space or control characters.
MAX_POOL_NAME = 63
_POOL_BAD_CHARACTER = re.compile(r"[\s\x00-\x1f\x7f]")


def pool_problem(pool: object) -> str | None:
    """None for a pool name a scheduler can serve; else what is wrong with it."""
    if not isinstance(pool, str):
        return f"a pool name must be a string, got {type(pool).__name__}"
    if not pool:
        return "a pool name must not be empty"
    if len(pool) > MAX_POOL_NAME:
        return f"a pool name has at most {MAX_POOL_NAME} characters, got {len(pool)}"
    if _POOL_BAD_CHARACTER.search(pool):
        return f"pool name {pool!r} contains white space or a control character"
    return None


def default_home() -> str:
    """Per user, not per working directory: every command finds the same embedded database."""
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(data) / "damops")


class Settings(BaseSettings):
    """Everything the scheduler, workers and housekeeping need, one source of truth."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", populate_by_name=True)

    database_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_URL",
        description="PostgreSQL connection URL; unset means an embedded PostgreSQL under DAMOPS_HOME.",
    )
    damops_home: str = Field(
        default_factory=default_home,
        validation_alias="DAMOPS_HOME",
        description="Where the embedded PostgreSQL keeps its data (default $XDG_DATA_HOME/damops).",
    )
    pool: str = Field(default="default", validation_alias="DAMOPS_POOL")
    secret: str | None = Field(
        default=None,
        validation_alias="DAMOPS_SECRET",
        description="Shared secret checked when the scheduler opens a channel to a sidecar.",
    )
    worker_count: int = Field(default=4, ge=0, le=1024, validation_alias="WORKER_COUNT")
    scheduler_heartbeat: Duration = Field(default=1.0, validation_alias="SCHEDULER_HEARTBEAT")
    max_operation_processing_time: Duration = Field(default=600.0, validation_alias="MAX_OPERATION_PROCESSING_TIME")
    max_worker_active_time: Duration = Field(default=600.0, validation_alias="MAX_WORKER_ACTIVE_TIME")
    operation_wait_interval: Duration = Field(default=30.0, validation_alias="OPERATION_WAIT_INTERVAL")
    poll_failed_operations_interval: Duration = Field(
        default=3600.0, validation_alias="POLL_FAILED_OPERATIONS_INTERVAL"
    )
    failed_operation_threshold_time_hours: float = Field(
        default=24.0, gt=0, validation_alias="FAILED_OPERATION_THRESHOLD_TIME_HOURS"
    )
    failed_operation_threshold_limit_records: int = Field(
        default=20000, ge=0, validation_alias="FAILED_OPERATION_THRESHOLD_LIMIT_RECORDS"
    )
    housekeeping_interval: Duration = Field(default=5.0, validation_alias="HOUSEKEEPING_INTERVAL")
    shutdown_grace: Duration = Field(default=30.0, validation_alias="SHUTDOWN_GRACE")
    # After a cancel reached a running operation: how long it may take to stop
    # before its worker is killed and replaced.
    cancel_grace: Duration = Field(default=10.0, validation_alias="CANCEL_GRACE")
    # A busy worker is sent the pool's next operation ahead and starts it the moment
    # the running one ends (no scheduler round trip between two operations). Off by
    # default: in a pool of long operations a short one would wait behind a long one.
    worker_prefetch: bool = Field(default=False, validation_alias="WORKER_PREFETCH")
    # With WORKER_PREFETCH on: how many operations a worker may hold ahead. Deeper
    # means bigger claims and fewer wake-ups per operation for short operations.
    worker_prefetch_depth: int = Field(default=1, ge=1, le=32, validation_alias="WORKER_PREFETCH_DEPTH")
    # With WORKER_PREFETCH on: how long an operation held ahead may wait behind a
    # running one. After that it is handed back and a free worker takes it, so a
    # long operation never holds up a short one for long.
    worker_prefetch_max_wait: Duration = Field(default=1.0, gt=0, validation_alias="WORKER_PREFETCH_MAX_WAIT")
    # Prometheus /metrics of `damops run` (0 = off); the operator has its own DAMOPS_METRICS_PORT.
    metrics_port: int = Field(default=0, ge=0, le=65535, validation_alias="DAMOPS_RUN_METRICS_PORT")
    metrics_host: str = Field(default="127.0.0.1", validation_alias="DAMOPS_RUN_METRICS_HOST")
    max_attempts: int = Field(default=3, ge=1, le=100, validation_alias="MAX_ATTEMPTS")
    # Backoff of retryable failures (see damops.backoff for why these defaults).
    retry_backoff_base: Duration = Field(default=30.0, validation_alias="RETRY_BACKOFF_BASE")
    retry_backoff_max: Duration = Field(default=1800.0, validation_alias="RETRY_BACKOFF_MAX")
    retry_backoff_jitter: float = Field(default=0.2, ge=0, le=1, validation_alias="RETRY_BACKOFF_JITTER")
    # Retention of finished operations, next to the failed-operations cleanup
    # and run with it (every POLL_FAILED_OPERATIONS_INTERVAL), by finish time.
    success_operation_threshold_time_hours: float = Field(
        default=24.0, gt=0, validation_alias="SUCCESS_OPERATION_THRESHOLD_TIME_HOURS"
    )
    success_operation_threshold_limit_records: int = Field(
        default=100000, ge=0, validation_alias="SUCCESS_OPERATION_THRESHOLD_LIMIT_RECORDS"
    )
    cancelled_operation_threshold_time_hours: float = Field(
        default=24.0, gt=0, validation_alias="CANCELLED_OPERATION_THRESHOLD_TIME_HOURS"
    )
    cancelled_operation_threshold_limit_records: int = Field(
        default=20000, ge=0, validation_alias="CANCELLED_OPERATION_THRESHOLD_LIMIT_RECORDS"
    )
    # Periodic operations (JSON or YAML list; see damops.periodic).
    periodic: str = Field(default="", validation_alias="DAMOPS_PERIODIC")

    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str | None) -> str | None:
        if value:
            import psycopg

            try:
                psycopg.conninfo.conninfo_to_dict(value)
            except psycopg.ProgrammingError as exc:
                raise ValueError(f"not a PostgreSQL URL (postgresql://user@host/db): {exc}") from None
        return value

    @field_validator("pool")
    @classmethod
    def _servable_pool(cls, value: str) -> str:
        problem = pool_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("periodic")
    @classmethod
    def _periodic_parses(cls, value: str) -> str:
        from damops.periodic import parse_schedules

        parse_schedules(value)  # raises ValueError naming the bad entry
        return value


class ConfigError(SystemExit):
    """Raised at start-up for a bad setting; its message names the variable."""


def load_settings(**overrides: object) -> Settings:
    """Read the environment; on a bad value raise ConfigError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "?"
            lines.append(f"invalid configuration: {name}={error.get('input')!r}: {error['msg']}")
        raise ConfigError("\n".join(lines)) from None
