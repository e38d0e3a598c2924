"""damops: operations in PostgreSQL, handled by pre-heated workers.

The public producer API lives here so applications can write
``from damops import enqueue``; every function takes the caller's psycopg
connection and works inside its transaction.
"""

from damops.lifecycle import cancel, purge, retry, stats
from damops.operations import NewOperation, Status, enqueue, enqueue_many

__all__ = ["NewOperation", "Status", "cancel", "enqueue", "enqueue_many", "purge", "retry", "stats"]
__version__ = "0.1.0"
