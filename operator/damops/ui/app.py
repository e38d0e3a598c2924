"""The Starlette application: shared state, errors, security headers, /healthz.

``create_app`` is all a server needs; the pages and the API live in
damops.ui.pages and damops.ui.api.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from jinja2 import Environment, FileSystemLoader, select_autoescape
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from damops.dispatch import Snapshot
from damops.periodic import Schedule
from damops.ui.auth import Auth
from damops.ui.filters import BadRequest
from damops.ui.queries import ago, since

log = logging.getLogger("damops.ui")
HERE = Path(__file__).parent
T = TypeVar("T")
# A dashboard query that runs longer than this is cancelled: a 503 asking for a narrower filter.
STATEMENT_TIMEOUT_MS = 10_000

# Scripts only from the dashboard itself; no framing (its forms act).
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
        b" frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


class Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=to_json, ensure_ascii=False).encode()


def pretty_json(value: Any) -> str:
    """Inputs and results for a <pre>: the template escapes the text."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=to_json)


@dataclass
class Dashboard:
    """What every request needs: the database, who may act, the worker source."""

    pool: ConnectionPool
    auth: Auth
    templates: Environment
    schedules: list[Schedule]
    # In local mode (`damops run --ui`), the running scheduler's view of its workers.
    snapshot: Callable[[], Snapshot] | None = None
    local_pool: str | None = None
    # The overview's aggregates scan the table: every tab polling within this
    # many seconds shares one computation instead of each running its own.
    cache_seconds: float = 4.0
    _cache: dict[tuple[Any, ...], tuple[float, Any]] = field(default_factory=dict)

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` with a pooled connection, in a thread (psycopg blocks)."""

        def call() -> T:
            with self.pool.connection() as conn:
                return fn(conn, *args)

        return await run_in_threadpool(call)

    async def cached(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`db`, reusing an answer younger than ``cache_seconds``."""
        key = (fn.__qualname__, *args)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.cache_seconds:
            return hit[1]
        value = await self.db(fn, *args)
        if len(self._cache) > 256:  # one entry per pool asked for: keep it bounded
            self._cache.clear()
        self._cache[key] = (time.monotonic(), value)
        return value

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        sid = self.auth.session(request)
        body = self.templates.get_template(name).render(
            request=request,
            token_configured=self.auth.enabled,
            logged_in=sid is not None,
            csrf=self.auth.csrf(sid) if sid else "",
            local_mode=self.snapshot is not None,
            **context,
        )
        return HTMLResponse(body, status_code=status)


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_response(request: Request, status: int, message: str) -> Response:
    if is_api(request) or request.headers.get("hx-request"):
        if not is_api(request):
            return HTMLResponse(f'<p class="error">{_escape(message)}</p>', status_code=status)
        return Json({"error": message}, status_code=status)
    dash: Dashboard = request.app.state.dashboard
    return dash.render(request, "error.html", status=status, status_code=status, message=message)


def _escape(text: str) -> str:
    from markupsafe import escape

    return str(escape(text))


async def bad_request(request: Request, exc: Exception) -> Response:
    return error_response(request, 400, str(exc))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(request, exc.status_code, str(exc.detail))


async def database_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return error_response(
            request, 503, "the query took too long: narrow the filter (a status, a pool, a time range)"
        )
    if isinstance(exc, psycopg.errors.DataError):
        return error_response(request, 400, f"the database refused a value: {str(exc).splitlines()[0]}")
    log.warning("database error: %s", exc)
    return error_response(request, 503, "the database is not available")


async def healthz(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard

    def ping(conn: psycopg.Connection) -> bool:
        return conn.execute("SELECT 1").fetchone() is not None

    return Json({"ok": await dash.db(ping)})


async def favicon(request: Request) -> Response:
    # Browsers ask for it on every page, JSON ones included: answer rather than 404.
    return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")


def when(value: datetime | str | None) -> str:
    """A time for people, in UTC, to the second."""
    if not value:
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
    env.filters["ago"] = ago
    env.filters["since"] = since
    env.filters["pretty"] = pretty_json
    env.filters["when"] = when
    env.globals["now"] = lambda: datetime.now(UTC)
    return env


def create_app(
    database_url: str,
    *,
    token: str | None = None,
    schedules: list[Schedule] | None = None,
    snapshot: Callable[[], Snapshot] | None = None,
    local_pool: str | None = None,
    cache_seconds: float = 4.0,
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
) -> Starlette:
    from damops.ui import api, pages

    pool = ConnectionPool(
        database_url,
        min_size=1,
        max_size=4,
        open=False,
        timeout=10,
        kwargs={
            "autocommit": True,
            "application_name": "damops-ui",
            # UTC: the pages show times as UTC, whatever the server's own zone.
            "options": f"-c statement_timeout={int(statement_timeout_ms)} -c TimeZone=UTC",
        },
    )
    dashboard = Dashboard(pool, Auth(token), templates(), schedules or [], snapshot, local_pool, cache_seconds)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Opening does not wait for the database: /healthz says whether it is there.
        await run_in_threadpool(pool.open)
        try:
            yield
        finally:
            await run_in_threadpool(pool.close)

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/favicon.ico", favicon),
            *api.routes,
            *pages.routes,
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={
            BadRequest: bad_request,
            HTTPException: http_error,
            psycopg.Error: database_error,
            PoolTimeout: database_error,
        },
        lifespan=lifespan,
    )
    app.state.dashboard = dashboard
    return app
