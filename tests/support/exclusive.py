"""A trigger function that notices two operations running at once on one worker process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def run(inputs: dict[str, Any], context: Any) -> dict[str, Any]:
    """Holds ``<dir>/running-<pid>`` while it runs (``seconds``, or until the file
    ``release`` exists); finding it already there means another operation runs in
    this process: ``overlap`` is then true. Writes ``<dir>/started-<operation id>``."""
    directory = Path(inputs["dir"])
    (directory / f"started-{context.operation_id}").write_text(str(os.getpid()))
    marker = directory / f"running-{os.getpid()}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        overlap = False
    except FileExistsError:
        overlap = True
    started = time.time()
    try:
        release = inputs.get("release")
        deadline = time.monotonic() + 120
        if release:
            while not Path(release).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            time.sleep(float(inputs.get("seconds", 0)))
    finally:
        if not overlap:
            marker.unlink()
    return {"pid": os.getpid(), "overlap": overlap, "started": started, "ended": time.time()}
