"""Query parameters of the operations list (and the API), checked.

Every value that reaches SQL passes through here first and is then bound as
a parameter; a value that makes no sense is a BadRequest naming it (a 400),
never a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from damops.config import parse_duration
from damops.operations import Status

MAX_ID = 2**63 - 1
MAX_TEXT = 1000
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class BadRequest(Exception):
    """Input the dashboard cannot use: shown as a 400 with this message."""


@dataclass(frozen=True)
class OperationFilter:
    statuses: tuple[str, ...] = ()
    pool: str | None = None
    trigger_function: str | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    id: int | None = None
    error: str | None = None

    def query(self) -> dict[str, str]:
        """The filter as query parameters again (for links that keep it)."""
        out: dict[str, str] = {}
        if self.statuses:
            out["status"] = ",".join(self.statuses)
        for name, value in (
            ("pool", self.pool),
            ("trigger", self.trigger_function),
            ("since", self.since.isoformat() if self.since else None),
            ("until", self.until.isoformat() if self.until else None),
            ("id", str(self.id) if self.id else None),
            ("error", self.error),
        ):
            if value:
                out[name] = value
        return out


@dataclass(frozen=True)
class Page:
    before: int | None = None  # keyset: operations with a smaller id (older)
    limit: int = DEFAULT_LIMIT


def operation_id(text: str, what: str = "operation id") -> int:
    try:
        value = int(text.strip())
    except (ValueError, AttributeError):
        raise BadRequest(f"{what} must be a whole number, got {text[:40]!r}") from None
    if not 1 <= value <= MAX_ID:
        raise BadRequest(f"{what} must be between 1 and {MAX_ID}, got {text[:40]!r}")
    return value


def _text(params: Mapping[str, str], name: str) -> str | None:
    value = (params.get(name) or "").strip()
    if not value:
        return None
    if len(value) > MAX_TEXT or "\x00" in value:
        raise BadRequest(f"{name} must be at most {MAX_TEXT} characters of text")
    return value


def parse_time(text: str, name: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (without an offset: UTC), or an age such as 2h meaning that long ago."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        try:
            seconds = parse_duration(text)
        except ValueError:
            raise BadRequest(f"{name} {text[:40]!r} is neither an ISO-8601 time nor an age like 2h") from None
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        except OverflowError:
            raise BadRequest(f"{name} {text[:40]!r} is too long ago") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def parse_statuses(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    statuses = tuple(dict.fromkeys(s.strip().upper() for s in text.split(",") if s.strip()))
    bad = [s for s in statuses if s not in Status.__members__]
    if bad:
        raise BadRequest(f"unknown status {bad[0][:40]!r}; one of {', '.join(Status.__members__)}")
    return statuses


def parse_filter(params: Mapping[str, str]) -> OperationFilter:
    since = _text(params, "since")
    until = _text(params, "until")
    op_id = _text(params, "id")
    return OperationFilter(
        statuses=parse_statuses(_text(params, "status")),
        pool=_text(params, "pool"),
        trigger_function=_text(params, "trigger"),
        since=parse_time(since, "since") if since else None,
        until=parse_time(until, "until") if until else None,
        id=operation_id(op_id, "id") if op_id else None,
        error=_text(params, "error"),
    )


def parse_page(params: Mapping[str, str]) -> Page:
    before = _text(params, "before")
    limit = _text(params, "limit")
    page = Page(before=operation_id(before, "before") if before else None)
    if limit:
        try:
            value = int(limit)
        except ValueError:
            raise BadRequest(f"limit must be a whole number, got {limit[:40]!r}") from None
        if not 1 <= value <= MAX_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}, got {value}")
        page = Page(before=page.before, limit=value)
    return page
