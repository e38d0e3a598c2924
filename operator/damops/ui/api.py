"""The JSON API under /api/: what the pages show, for scripts.

Reads are open (the dashboard is read-only without a token); every POST
needs ``Authorization: Bearer $DAMOPS_UI_TOKEN``. Without cookies there is
nothing for a cross-site request to borrow, so the API needs no CSRF token.
"""

from __future__ import annotations

from typing import Any

import psycopg
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from damops.operations import attempts, get
from damops.ui import actions, queries
from damops.ui.app import Dashboard, Json
from damops.ui.filters import BadRequest, operation_id, parse_filter, parse_page
from damops.ui.schedules import schedule_rows
from damops.ui.workers import workers


def _dash(request: Request) -> Dashboard:
    return request.app.state.dashboard


def _pool(request: Request) -> str | None:
    return (request.query_params.get("pool") or "").strip() or None


async def list_operations(request: Request) -> Response:
    f = parse_filter(request.query_params)
    page = parse_page(request.query_params)
    result = await _dash(request).db(queries.list_page, f, page)
    return Json({"operations": result.rows, "older": result.older, "filter": f.query()})


def operation_detail(conn: psycopg.Connection, op_id: int) -> dict[str, Any] | None:
    row = get(conn, op_id)
    if row is None:
        return None
    return {**row.as_dict(), "history": [a.as_dict() for a in attempts(conn, op_id)]}


async def one_operation(request: Request) -> Response:
    op_id = operation_id(request.path_params["id"])
    detail = await _dash(request).db(operation_detail, op_id)
    if detail is None:
        raise HTTPException(404, f"no operation with id {op_id}")
    return Json(detail)


async def stats(request: Request) -> Response:
    pools = await _dash(request).cached(queries.overview, _pool(request))
    return Json({"pools": [p.as_dict() for p in pools]})


async def throughput(request: Request) -> Response:
    return Json(await _dash(request).cached(queries.throughput, _pool(request)))


async def failed(request: Request) -> Response:
    return Json({"groups": await _dash(request).cached(queries.failed_groups, _pool(request))})


async def worker_states(request: Request) -> Response:
    return Json(await workers(_dash(request)))


async def schedules(request: Request) -> Response:
    return Json({"schedules": await schedule_rows(_dash(request))})


def require_bearer(request: Request) -> None:
    auth = _dash(request).auth
    if not auth.enabled:
        raise HTTPException(403, "the dashboard is read-only: set DAMOPS_UI_TOKEN to allow actions")
    if not auth.bearer_ok(request):
        raise HTTPException(401, "actions need Authorization: Bearer <DAMOPS_UI_TOKEN>")


async def _body(request: Request) -> dict[str, Any]:
    if not (await request.body()).strip():
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise BadRequest("the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return {k: str(v) for k, v in data.items() if v is not None}


async def retry_one(request: Request) -> Response:
    require_bearer(request)
    op_id = operation_id(request.path_params["id"])
    outcome = await _dash(request).db(actions.retry_one, op_id)
    return Json(outcome.as_dict(), status_code=outcome.status)


async def cancel_one(request: Request) -> Response:
    require_bearer(request)
    op_id = operation_id(request.path_params["id"])
    outcome = await _dash(request).db(actions.cancel_one, op_id)
    return Json(outcome.as_dict(), status_code=outcome.status)


async def bulk_retry(request: Request) -> Response:
    """POST /api/retry with the list's filters (query parameters or a JSON object)."""
    require_bearer(request)
    f = parse_filter({**request.query_params, **await _body(request)})
    outcome = await _dash(request).db(actions.bulk_retry, f)
    return Json(outcome.as_dict(), status_code=outcome.status)


async def purge(request: Request) -> Response:
    """POST /api/purge with status, older_than and optionally pool."""
    require_bearer(request)
    params = {**request.query_params, **await _body(request)}
    actions.purge_params(params)  # a bad request is refused before any connection is taken
    outcome = await _dash(request).db(actions.purge, params)
    return Json(outcome.as_dict(), status_code=outcome.status)


routes = [
    Route("/api/operations", list_operations),
    Route("/api/operations/{id}", one_operation),
    Route("/api/operations/{id}/retry", retry_one, methods=["POST"]),
    Route("/api/operations/{id}/cancel", cancel_one, methods=["POST"]),
    Route("/api/retry", bulk_retry, methods=["POST"]),
    Route("/api/purge", purge, methods=["POST"]),
    Route("/api/stats", stats),
    Route("/api/throughput", throughput),
    Route("/api/failed", failed),
    Route("/api/workers", worker_states),
    Route("/api/schedules", schedules),
]
