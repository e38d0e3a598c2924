"""The scheduler's decisions, without I/O (filled in by the dispatch-core work)."""

from __future__ import annotations

import enum


class WorkerState(str, enum.Enum):
    """Seed: pending (started, not yet ready), free, active (exactly one operation)."""

    PENDING = "pending"
    FREE = "free"
    ACTIVE = "active"
