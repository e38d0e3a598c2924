"""damops: operations in PostgreSQL, handled by pre-heated workers.

The public producer API lives here so applications can write
``from damops import enqueue``.
"""

from damops.operations import Status, enqueue, enqueue_many

__all__ = ["Status", "enqueue", "enqueue_many"]
__version__ = "0.1.0"
