"""Children of ``damops run`` die with it, however it dies.

``damops run`` starts each sidecar and worker with DAMOPS_PARENT_PID set to its
own pid. The child asks the kernel for SIGKILL when its parent dies
(PR_SET_PDEATHSIG, Linux), and checks that the parent is still the one it was
started by (it may have died before the request); elsewhere a thread polls
the parent pid. Without this a ``kill -9`` of ``damops run`` left every worker
running forever, holding results nobody would read.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_ENV = "DAMOPS_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def die_with_parent() -> None:
    """Call first thing in a child; a no-op when DAMOPS_PARENT_PID is unset (pods)."""
    text = os.environ.get(PARENT_ENV)
    if not text:
        return
    parent = int(text)
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="lifeline").start()
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the request took effect
