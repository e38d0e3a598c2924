"""Finding trigger functions by name, and what they receive and may return.

A name resolves, in order, to an entry point of the group
``damops.trigger_functions`` in any installed package, or to a
``package.module:function`` path.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "damops.trigger_functions"


class UnknownTriggerFunction(LookupError):
    def __init__(self, name: str, reason: str = "") -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(f"unknown trigger function {name!r}{detail}")


class PermanentError(Exception):
    """Raise from a trigger function to fail the operation without retrying it."""


class Retry(Exception):
    """Raise from a trigger function to fail this attempt and ask for the next
    one after ``after`` seconds (or a timedelta), instead of the backoff policy's delay."""

    def __init__(self, message: str = "", *, after: float | timedelta | None = None) -> None:
        super().__init__(message)
        self.after = after.total_seconds() if isinstance(after, timedelta) else after


@dataclass(frozen=True)
class Wait:
    """Return from a trigger function to run it again after OPERATION_WAIT_INTERVAL
    (the operation goes to WAIT; waiting does not use up an attempt)."""

    reason: str = ""


@dataclass
class Context:
    """What a trigger function gets besides its inputs."""

    operation_id: int
    attempt: int
    logger: logging.Logger
    _report_progress: Callable[[str | None, float | None], None] = field(repr=False)

    def progress(self, message: str | None = None, fraction: float | None = None) -> None:
        """Say the operation is still moving; refreshes the worker's lastTouched."""
        self._report_progress(message, fraction)


class TriggerRegistry:
    """Resolves names to callables once and remembers them."""

    def __init__(self) -> None:
        self._cache: dict[str, Callable[..., Any]] = {}
        self._entry_points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def names(self) -> list[str]:
        return sorted(self._entry_points)

    def resolve(self, name: str) -> Callable[..., Any]:
        if name in self._cache:
            return self._cache[name]
        function = self._load(name)
        if not callable(function):
            raise UnknownTriggerFunction(name, "not callable")
        self._cache[name] = function
        return function

    def _load(self, name: str) -> Any:
        if name in self._entry_points:
            return self._entry_points[name].load()
        module_name, sep, attribute = name.partition(":")
        if not sep or not module_name or not attribute:
            raise UnknownTriggerFunction(name)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownTriggerFunction(name, f"cannot import {module_name}: {exc}") from None
        try:
            target: Any = module
            for part in attribute.split("."):
                target = getattr(target, part)
        except AttributeError:
            raise UnknownTriggerFunction(name, f"{module_name} has no {attribute}") from None
        return target
