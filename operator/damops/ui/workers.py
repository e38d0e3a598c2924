"""Worker states: the running scheduler's own view in local mode, else what
the database can tell (workers holding an operation, and recent ones)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from damops.ui import queries

if TYPE_CHECKING:
    from damops.ui.app import Dashboard


async def workers(dash: Dashboard) -> dict[str, Any]:
    if dash.snapshot is not None:
        # Read on the event loop the scheduler runs on: no lock needed.
        snap = dash.snapshot()
        return {
            "source": "scheduler",
            "pool": dash.local_pool,
            "pending": snap.pending,
            "free": snap.free,
            "active": snap.active,
            "draining": snap.draining,
            "workers": [w.__dict__ for w in snap.workers],
        }
    seen = await dash.cached(queries.workers_from_database)
    return {"source": "database", **seen}
