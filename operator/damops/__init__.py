"""damops: operations in PostgreSQL, handled by pre-heated workers.

The public producer API lives here so applications can write
``from damops import enqueue``; every function takes the caller's psycopg
connection and works inside its transaction.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from damops.lifecycle import cancel, purge, retry, stats
    from damops.operations import NewOperation, Status, enqueue, enqueue_many

__all__ = ["NewOperation", "Status", "cancel", "enqueue", "enqueue_many", "purge", "retry", "stats"]
__version__ = "0.1.0"

# Imported on first use: a sidecar or worker process imports ``damops.*`` and
# must not pay for psycopg and the producer API it never calls (start-up time).
_LAZY = {
    "cancel": "damops.lifecycle",
    "purge": "damops.lifecycle",
    "retry": "damops.lifecycle",
    "stats": "damops.lifecycle",
    "NewOperation": "damops.operations",
    "Status": "damops.operations",
    "enqueue": "damops.operations",
    "enqueue_many": "damops.operations",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'damops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
