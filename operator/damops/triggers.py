"""Finding trigger functions by name, and what they receive and may return.

A name resolves, in order, to an entry point of the group
``damops.trigger_functions`` in any installed package, or to a
``package.module:function`` path.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from importlib.metadata import entry_points
from typing import Any, Protocol

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


class CancelFlag(Protocol):
    """What a Context reads its cancel from: a :class:`threading.Event`, or the
    worker's flag that reads the socket when looked at."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass
class Context:
    """What a trigger function gets besides its inputs."""

    operation_id: int
    attempt: int
    logger: logging.Logger
    _report_progress: Callable[[str | None, float | None], None] = field(repr=False)
    _cancel: CancelFlag = field(default_factory=threading.Event, repr=False)

    def progress(self, message: str | None = None, fraction: float | None = None) -> None:
        """Say the operation is still moving; refreshes the worker's lastTouched."""
        self._report_progress(message, fraction)

    @property
    def cancelled(self) -> bool:
        """True once someone cancelled the operation: stop cleanly and return (or raise).
        Past CANCEL_GRACE the worker is killed and replaced."""
        return self._cancel.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking at once on a cancel; True if cancelled."""
        return self._cancel.wait(timeout)


ALLOWED_ENV = "DAMOPS_ALLOWED_TRIGGERS"
# The shipped examples may always run by path too.
ALWAYS_ALLOWED = ("damops.examples",)


def allowed_prefixes(text: str | None) -> tuple[str, ...]:
    """DAMOPS_ALLOWED_TRIGGERS: comma-separated modules (``mypackage.thumbs``, which
    allows its submodules too) or exact ``module:function`` paths."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def path_allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    """May ``module:function`` run? Only when its module is listed (or is inside a
    listed package), or the exact path is: anyone who can insert a row must not
    be able to run ``os:system`` on every worker."""
    module = name.partition(":")[0]
    for prefix in prefixes:
        if ":" in prefix:
            if name == prefix:
                return True
        elif module == prefix or module.startswith(prefix.rstrip(".") + "."):
            return True
    return False


# Set by local mode's zygote (damops.children) before it forks workers: the scan reads
# every installed distribution's metadata, tens of milliseconds each worker would pay.
scanned_entry_points: dict[str, Any] | None = None


def installed_entry_points() -> dict[str, Any]:
    """Entry points of the ``damops.trigger_functions`` group, by name."""
    if scanned_entry_points is not None:
        return dict(scanned_entry_points)
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


class TriggerRegistry:
    """Resolves names to callables once and remembers them. Entry points of the
    ``damops.trigger_functions`` group always may run; ``module:function``
    paths only inside the allow-list (``allowed``, default DAMOPS_ALLOWED_TRIGGERS)."""

    def __init__(self, allowed: tuple[str, ...] | None = None) -> None:
        self._cache: dict[str, Callable[..., Any]] = {}
        self._entry_points = installed_entry_points()
        listed = allowed if allowed is not None else allowed_prefixes(os.environ.get(ALLOWED_ENV))
        self.allowed = ALWAYS_ALLOWED + listed

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
            try:
                return self._entry_points[name].load()
            except Exception as exc:  # noqa: BLE001 - a broken package fails its operations, not the worker
                raise UnknownTriggerFunction(name, f"loading its entry point raised {_describe(exc)}") from None
        module_name, sep, attribute = name.partition(":")
        if not sep or not module_name or not attribute:
            raise UnknownTriggerFunction(name)
        if not path_allowed(name, self.allowed):
            raise UnknownTriggerFunction(
                name, f"not allowed: only registered trigger functions and modules listed in {ALLOWED_ENV} may run"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownTriggerFunction(name, f"cannot import {module_name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - SyntaxError, or anything the module raises at import
            raise UnknownTriggerFunction(name, f"importing {module_name} raised {_describe(exc)}") from None
        try:
            target: Any = module
            for part in attribute.split("."):
                target = getattr(target, part)
        except AttributeError:
            raise UnknownTriggerFunction(name, f"{module_name} has no {attribute}") from None
        return target


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
