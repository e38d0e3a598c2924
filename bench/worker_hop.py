"""One worker process alone: CPU time and context switches per no-op operation,
all of its threads counted, against a minimal sidecar in this process (a Unix
socket, ping-pong: one Operation, its StatusUpdate, the next). Isolates the
worker's own cost from the scheduler, the sidecar and PostgreSQL.

    .venv/bin/python bench/worker_hop.py [--ops 20000]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=20000)
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
            protocol.encode(Operation(id=i, trigger_function="noop", inputs={}, attempt=1)) for i in range(args.ops)
        ]
        for frame in frames[:200]:  # warm-up
            conn.sendall(frame)
            while not isinstance(read_message(conn), StatusUpdate):
                pass
        cpu0, cs0 = thread_totals(worker.pid)
        started = time.perf_counter()
        for frame in frames[200:]:
            conn.sendall(frame)
            while not isinstance(read_message(conn), StatusUpdate):
                pass
        wall = time.perf_counter() - started
        cpu1, cs1 = thread_totals(worker.pid)
        n = args.ops - 200
        print(
            f"worker: {(cpu1 - cpu0) / n * 1e6:.1f} us CPU/op, {(cs1 - cs0) / n:.2f} context switches/op "
            f"(all threads), round trip {wall / n * 1e6:.1f} us/op; load {os.getloadavg()[0]:.1f}"
        )
        worker.kill()
        worker.wait()


if __name__ == "__main__":
    main()
