"""Reading jsonb without letting one row break a cycle.

A row inserted by plain SQL can hold JSON nested deeper than Python's parser
accepts. psycopg would raise while reading the claim's result, after the claim
committed; with this loader such a value arrives as :class:`Undecodable`, and
the scheduler fails that one operation saying why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.adapt import Loader


@dataclass(frozen=True)
class Undecodable:
    reason: str


class _SafeJsonLoader(Loader):
    def load(self, data: Any) -> Any:
        try:
            return json.loads(bytes(data))
        except RecursionError:
            return Undecodable("nested too deeply for the JSON parser")
        except ValueError as exc:
            return Undecodable(f"not readable as JSON: {exc}")


def register_safe_jsonb(conn: psycopg.AsyncConnection) -> None:
    for name in ("json", "jsonb"):
        conn.adapters.register_loader(name, _SafeJsonLoader)


def undecodable_reason(value: Any) -> str | None:
    return value.reason if isinstance(value, Undecodable) else None
