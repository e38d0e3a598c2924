"""The HTML pages, their htmx partials, the login and the form actions.

A page renders its frame and a partial; htmx re-fetches the partial every few
seconds, so numbers move without a reload. Forms that change something go
through ``checked_form``: a login session, its CSRF token and our own Origin.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from damops.ui import actions, queries
from damops.ui.api import operation_detail
from damops.ui.app import Dashboard
from damops.ui.auth import COOKIE, SESSION_SECONDS, same_origin
from damops.ui.filters import OperationFilter, operation_id, parse_filter, parse_page
from damops.ui.schedules import schedule_rows
from damops.ui.workers import workers

STATUSES = ("NEW", "WAIT", "PROCESSING", "SUCCESS", "FAILED", "CANCELLED")
# Messages shown after an action, by code: the redirect carries a code, not text.
NOTICES = {
    "retried": "Retried: back to NEW.",
    "cancelled": "Cancelled (a running operation's worker is told to stop).",
    "logged-in": "Logged in: actions are enabled.",
    "logged-out": "Logged out.",
}


def _dash(request: Request) -> Dashboard:
    return request.app.state.dashboard


def _pool(request: Request) -> str | None:
    return (request.query_params.get("pool") or "").strip() or None


def _notice(request: Request) -> str | None:
    return NOTICES.get(request.query_params.get("done", ""))


# --- overview ---------------------------------------------------------------


async def overview(request: Request) -> Response:
    dash = _dash(request)
    return dash.render(
        request, "overview.html", pool=_pool(request), notice=_notice(request), **await _overview(dash, request)
    )


async def overview_partial(request: Request) -> Response:
    dash = _dash(request)
    return dash.render(request, "_overview.html", pool=_pool(request), **await _overview(dash, request))


async def _overview(dash: Dashboard, request: Request) -> dict[str, Any]:
    return {"pools": await dash.cached(queries.overview, _pool(request)), "workers": await workers(dash)}


# --- the list -----------------------------------------------------------------


def _list_links(f: OperationFilter, older: int | None, limit: int) -> dict[str, str]:
    query = f.query()
    links = {"query": urlencode(query), "newest": "/operations?" + urlencode(query)}
    if older is not None:
        links["older"] = "/operations?" + urlencode({**query, "before": str(older), "limit": str(limit)})
    return links


async def operations(request: Request) -> Response:
    dash = _dash(request)
    f = parse_filter(request.query_params)
    page = parse_page(request.query_params)
    result = await dash.db(queries.list_page, f, page)
    return dash.render(
        request,
        "operations.html",
        f=f,
        page=page,
        result=result,
        links=_list_links(f, result.older, page.limit),
        statuses=STATUSES,
        partial_query=urlencode({k: v for k, v in request.query_params.items()}),
    )


async def operations_partial(request: Request) -> Response:
    dash = _dash(request)
    f = parse_filter(request.query_params)
    page = parse_page(request.query_params)
    result = await dash.db(queries.list_page, f, page)
    return dash.render(request, "_operations.html", result=result, links=_list_links(f, result.older, page.limit))


# --- one operation --------------------------------------------------------------


async def _detail(request: Request) -> dict[str, Any]:
    op_id = operation_id(request.path_params["id"])
    detail = await _dash(request).db(operation_detail, op_id)
    if detail is None:
        raise HTTPException(404, f"no operation with id {op_id}")
    return detail


async def operation(request: Request) -> Response:
    op = await _detail(request)
    return _dash(request).render(request, "operation.html", op=op, notice=_notice(request))


async def operation_partial(request: Request) -> Response:
    op = await _detail(request)
    return _dash(request).render(request, "_operation.html", op=op)


# --- failed, schedules -------------------------------------------------------------


async def failed(request: Request) -> Response:
    dash = _dash(request)
    groups = await dash.cached(queries.failed_groups, _pool(request))
    links = [
        "/operations?"
        + urlencode(
            {"status": "FAILED", "pool": g["pool"], "trigger": g["trigger_function"], "error": g["error"][:200]}
        )
        for g in groups
    ]
    return dash.render(request, "failed.html", groups=list(zip(groups, links)), pool=_pool(request))


async def schedules(request: Request) -> Response:
    dash = _dash(request)
    return dash.render(request, "schedules.html", schedules=await schedule_rows(dash))


# --- login and actions ---------------------------------------------------------------


async def login_form(request: Request) -> Response:
    return _dash(request).render(request, "login.html", refused=None)


async def login(request: Request) -> Response:
    dash = _dash(request)
    if not dash.auth.enabled:
        raise HTTPException(403, "the dashboard is read-only: set DAMOPS_UI_TOKEN to allow actions")
    if not same_origin(request):
        raise HTTPException(403, "refused: the login form was not sent from this dashboard")
    form = await request.form()
    if not dash.auth.token_ok(str(form.get("token") or "")):
        return dash.render(request, "login.html", status=403, refused="That is not the token.")
    response = RedirectResponse("/?done=logged-in", status_code=303)
    response.set_cookie(
        COOKIE, dash.auth.new_session(), max_age=SESSION_SECONDS, httponly=True, samesite="strict", path="/"
    )
    return response


async def logout(request: Request) -> Response:
    await checked_form(request)
    response = RedirectResponse("/?done=logged-out", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


async def checked_form(request: Request) -> FormData:
    """The form of an action, once it is allowed: 403 with the reason otherwise."""
    auth = _dash(request).auth
    if not auth.enabled:
        raise HTTPException(403, "the dashboard is read-only: set DAMOPS_UI_TOKEN to allow actions")
    sid = auth.session(request)
    if sid is None:
        raise HTTPException(403, "actions need the token: log in first")
    if not same_origin(request):
        raise HTTPException(403, "refused: the form was not sent from this dashboard (Origin check)")
    form = await request.form()
    if not auth.csrf_ok(sid, str(form.get("csrf") or "")):
        raise HTTPException(403, "refused: the form's CSRF token is missing or stale; reload the page")
    return form


async def _act(request: Request, fn: Any, done: str) -> Response:
    await checked_form(request)
    op_id = operation_id(request.path_params["id"])
    outcome: actions.Outcome = await _dash(request).db(fn, op_id)
    if outcome.status != 200:
        raise HTTPException(outcome.status, outcome.message)
    return RedirectResponse(f"/operations/{op_id}?done={done}", status_code=303)


async def retry_one(request: Request) -> Response:
    return await _act(request, actions.retry_one, "retried")


async def cancel_one(request: Request) -> Response:
    return await _act(request, actions.cancel_one, "cancelled")


async def bulk_retry(request: Request) -> Response:
    form = await checked_form(request)
    f = parse_filter({k: str(v) for k, v in form.items()})
    outcome = await _dash(request).db(actions.bulk_retry, f)
    return _dash(request).render(request, "done.html", outcome=outcome, back="/operations?" + urlencode(f.query()))


async def purge(request: Request) -> Response:
    form = await checked_form(request)
    params = {k: str(v) for k, v in form.items()}
    actions.purge_params(params)
    outcome = await _dash(request).db(actions.purge, params)
    return _dash(request).render(request, "done.html", outcome=outcome, back="/")


routes = [
    Route("/", overview),
    Route("/partials/overview", overview_partial),
    Route("/operations", operations),
    Route("/partials/operations", operations_partial),
    Route("/operations/{id}", operation),
    Route("/partials/operations/{id}", operation_partial),
    Route("/operations/{id}/retry", retry_one, methods=["POST"]),
    Route("/operations/{id}/cancel", cancel_one, methods=["POST"]),
    Route("/actions/retry", bulk_retry, methods=["POST"]),
    Route("/actions/purge", purge, methods=["POST"]),
    Route("/failed", failed),
    Route("/schedules", schedules),
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
