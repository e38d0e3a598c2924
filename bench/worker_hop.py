"""One worker process alone: CPU time and context switches per no-op operation,
all of its threads counted, against a minimal sidecar in this process (a Unix
socket, ping-pong: one Operation, its StatusUpdate, the next). Isolates the
worker's own cost from the scheduler, the sidecar and PostgreSQL.

With ``--ahead N`` it keeps N more operations prefetched in the worker's socket
(as WORKER_PREFETCH_DEPTH=N does): the worker then seldom sleeps between two
operations, and the figure is its cost per operation when busy.

    .venv/bin/python bench/worker_hop.py [--ops 20000] [--ahead 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from damops import protocol
from damops.protocol import Challenge, Operation, Ready, StatusUpdate

SECRET = "bench"


def thread_totals(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) over every thread of ``pid``."""
    cpu, switches = 0, 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            cpu += int(f.read().split()[0])
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return cpu / 1e9, switches


def read_message(conn: socket.socket) -> protocol.Message:
    header = conn.recv(4, socket.MSG_WAITALL)
    length = protocol.frame_length(header, protocol.DEFAULT_MAX_FRAME_BYTES)
    return protocol.decode(conn.recv(length, socket.MSG_WAITALL))


def run_all(conn: socket.socket, frames: list[bytes], ahead: int) -> None:
    """Send every frame, keeping at most 1 + ``ahead`` without their StatusUpdate;
    returns once all are answered."""
    sent = answered = 0
    while answered < len(frames):
        while sent < len(frames) and sent - answered <= ahead:
            conn.sendall(frames[sent])
            sent += 1
        if isinstance(read_message(conn), StatusUpdate):
            answered += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=20000)
    p.add_argument("--ahead", type=int, default=0, help="operations kept prefetched behind the running one")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "w.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)
        env = dict(os.environ, DAMOPS_SECRET=SECRET)
        worker = subprocess.Popen([sys.executable, "-m", "damops", "worker", "--socket", path], env=env)
        conn, _ = server.accept()
        challenge = Challenge(nonce="n" * 32)
        conn.sendall(protocol.encode(challenge))
        read_message(conn)  # Hello
        assert isinstance(read_message(conn), Ready)
        frames = [
            protocol.encode(Operation(id=i, trigger_function="noop", inputs={}, attempt=1, prefetched=args.ahead > 0))
            for i in range(args.ops)
        ]
        warm_up, measured = frames[:200], frames[200:]
        run_all(conn, warm_up, args.ahead)
        cpu0, cs0 = thread_totals(worker.pid)
        started = time.perf_counter()
        run_all(conn, measured, args.ahead)
        wall = time.perf_counter() - started
        cpu1, cs1 = thread_totals(worker.pid)
        n = len(measured)
        print(
            f"worker (ahead {args.ahead}): {(cpu1 - cpu0) / n * 1e6:.1f} us CPU/op, {(cs1 - cs0) / n:.2f} context switches/op "
            f"(all threads), round trip {wall / n * 1e6:.1f} us/op; load {os.getloadavg()[0]:.1f}"
        )
        worker.kill()
        worker.wait()


if __name__ == "__main__":
    main()
