"""CPU time by component, from the kernel's per-process accounting (psutil).

Components: this process (the scheduler, plus the bench's producer and poller),
the sidecars, the workers, and the PostgreSQL server (the postmaster and every
process under it: backends, WAL writer, autovacuum...). Exact per process, so
other load on the machine does not leak into it; what it cannot show is time
our processes spent waiting for a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil


def postmaster_pid(data_directory: str) -> int | None:
    try:
        return int((Path(data_directory) / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _runtime(pid: int) -> float:
    """Seconds on a CPU from the scheduler's own nanosecond clock (/proc/PID/task/*/schedstat):
    exact, where user/system times are sampled at clock ticks. Live threads only."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        pass
    return total / 1e9


def _cpu(pids: list[int]) -> tuple[float, float, int, float]:
    """(user seconds, system seconds, context switches, schedstat seconds) summed over ``pids``."""
    user = system = runtime = 0.0
    switches = 0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                t = process.cpu_times()
                c = process.num_ctx_switches()
            user += t.user
            system += t.system
            switches += c.voluntary + c.involuntary
            runtime += _runtime(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return user, system, switches, runtime


class CpuMeter:
    """Snapshots of CPU seconds per component; ``delta`` between two of them."""

    def __init__(self, postmaster: int | None, sidecars: list[int], workers: list[int]) -> None:
        self.postmaster = postmaster
        self.sidecars = sidecars
        self.workers = workers

    def _postgres_pids(self) -> list[int]:
        if self.postmaster is None:
            return []
        try:
            parent = psutil.Process(self.postmaster)
            return [self.postmaster] + [c.pid for c in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def snapshot(self) -> dict[str, Any]:
        # Backends come and go: keep each pid's own reading so a delta only
        # compares processes alive at both ends, plus whole lifetimes of new ones.
        pg = {pid: _cpu([pid]) for pid in self._postgres_pids()}
        return {
            "scheduler_process": _cpu([os.getpid()]),
            "sidecars": _cpu(self.sidecars),
            "workers": _cpu(self.workers),
            "postgres": pg,
        }

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
        """{component: {"user": s, "system": s, "cpu": s, "switches": n}} plus a "total"."""

        def diff(a: tuple[float, float, int, float], b: tuple[float, float, int, float]) -> dict[str, float]:
            return {
                "user": b[0] - a[0],
                "system": b[1] - a[1],
                "cpu": (b[0] - a[0]) + (b[1] - a[1]),
                "switches": b[2] - a[2],
                "sched": b[3] - a[3],
            }

        out = {k: diff(before[k], after[k]) for k in ("scheduler_process", "sidecars", "workers")}
        pg = {"user": 0.0, "system": 0.0, "cpu": 0.0, "switches": 0.0, "sched": 0.0}
        for pid, reading in after["postgres"].items():
            for key, value in diff(before["postgres"].get(pid, (0.0, 0.0, 0, 0.0)), reading).items():
                pg[key] += value
        out["postgres"] = pg
        out["total"] = {key: sum(c[key] for c in list(out.values())) for key in pg}
        return out


def per_op(delta: dict[str, dict[str, float]], n: int) -> dict[str, dict[str, float]]:
    """Microseconds of CPU (and context switches) per operation, by component."""
    return {
        component: {
            "cpu_us": round(v["cpu"] / n * 1e6, 1),
            "user_us": round(v["user"] / n * 1e6, 1),
            "system_us": round(v["system"] / n * 1e6, 1),
            "switches": round(v["switches"] / n, 2),
            "sched_us": round(v["sched"] / n * 1e6, 1),
        }
        for component, v in delta.items()
    }


def brief(per_op_figures: dict[str, dict[str, float]]) -> str:
    return ", ".join(
        f"{k} {v['cpu_us']:.0f}/{v['sched_us']:.0f} ({v['system_us']:.0f} sys, {v['switches']:.1f} cs)"
        for k, v in per_op_figures.items()
    )
