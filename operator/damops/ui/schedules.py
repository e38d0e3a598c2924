"""Periodic schedules (DAMOPS_PERIODIC) with their last and next tick."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cronsim import CronSim

from damops.ui import queries

if TYPE_CHECKING:
    from damops.ui.app import Dashboard


async def schedule_rows(dash: Dashboard) -> list[dict[str, Any]]:
    if not dash.schedules:
        return []
    ticks = await dash.db(queries.last_ticks)
    now = datetime.now(UTC)
    return [
        {
            "name": s.name,
            "cron": s.cron,
            "trigger_function": s.trigger_function,
            "pool": s.pool,
            "inputs": s.inputs,
            "last_tick": ticks.get(s.name),
            "next_run": next(CronSim(s.cron, now.replace(microsecond=0))),
        }
        for s in dash.schedules
    ]
